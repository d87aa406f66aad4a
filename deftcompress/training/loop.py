"""A reusable training loop for passes that fine-tune (DEFT, ADA-DEFT, Taylor-importance pruning, ...).

    from deftcompress.training.context import TrainingContext
    from deftcompress.training.loop import TrainSettings, train
    ctx = TrainingContext.from_state(state, "my_pass")  # what training reads of the run
    result = train(ctx, model, ctx.train_examples(2000), TrainSettings(epochs=1, batch_size=32),
                   extra_loss=my_loss)              # optional; see `ExtraLoss`
    state.model = result.model

What it does:
- tokenises the task's train examples through `deftcompress.data.features` (the path evaluation
  uses too). Padding is dynamic (`longest`) or, with ``padding="max_length"``, to `max_seq_length` /
  `max_target_length` as the DEFT paper's code does;
- AdamW (no weight decay on biases and norms) with linear warm-up then linear decay
  (`transformers.get_linear_schedule_with_warmup`), gradient clipping;
- calls `ctx.enforce_constraints(model)` after every optimizer step (binding and releasing
  constraints is the calling pass's job: it knows when the model is built and handed on);
- an optional extra loss (`ExtraLoss`), shown in the progress bar beside the task loss;
- an optional teacher (`training.distillation`): its logits on the same batch, matched at a temperature;
- gradient accumulation (`gradient_accumulation_steps` micro-batches per optimizer step) and
  mixed precision (bf16 / fp16 autocast) through accelerate;
- evaluation after each epoch when more than one epoch runs, or every `eval_steps` optimizer steps,
  keeping the best trainable weights; the score is the task metric on held-out training rows
  (`validation`), or for epochs without them on the recipe's evaluation rows;
- experiment trackers through accelerate (`report_to`: losses and evaluations per step);
- several processes through `accelerate.Accelerator` (DDP; gloo on CPU), so the same code runs under
  ``torchrun --nproc_per_node N -m deftcompress.cli apply ...`` and ``accelerate launch``.
  `batch_size` is the global batch: each step every process takes its share of the same batch.

Only rank 0 evaluates and draws the progress bar; the keep-best decision is broadcast to all ranks.
The loop writes no files.
"""

from __future__ import annotations

import math
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from deftcompress.errors import DeftcompressError
from deftcompress.data.features import Batch, collate, encode_examples
from deftcompress.training.context import TrainingContext
from deftcompress.training.distillation import distillation_term, feature_term, hidden_states_of, teacher_outputs
from deftcompress.training.options import TrainSettings  # noqa: F401  (the settings live with the options)



class TrainingError(DeftcompressError):
    """Training cannot run as configured (no trainable parameters, batch not divisible, ...)."""


class ExtraLoss(Protocol):
    """Something added to the task loss at every step (DEFT's density loss, a sparsity penalty, ...).

    `begin_step` runs before the forward pass (with the masks of the tokens that count, per stack:
    "encoder" / "decoder"), `end_step` after it: it returns the term to add to the task loss
    (weights applied; None to add nothing) and a raw value for the log. An optional `postfix()`
    returns more labelled values for the progress bar.
    """

    label: str

    def begin_step(self, token_masks: dict[str, torch.Tensor], step: int, total_steps: int) -> None: ...

    def end_step(self) -> tuple[torch.Tensor | None, float]: ...


@dataclass
class EpochLog:
    epoch: int
    steps: int
    train_loss: float
    task_loss: float
    extra_loss: float | None  # raw (unweighted) extra loss, mean over the epoch's steps
    distill_loss: float | None = None  # the teacher's terms as weighted (with a teacher), mean over the epoch's steps
    eval_score: float | None = None
    eval_density: float | None = None
    seconds: float = 0.0


