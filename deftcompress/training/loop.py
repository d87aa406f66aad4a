"""A reusable training loop for passes that fine-tune (DEFT, ADA-DEFT, Taylor-importance pruning, ...).

    from deftcompress.training.loop import TrainSettings, train
    result = train(state, model, state.examples("train", 2000), TrainSettings(epochs=1, batch_size=32),
                   extra_loss=my_loss)              # optional; see `ExtraLoss`
    state.model = result.model

What it does:
- tokenises the task's train examples through `deftcompress.data.features` (the path evaluation
  uses too). Padding is dynamic (`longest`) or, with ``padding="max_length"``, to `max_seq_length` /
  `max_target_length` as the DEFT paper's code does;
- AdamW (no weight decay on biases and norms) with linear warm-up then linear decay
  (`transformers.get_linear_schedule_with_warmup`), gradient clipping;
- calls `state.enforce_constraints(model)` after every optimizer step (binding and releasing
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
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from deftcompress.errors import DeftcompressError
from deftcompress.data.features import Batch, collate, encode_examples
from deftcompress.training.distillation import distillation_term, teacher_logits
from deftcompress.training.options import TrainSettings  # noqa: F401  (the settings live with the options)

if TYPE_CHECKING:
    from deftcompress.pipeline.runner import PipelineState


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
    distill_loss: float | None = None  # raw distillation term (with a teacher), mean over the epoch's steps
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


def _forward_loss(model: nn.Module, batch: Batch):
    """(task loss, the model's output)."""
    out = model(**batch.inputs)
    loss = out.loss if hasattr(out, "loss") else out[0]
    if loss is None:
        raise TrainingError(f"{type(model).__name__} returned no loss; does it take `labels`?")
    return loss, out


def train(state: "PipelineState", model: nn.Module, examples: list[dict], settings: TrainSettings,
          extra_loss: ExtraLoss | None = None, parameter_groups: list[dict[str, Any]] | None = None,
          validation: list[dict] | None = None, logging_dir: str | None = None,
          teacher: nn.Module | None = None) -> TrainResult:
    """Train `model`'s trainable parameters on `examples` for `state.task`; see the module docstring.

    `validation`: held-out training rows for the evaluations that choose weights (`eval_steps`, the
    best epoch); without them the best epoch is chosen on the recipe's evaluation rows. `teacher`: a
    frozen model whose logits are matched too (`training.distillation`, weight `settings.distill_weight`).
    """
    from contextlib import nullcontext

    from accelerate import Accelerator
    from accelerate.utils import broadcast_object_list
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    from deftcompress.measurement.evaluation import evaluate

    if settings.mixed_precision == "fp16" and state.device.type != "cuda":
        raise TrainingError(f"mixed_precision: fp16 needs a GPU (this run is on {state.device.type}); use bf16")
    if settings.eval_steps and not validation:
        raise TrainingError("eval_steps needs held-out training rows (validation_fraction)")
    trackers = list(settings.report_to)
    _check_trackers(trackers)
    from accelerate.state import AcceleratorState

    # accelerate keeps one state per process; a later pass (or run) may ask for another precision.
    # The process group (PartialState) stays, so this is safe under torchrun as well.
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(cpu=state.device.type == "cpu", mixed_precision=settings.mixed_precision,
                              log_with=trackers or None, project_dir=logging_dir)
    world, main = accelerator.num_processes, accelerator.is_main_process
    if settings.batch_size % world:
        raise TrainingError(f"batch_size {settings.batch_size} does not split over {world} processes; use a multiple of {world}")
    params = trainable_parameters(model)
    if not params:
        raise TrainingError("the model has no trainable parameters")
    trainable = sum(p.numel() for _, p in params)

    features = encode_examples(state.tokenizer, state.task, state.arch, examples, settings.max_seq_length,
                               settings.max_target_length)
    micro = settings.gradient_accumulation_steps
    steps_per_epoch = len(_epoch_batches(len(features), settings.batch_size, world, settings.seed, 0)) // micro
    if steps_per_epoch == 0:
        raise TrainingError(f"{len(features)} training examples cannot fill one optimizer step ({micro} x "
                            f"{settings.batch_size} rows) over {world} processes")
    # As in transformers' Trainer, max_steps (when set) decides the length, however many epochs that takes.
    total_steps = settings.max_steps if settings.max_steps is not None else settings.epochs * steps_per_epoch
    epochs_to_run = math.ceil(total_steps / steps_per_epoch)
    evaluate_epochs = settings.eval_every_epoch and epochs_to_run > 1
    select_from = math.ceil(settings.select_from_ratio * total_steps)  # earlier evaluations are logged, not kept

    def eligible(at_step: int, density: float | None) -> bool:
        """Whether an evaluation may be kept: after `select_from`, and within the density bound where one is set."""
        if at_step < select_from:
            return False
        return settings.select_max_density is None or density is None or density <= settings.select_max_density
    selection_rows = validation or state.eval_examples()

    optimizer = torch.optim.AdamW(parameter_groups or default_parameter_groups(model, settings.weight_decay),
                                  lr=settings.learning_rate, weight_decay=settings.weight_decay)
    # The scheduler is stepped by hand once per optimizer step (accelerate's wrapper would step it once per process).
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(settings.warmup_ratio * total_steps), total_steps)
    ddp_model, optimizer = accelerator.prepare(model, optimizer)
    device = accelerator.device
    if trackers:
        accelerator.init_trackers(re.sub(r"[^A-Za-z0-9_.-]+", "_", settings.desc) or "train",
                                  config={k: v for k, v in asdict(settings).items() if isinstance(v, (int, float, str, bool))})
    sign = 1.0 if state.task.higher_is_better else -1.0  # perplexity: lower is better

    def held_out_score(desc: str):
        """(score, density) on the selection rows, computed on rank 0 and shared with every rank."""
        verdict = [None]
        if main:
            ev = evaluate(accelerator.unwrap_model(ddp_model), state.tokenizer, state.task, selection_rows, state.arch,
                          state.eval_settings(), progress=not state.quiet, desc=desc)
            verdict = [(ev.task_score, ev.density.overall() if ev.density else None)]
            ddp_model.train()
        broadcast_object_list(verdict, from_process=0)
        return verdict[0]

    epochs: list[EpochLog] = []
    step_evals: list[dict[str, Any]] = []
    best_score, best_epoch, best_weights = -math.inf, 0, None
    best_step, best_step_score, best_step_weights = 0, -math.inf, None
    step, train_seconds, step_seconds = 0, 0.0, []
    bar = tqdm(total=total_steps, desc=settings.desc, disable=state.quiet or not main, leave=False, unit="step")
    ddp_model.train()
    try:
        for epoch in range(epochs_to_run):
            sums = {"loss": 0.0, "task": 0.0, "extra": 0.0, "extra_n": 0, "distill": 0.0, "n": 0}
            epoch_start = time.perf_counter()
            batches = _epoch_batches(len(features), settings.batch_size, world, settings.seed, epoch)
            batches = batches[:len(batches) // micro * micro]  # whole optimizer steps only
            step_start = time.perf_counter()
            for b, global_batch in enumerate(batches):
                if step >= total_steps:
                    break
                mine = global_batch[accelerator.process_index::world]
                batch = collate(state.tokenizer, state.task, state.arch, [features[i] for i in mine], settings.padding,
                                settings.max_seq_length, settings.max_target_length).to(device)
                if extra_loss is not None:
                    extra_loss.begin_step(batch.token_masks, step, total_steps)
                last_micro = (b + 1) % micro == 0
                # DDP: gradients are all-reduced only on the micro-batch that ends an optimizer step
                with nullcontext() if last_micro or world == 1 else accelerator.no_sync(ddp_model):
                    task_loss, out = _forward_loss(ddp_model, batch)
                    loss, extra_raw, distill_raw = task_loss, None, None
                    if teacher is not None:
                        distill = distillation_term(out.logits, teacher_logits(teacher, batch.inputs),
                                                    settings.distill_temperature, state.task.kind == "regression")
                        distill_raw = float(distill.detach())
                        loss = loss + settings.distill_weight * distill
                    if extra_loss is not None:
                        extra_term, extra_raw = extra_loss.end_step()
                        if extra_term is not None:
                            loss = task_loss + extra_term
                    if not torch.isfinite(loss.detach()):  # stop before a NaN or infinite loss reaches the weights
                        raise TrainingError(f"training step {step + 1}: the loss is {float(loss.detach())} (task loss "
                                            f"{float(task_loss.detach())}); stopped, nothing saved from this pass: "
                                            "lower learning_rate or check the data")
                    accelerator.backward(loss / micro)
                loss_value, task_value = float(loss.detach()), float(task_loss.detach())
                sums["loss"] += loss_value / micro
                sums["task"] += task_value / micro
                if distill_raw is not None:
                    sums["distill"] += distill_raw / micro
                if extra_raw is not None and not math.isnan(extra_raw):
                    sums["extra"] += extra_raw
                    sums["extra_n"] += 1
                if not last_micro:
                    continue
                if settings.max_grad_norm:
                    accelerator.clip_grad_norm_([p for _, p in params], settings.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state.enforce_constraints(model)
                step += 1
                sums["n"] += 1
                step_seconds.append(time.perf_counter() - step_start)
                postfix = {"loss": f"{loss_value:.4f}", "task": f"{task_value:.4f}"}
                if distill_raw is not None:
                    postfix["distill"] = f"{distill_raw:.4f}"
                if hasattr(extra_loss, "postfix"):  # the loss says what to show (its parts apart)
                    postfix.update(extra_loss.postfix())
                elif extra_raw is not None:
                    postfix[extra_loss.label] = f"{extra_raw:.4f}"
                bar.set_postfix(postfix, refresh=False)
                bar.update(1)
                if trackers:
                    logged = {"loss": loss_value, "task_loss": task_value, "learning_rate": scheduler.get_last_lr()[0]}
                    logged.update({k: float(v) for k, v in postfix.items() if k not in ("loss", "task") and _is_number(v)})
                    accelerator.log(logged, step=step)
                if settings.eval_steps and step % settings.eval_steps == 0:
                    score, density = held_out_score(f"eval step {step}")
                    step_evals.append({"step": step, "score": score, "density": density})
                    if trackers:
                        accelerator.log({"held_out_score": score, **({"held_out_density": density} if density is not None else {})},
                                        step=step)
                    if eligible(step, density) and sign * score > best_step_score:  # ties keep the earlier step
                        best_step, best_step_score = step, sign * score
                        best_step_weights = _snapshot(params)
                step_start = time.perf_counter()  # after any evaluation: step times are optimisation only
            epoch_seconds = time.perf_counter() - epoch_start
            train_seconds += epoch_seconds
            log = EpochLog(epoch=epoch + 1, steps=sums["n"], train_loss=sums["loss"] / max(sums["n"], 1),
                           task_loss=sums["task"] / max(sums["n"], 1),
                           extra_loss=sums["extra"] / sums["extra_n"] if sums["extra_n"] else None,
                           distill_loss=sums["distill"] / max(sums["n"], 1) if teacher is not None else None,
                           seconds=epoch_seconds)
            if evaluate_epochs and not settings.eval_steps:
                log.eval_score, log.eval_density = held_out_score(f"eval epoch {epoch + 1}")
                if eligible(step, log.eval_density) and sign * log.eval_score > best_score:  # ties keep the earlier epoch
                    best_score, best_epoch = sign * log.eval_score, epoch + 1
                    best_weights = _snapshot(params) if epoch + 1 < epochs_to_run else None
            epochs.append(log)
            if step >= total_steps:
                break
    finally:
        bar.close()
        if trackers:
            accelerator.end_training()
    notes = []
    chosen = epochs[-1].epoch
    where = "held-out training rows" if validation else "the evaluation rows"
    if evaluate_epochs and not settings.eval_steps:
        chosen = best_epoch or chosen  # 0 only if every score was NaN: keep the last epoch
        if best_weights is not None:
            _restore(params, best_weights)
            state.enforce_constraints(model)
            notes.append(f"restored epoch {best_epoch} (best {state.task.metric} on {where})")
    if step_evals:
        if best_step_weights is not None and best_step != step:
            _restore(params, best_step_weights)
            state.enforce_constraints(model)
        among = f", among steps >= {select_from} (after the density ramp)" if select_from else ""
        if settings.select_max_density is not None:
            among += f" with held-out density <= {settings.select_max_density:.4g}"
        if best_step_weights is None:  # no evaluation was eligible: the last weights stay
            best_step = step
            among += "; none was eligible, so the last step's weights stay"
        notes.append(f"kept step {best_step} of {step} (best {state.task.metric} on {where}, every "
                     f"{settings.eval_steps} steps{among})")
    model = accelerator.unwrap_model(ddp_model)
    model.eval()
    accelerator.free_memory()
    return TrainResult(model=model, epochs=epochs, chosen_epoch=chosen, steps=step, train_seconds=train_seconds,
                       seconds_per_step=train_seconds / max(step, 1),
                       median_seconds_per_step=statistics.median(step_seconds) if step_seconds else 0.0,
                       world_size=world, trainable_params=trainable,
                       extra_label=extra_loss.label if extra_loss is not None else None, notes=notes,
                       step_evals=step_evals, chosen_step=best_step if step_evals else None)


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