@dataclass
class TrainResult:
    model: nn.Module  # the trained model, unwrapped from DDP, best epoch restored
    epochs: list[EpochLog]
    chosen_epoch: int
    steps: int
    train_seconds: float  # optimisation only, evaluation excluded
    seconds_per_step: float
    median_seconds_per_step: float  # robust to a shared machine's hiccups
    world_size: int
    trainable_params: int
    extra_label: str | None = None
    notes: list[str] = field(default_factory=list)
    step_evals: list[dict[str, Any]] = field(default_factory=list)  # eval_steps: {step, score, density}
    chosen_step: int | None = None

    def to_dict(self) -> dict[str, Any]:
        label = self.extra_label or "extra"
        epochs = []
        for e in self.epochs:
            d = asdict(e)
            d[f"{label}_loss"] = d.pop("extra_loss")
            if d["distill_loss"] is None:  # trained without a teacher
                d.pop("distill_loss")
            epochs.append({k: (round(v, 6) if isinstance(v, float) else v) for k, v in d.items()})
        return {"epochs": epochs, "chosen_epoch": self.chosen_epoch, "steps": self.steps,
                "train_seconds": round(self.train_seconds, 2), "seconds_per_step": round(self.seconds_per_step, 4),
                "median_seconds_per_step": round(self.median_seconds_per_step, 4),
                "world_size": self.world_size, "trainable_params": self.trainable_params, "notes": self.notes,
                **({"step_evals": self.step_evals, "chosen_step": self.chosen_step} if self.step_evals else {})}


def _epoch_batches(n: int, batch_size: int, world: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffled global batches of example indices (identical on every rank); a last batch too small to split is dropped."""
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(n, generator=generator).tolist()
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    if batches and len(batches[-1]) < world:
        batches.pop()
    return batches


# ---- optimisation ----------------------------------------------------------------------------

def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    seen, out = set(), []
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    return out


def _no_decay(name: str, p: torch.Tensor) -> bool:
    lowered = name.lower()
    return p.ndim < 2 or "norm" in lowered or lowered.endswith(".bias")


def default_parameter_groups(model: nn.Module, weight_decay: float,
                             learning_rates: dict[int, float] | None = None) -> list[dict[str, Any]]:
    """AdamW groups: decay on matrices, none on biases and norms; `learning_rates` maps id(param) -> own lr."""
    learning_rates = learning_rates or {}
    groups: dict[tuple[float, float | None], list[nn.Parameter]] = {}
    for name, p in trainable_parameters(model):
        decay = 0.0 if _no_decay(name, p) else weight_decay
        groups.setdefault((decay, learning_rates.get(id(p))), []).append(p)
    out = []
    for (decay, lr), params in groups.items():
        group: dict[str, Any] = {"params": params, "weight_decay": decay}
        if lr is not None:
            group["lr"] = lr
        out.append(group)
    return out


def _snapshot(params: list[tuple[str, nn.Parameter]]) -> list[torch.Tensor]:
    return [p.detach().to("cpu", copy=True) for _, p in params]


def _restore(params: list[tuple[str, nn.Parameter]], saved: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for (_, p), value in zip(params, saved):
            p.copy_(value.to(p.device))


def _forward_loss(model: nn.Module, batch: Batch, hidden_states: bool = False):
    """(task loss, the model's output, with every layer's hidden state if asked)."""
    out = model(**batch.inputs, **({"output_hidden_states": True} if hidden_states else {}))
    loss = out.loss if hasattr(out, "loss") else out[0]
    if loss is None:
        raise TrainingError(f"{type(model).__name__} returned no loss; does it take `labels`?")
    return loss, out


def train(ctx: TrainingContext, model: nn.Module, examples: list[dict], settings: TrainSettings,
          extra_loss: ExtraLoss | None = None, parameter_groups: list[dict[str, Any]] | None = None,
          validation: list[dict] | None = None, logging_dir: str | None = None,
          teacher: nn.Module | None = None) -> TrainResult:
    """Train `model`'s trainable parameters on `examples` for `ctx.task`; see the module docstring.

    `validation`: held-out training rows for the evaluations that choose weights (`eval_steps`, the
    best epoch); without them the best epoch is chosen on the recipe's evaluation rows. `teacher`: a
    frozen model whose logits are matched too (`training.distillation`, weight `settings.distill_weight`).
    """
    trackers = _check_request(ctx, settings, validation)
    accelerator = _start_accelerator(ctx, settings, trackers, logging_dir)
    params = trainable_parameters(model)
    if not params:
        raise TrainingError("the model has no trainable parameters")
    features = encode_examples(ctx.tokenizer, ctx.task, ctx.arch, examples, settings.max_seq_length,
                               settings.max_target_length)
    plan = _plan_steps(len(features), settings, accelerator.num_processes)
    selection_rows = validation or ctx.eval_examples()
    optimizer, scheduler = _optimizer_and_schedule(model, settings, parameter_groups, plan.total_steps)
    ddp_model, optimizer = accelerator.prepare(model, optimizer)
    if trackers:
        accelerator.init_trackers(re.sub(r"[^A-Za-z0-9_.-]+", "_", settings.desc) or "train",
                                  config={k: v for k, v in asdict(settings).items() if isinstance(v, (int, float, str, bool))})
    run = _Run(ctx=ctx, settings=settings, plan=plan, accelerator=accelerator, model=model, ddp_model=ddp_model,
               optimizer=optimizer, scheduler=scheduler, params=params, features=features,
               selection_rows=selection_rows, trackers=trackers, extra_loss=extra_loss, teacher=teacher)
    tally = _Tally()
    start, resumed = _resume_point(run, tally)
    _run_epochs(run, tally, start)
    notes = _keep_best(run, tally, "held-out training rows" if validation else "the evaluation rows")
    if resumed:
        notes.insert(0, resumed)
    return _finish(run, tally, notes)


def _resume_point(run: "_Run", tally: "_Tally") -> tuple[tuple[int, int, dict | None], str | None]:
    """Where the steps start: at 0, or after the run's step checkpoint of this pass (an interrupted run)."""
    from deftcompress.training.step_checkpoint import restore

    store = run.ctx.step_checkpoints
    found = store.load() if store is not None else None
    if found is None:
        return (0, 0, None), None
    try:
        epoch, done, sums = restore(run, tally, *found, epoch_log_type=EpochLog)
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise TrainingError(f"{run.ctx.pass_name}: the step checkpoint cannot continue this training ({exc}); use "
                            "--restart to run again") from None
    return (epoch, done, sums), f"resumed inside the pass from its step checkpoint after step {tally.step}"


# ---- the stages of `train` ----------------------------------------------------------------------

@dataclass
class _Plan:
    """How long training runs and which evaluations may choose the weights."""

    total_steps: int
    epochs_to_run: int
    evaluate_epochs: bool
    select_from: int  # earlier evaluations are logged, not kept
    max_density: float | None

    def eligible(self, at_step: int, density: float | None) -> bool:
        """Whether an evaluation may be kept: after `select_from`, and within the density bound where one is set."""
        if at_step < self.select_from:
            return False
        return self.max_density is None or density is None or density <= self.max_density


@dataclass
class _Run:
    """What one training holds fixed from the first step to the last."""

    ctx: TrainingContext
    settings: TrainSettings
    plan: _Plan
    accelerator: Any
    model: nn.Module  # constraints are enforced on it (not on the DDP wrapper)
    ddp_model: nn.Module
    optimizer: Any
    scheduler: Any
    params: list[tuple[str, nn.Parameter]]
    features: list[dict]
    selection_rows: list[dict]
    trackers: list[str]
    extra_loss: ExtraLoss | None
    teacher: nn.Module | None

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def sign(self) -> float:
        return 1.0 if self.ctx.task.higher_is_better else -1.0  # perplexity: lower is better


@dataclass
class _Tally:
    """What the step loop accumulates: steps, timings, logs and the best weights so far."""

    step: int = 0
    train_seconds: float = 0.0
    step_seconds: list[float] = field(default_factory=list)
    epochs: list[EpochLog] = field(default_factory=list)
    step_evals: list[dict[str, Any]] = field(default_factory=list)
    best_score: float = -math.inf
    best_epoch: int = 0
    best_weights: list[torch.Tensor] | None = None
    best_step: int = 0
    best_step_score: float = -math.inf
    best_step_weights: list[torch.Tensor] | None = None


@dataclass
class _MicroLosses:
    loss: float
    task: float
    extra_raw: float | None
    distill_raw: float | None


def _check_request(ctx: TrainingContext, settings: TrainSettings, validation: list[dict] | None) -> list[str]:
    """Refuse what cannot run here before anything is built; the trackers to log to."""
    if settings.mixed_precision == "fp16" and ctx.device.type != "cuda":
        raise TrainingError(f"mixed_precision: fp16 needs a GPU (this run is on {ctx.device.type}); use bf16")
    if settings.eval_steps and not validation:
        raise TrainingError("eval_steps needs held-out training rows (validation_fraction)")
    trackers = list(settings.report_to)
    _check_trackers(trackers)
    return trackers


def _start_accelerator(ctx: TrainingContext, settings: TrainSettings, trackers: list[str], logging_dir: str | None):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # accelerate keeps one state per process; a later pass (or run) may ask for another precision.
    # The process group (PartialState) stays, so this is safe under torchrun as well.
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(cpu=ctx.device.type == "cpu", mixed_precision=settings.mixed_precision,
                              log_with=trackers or None, project_dir=logging_dir)
    world = accelerator.num_processes
    if settings.batch_size % world:
        raise TrainingError(f"batch_size {settings.batch_size} does not split over {world} processes; use a multiple of {world}")
    return accelerator


def _plan_steps(n_features: int, settings: TrainSettings, world: int) -> _Plan:
    micro = settings.gradient_accumulation_steps
    steps_per_epoch = len(_epoch_batches(n_features, settings.batch_size, world, settings.seed, 0)) // micro
    if steps_per_epoch == 0:
        raise TrainingError(f"{n_features} training examples cannot fill one optimizer step ({micro} x "
                            f"{settings.batch_size} rows) over {world} processes")
    # As in transformers' Trainer, max_steps (when set) decides the length, however many epochs that takes.
    total_steps = settings.max_steps if settings.max_steps is not None else settings.epochs * steps_per_epoch
    epochs_to_run = math.ceil(total_steps / steps_per_epoch)
    return _Plan(total_steps=total_steps, epochs_to_run=epochs_to_run,
                 evaluate_epochs=settings.eval_every_epoch and epochs_to_run > 1,
                 select_from=math.ceil(settings.select_from_ratio * total_steps),
                 max_density=settings.select_max_density)


def _optimizer_and_schedule(model: nn.Module, settings: TrainSettings, parameter_groups: list[dict[str, Any]] | None,
                            total_steps: int):
    """AdamW with linear warm-up then linear decay over `total_steps`."""
    from transformers import get_linear_schedule_with_warmup

    optimizer = torch.optim.AdamW(parameter_groups or default_parameter_groups(model, settings.weight_decay),
                                  lr=settings.learning_rate, weight_decay=settings.weight_decay)
    # The scheduler is stepped by hand once per optimizer step (accelerate's wrapper would step it once per process).
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(settings.warmup_ratio * total_steps), total_steps)
    return optimizer, scheduler


def _run_epochs(run: _Run, tally: _Tally, start: tuple[int, int, dict | None] = (0, 0, None)) -> None:
    from tqdm.auto import tqdm

    bar = tqdm(total=run.plan.total_steps, initial=tally.step, desc=run.settings.desc,
               disable=run.ctx.quiet or not run.main, leave=False, unit="step")
    run.ddp_model.train()
    first_epoch, done, sums = start
    try:
        for epoch in range(first_epoch, run.plan.epochs_to_run):
            _run_epoch(run, tally, epoch, bar, *((done, sums) if epoch == first_epoch else (0, None)))
            if tally.step >= run.plan.total_steps:
                break
    finally:
        bar.close()
        if run.trackers:
            run.accelerator.end_training()


def _run_epoch(run: _Run, tally: _Tally, epoch: int, bar, done: int = 0, sums: dict | None = None) -> None:
    """One epoch's optimizer steps; a resumed epoch skips its first `done` batches and continues their `sums`."""
    settings, micro = run.settings, run.settings.gradient_accumulation_steps
    sums = sums or {"loss": 0.0, "task": 0.0, "extra": 0.0, "extra_n": 0, "distill": 0.0, "n": 0}
    epoch_start = time.perf_counter()
    batches = _epoch_batches(len(run.features), settings.batch_size, run.world, settings.seed, epoch)
    batches = batches[:len(batches) // micro * micro]  # whole optimizer steps only
    step_start = time.perf_counter()
    for b, global_batch in enumerate(batches):
        if b < done:  # before the step checkpoint this run resumed from
            continue
        if tally.step >= run.plan.total_steps:
            break
        last_micro = (b + 1) % micro == 0
        losses = _micro_step(run, global_batch, tally.step, last_micro)
        _add_micro(sums, losses, micro)
        if not last_micro:
            continue
        _optimizer_step(run)
        tally.step += 1
        sums["n"] += 1
        tally.step_seconds.append(time.perf_counter() - step_start)
        _show_step(run, tally.step, losses, bar)
        if settings.eval_steps and tally.step % settings.eval_steps == 0:
            _evaluate_step(run, tally)
        if settings.save_steps and tally.step % settings.save_steps == 0 and tally.step < run.plan.total_steps:
            _save_step_checkpoint(run, tally, epoch, b + 1, sums)
        step_start = time.perf_counter()  # after any evaluation or checkpoint: step times are optimisation only
    epoch_seconds = time.perf_counter() - epoch_start
    tally.train_seconds += epoch_seconds
    n = max(sums["n"], 1)
    log = EpochLog(epoch=epoch + 1, steps=sums["n"], train_loss=sums["loss"] / n, task_loss=sums["task"] / n,
                   extra_loss=sums["extra"] / sums["extra_n"] if sums["extra_n"] else None,
                   distill_loss=sums["distill"] / n if run.teacher is not None else None, seconds=epoch_seconds)
    if run.plan.evaluate_epochs and not settings.eval_steps:
        _evaluate_epoch(run, tally, log, epoch)
    tally.epochs.append(log)


def _save_step_checkpoint(run: _Run, tally: _Tally, epoch: int, done: int, sums: dict) -> None:
    from deftcompress.training.step_checkpoint import snapshot

    store = run.ctx.step_checkpoints
    if store is not None and run.main:
        store.save(tally.step, *snapshot(run, tally, epoch, done, sums))


def _micro_step(run: _Run, global_batch: list[int], step: int, last_micro: bool) -> _MicroLosses:
    """This rank's share of one micro-batch: forward, the loss terms, backward (scaled for accumulation)."""
    from contextlib import nullcontext

    ctx, settings, accelerator = run.ctx, run.settings, run.accelerator
    mine = global_batch[accelerator.process_index::run.world]
    batch = collate(ctx.tokenizer, ctx.task, ctx.arch, [run.features[i] for i in mine], settings.padding,
                    settings.max_seq_length, settings.max_target_length).to(accelerator.device)
    if run.extra_loss is not None:
        run.extra_loss.begin_step(batch.token_masks, step, run.plan.total_steps)
    # DDP: gradients are all-reduced only on the micro-batch that ends an optimizer step
    with nullcontext() if last_micro or run.world == 1 else accelerator.no_sync(run.ddp_model):
        features = run.teacher is not None and settings.distill_features > 0
        task_loss, out = _forward_loss(run.ddp_model, batch, hidden_states=features)
        loss, extra_raw, distill_raw = task_loss, None, None
        if run.teacher is not None:
            taught = teacher_outputs(run.teacher, batch.inputs, hidden_states=features)
            distill = settings.distill_weight * distillation_term(out.logits, taught.logits, settings.distill_temperature,
                                                                  ctx.task.kind == "regression",
                                                                  batch.inputs.get("attention_mask"))
            if features:
                distill = distill + settings.distill_features * feature_term(
                    hidden_states_of(out), hidden_states_of(taught), batch.inputs.get("attention_mask"))
            distill_raw = float(distill.detach())  # the weighted sum of the teacher's terms
            loss = loss + distill
        if run.extra_loss is not None:
            extra_term, extra_raw = run.extra_loss.end_step()
            if extra_term is not None:
                loss = loss + extra_term  # on top of the task (and distillation) terms
        if not torch.isfinite(loss.detach()):  # stop before a NaN or infinite loss reaches the weights
            raise TrainingError(f"training step {step + 1}: the loss is {float(loss.detach())} (task loss "
                                f"{float(task_loss.detach())}); stopped, nothing saved from this pass: "
                                "lower learning_rate or check the data")
        accelerator.backward(loss / settings.gradient_accumulation_steps)
    return _MicroLosses(float(loss.detach()), float(task_loss.detach()), extra_raw, distill_raw)


def _add_micro(sums: dict[str, float], losses: _MicroLosses, micro: int) -> None:
    sums["loss"] += losses.loss / micro
    sums["task"] += losses.task / micro
    if losses.distill_raw is not None:
        sums["distill"] += losses.distill_raw / micro
    if losses.extra_raw is not None and not math.isnan(losses.extra_raw):
        sums["extra"] += losses.extra_raw
        sums["extra_n"] += 1


def _optimizer_step(run: _Run) -> None:
    if run.settings.max_grad_norm:
        run.accelerator.clip_grad_norm_([p for _, p in run.params], run.settings.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.ctx.enforce_constraints(run.model)


def _show_step(run: _Run, step: int, losses: _MicroLosses, bar) -> None:
    """The progress bar's figures, and the tracker's log of this step."""
    postfix = {"loss": f"{losses.loss:.4f}", "task": f"{losses.task:.4f}"}
    if losses.distill_raw is not None:
        postfix["distill"] = f"{losses.distill_raw:.4f}"
    if hasattr(run.extra_loss, "postfix"):  # the loss says what to show (its parts apart)
        postfix.update(run.extra_loss.postfix())
    elif losses.extra_raw is not None:
        postfix[run.extra_loss.label] = f"{losses.extra_raw:.4f}"
    bar.set_postfix(postfix, refresh=False)
    bar.update(1)
    if run.trackers:
        logged = {"loss": losses.loss, "task_loss": losses.task, "learning_rate": run.scheduler.get_last_lr()[0]}
        logged.update({k: float(v) for k, v in postfix.items() if k not in ("loss", "task") and _is_number(v)})
        run.accelerator.log(logged, step=step)


def _held_out_score(run: _Run, desc: str) -> tuple[float, float | None]:
    """(score, density) on the selection rows, computed on rank 0 and shared with every rank."""
    from accelerate.utils import broadcast_object_list

    from deftcompress.measurement.evaluation import evaluate

    ctx = run.ctx
    verdict = [None]
    if run.main:
        ev = evaluate(run.accelerator.unwrap_model(run.ddp_model), ctx.tokenizer, ctx.task, run.selection_rows,
                      ctx.arch, ctx.eval_settings, progress=not ctx.quiet, desc=desc)
        verdict = [(ev.task_score, ev.density.overall() if ev.density else None)]
        run.ddp_model.train()
    broadcast_object_list(verdict, from_process=0)
    return verdict[0]


def _evaluate_step(run: _Run, tally: _Tally) -> None:
    """`eval_steps`: score the weights now; keep them if they are the best eligible so far."""
    step = tally.step
    score, density = _held_out_score(run, f"eval step {step}")
    tally.step_evals.append({"step": step, "score": score, "density": density})
    if run.trackers:
        run.accelerator.log({"held_out_score": score, **({"held_out_density": density} if density is not None else {})},
                            step=step)
    if run.plan.eligible(step, density) and run.sign * score > tally.best_step_score:  # ties keep the earlier step
        tally.best_step, tally.best_step_score = step, run.sign * score
        tally.best_step_weights = _snapshot(run.params)


def _evaluate_epoch(run: _Run, tally: _Tally, log: EpochLog, epoch: int) -> None:
    """Score the epoch's weights into its log; keep them if they are the best eligible so far."""
    log.eval_score, log.eval_density = _held_out_score(run, f"eval epoch {epoch + 1}")
    if run.plan.eligible(tally.step, log.eval_density) and run.sign * log.eval_score > tally.best_score:
        tally.best_score, tally.best_epoch = run.sign * log.eval_score, epoch + 1  # ties keep the earlier epoch
        tally.best_weights = _snapshot(run.params) if epoch + 1 < run.plan.epochs_to_run else None


def _keep_best(run: _Run, tally: _Tally, where: str) -> list[str]:
    """Restore the chosen epoch's or step's weights (constraints enforced again); notes saying which."""
    settings, metric = run.settings, run.ctx.task.metric
    notes = []
    if run.plan.evaluate_epochs and not settings.eval_steps:
        if tally.best_weights is not None:
            _restore(run.params, tally.best_weights)
            run.ctx.enforce_constraints(run.model)
            notes.append(f"restored epoch {tally.best_epoch} (best {metric} on {where})")
    if tally.step_evals:
        if tally.best_step_weights is not None and tally.best_step != tally.step:
            _restore(run.params, tally.best_step_weights)
            run.ctx.enforce_constraints(run.model)
        among = f", among steps >= {run.plan.select_from} (after the density ramp)" if run.plan.select_from else ""
        if settings.select_max_density is not None:
            among += f" with held-out density <= {settings.select_max_density:.4g}"
        if tally.best_step_weights is None:  # no evaluation was eligible: the last weights stay
            tally.best_step = tally.step
            among += "; none was eligible, so the last step's weights stay"
        notes.append(f"kept step {tally.best_step} of {tally.step} (best {metric} on {where}, every "
                     f"{settings.eval_steps} steps{among})")
    return notes


def _finish(run: _Run, tally: _Tally, notes: list[str]) -> TrainResult:
    """The trained model unwrapped from DDP, in eval mode, and what training did."""
    model = run.accelerator.unwrap_model(run.ddp_model)
    model.eval()
    run.accelerator.free_memory()
    chosen = tally.epochs[-1].epoch
    if run.plan.evaluate_epochs and not run.settings.eval_steps:
        chosen = tally.best_epoch or chosen  # 0 only if every score was NaN: keep the last epoch
    steps, trainable = tally.step, sum(p.numel() for _, p in run.params)
    return TrainResult(model=model, epochs=tally.epochs, chosen_epoch=chosen, steps=steps,
                       train_seconds=tally.train_seconds, seconds_per_step=tally.train_seconds / max(steps, 1),
                       median_seconds_per_step=statistics.median(tally.step_seconds) if tally.step_seconds else 0.0,
                       world_size=run.world, trainable_params=trainable,
                       extra_label=run.extra_loss.label if run.extra_loss is not None else None, notes=notes,
                       step_evals=tally.step_evals, chosen_step=tally.best_step if tally.step_evals else None)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except (TypeError, ValueError):
        return False
    return True


def _check_trackers(trackers: list[str]) -> None:
    """One line naming the package a tracker needs, before anything trains."""
    import importlib.util

    from deftcompress.training.options import TRACKER_PACKAGES

    for tracker in trackers:
        package = TRACKER_PACKAGES.get(tracker, tracker)
        if importlib.util.find_spec(package) is None:
            raise TrainingError(f"report_to: {tracker} needs the {package} package (pip install {package})")
