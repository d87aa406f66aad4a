"""DEFT fine-tuning, shared by the `deft` and `ada_deft` passes (no pass imports another).

`run_deft(ctx, config)` wraps `ctx.model` (a `TrainingContext`) with the configured PEFT method,
trains it on the task loss plus the density loss (`training.density_loss`), folds the activation
scales, saves the adapter under the pass's folder, optionally merges it, and returns the model to
hand on with the report details (`DeftResult`).
With `gate_settings` (ADA-DEFT) it also trains a gate per MLP block (`training.block_gates`), folds
kept gates into their blocks and removes the skipped blocks (`architecture.skip`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from deftcompress.training.context import TrainingContext
from deftcompress.training.options import GateSettings

# Keep-best with a density target: only evaluations whose held-out density is at most the target times this
# (per-layer targets, an overall density: a little slack for layers that end a bit apart)
SELECT_DENSITY_SLACK = 1.1


@dataclass
class DeftResult:
    """What `run_deft` made: the model to hand on (wrapped, or merged with `merge`) and the report details."""

    model: Any
    details: dict[str, Any]


@dataclass
class _Trainables:
    """What trains beside the adapter: MLP biases, activation scales, block gates and the gates' budget."""

    biases: list = field(default_factory=list)
    scales: Any = None
    gates: Any = None
    budget: Any = None
    temporary: list = field(default_factory=list)  # constraints that bind only this training


@dataclass
class _Folded:
    """What `_fold_and_save` did: the model to hand on and what was folded and saved."""

    model: Any
    scale_details: dict[str, Any] | None
    gate_details: dict[str, Any] | None
    adapter_dir: str  # relative to the run's folder
    plain_peft: dict[str, Any]


def run_deft(ctx: TrainingContext, c, gate_settings: GateSettings | None = None,
             gate_lr: float | None = None, teacher=None) -> DeftResult:
    """Train `ctx.model` as configured by `c` (PeftOptions + DensityOptions + TrainingOptions); see the module docstring.
    `teacher`: a frozen model to distil from, given instead of `c.distill_from` (the budget's reference)."""
    from deftcompress.peft_methods.wrapping import trainable_parameter_count

    density_mode = c.density_mode or ctx.density_mode
    total_params = sum(p.numel() for p in ctx.model.parameters())
    notes: list[str] = []
    wrapped = _wrap(ctx, c, notes)
    model = wrapped.model
    extras = _attach_trainables(ctx, c, model, gate_settings, notes)
    groups = _parameter_groups(c, model, extras.biases, extras.scales, extras.gates, gate_lr)
    trainable = trainable_parameter_count(model)
    ctx.bind_constraints(model)
    train_rows, held_out = _training_rows(ctx, c)
    settings = _train_settings(ctx, c, density_mode, gate_settings)
    density, extra = _extra_losses(ctx, c, model, density_mode, extras)
    teacher = teacher if teacher is not None else _teacher(ctx, c)
    result = _train(ctx, c, model, train_rows, held_out, settings, density, extra, groups, teacher, extras.temporary)
    folded = _fold_and_save(ctx, c, result.model, wrapped, extras)
    details = _report(c, wrapped, result, folded, total_params=total_params, trainable=trainable, density=density,
                      teacher=teacher, train_rows=train_rows, held_out=held_out, notes=notes)
    return DeftResult(model=folded.model, details=details)


# ---- the stages of `run_deft` -------------------------------------------------------------------

def _wrap(ctx: TrainingContext, c, notes: list[str]):
    """The model wrapped with the configured PEFT method (peft changes the model it wraps in place)."""
    import torch

    from deftcompress.peft_methods.wrapping import wrap_model

    torch.manual_seed(ctx.seed)  # same adapter initialisation for PEFT and DEFT runs of one recipe
    side = ctx.arch.prompt_tuning_padding_side
    if c.method == "prompt" and side and ctx.tokenizer.padding_side != side:
        ctx.tokenizer.padding_side = side
        notes.append(f"tokenizer padding side set to {side} (prompt tuning of a {ctx.arch.family} classifier)")
    wrapped = wrap_model(ctx.model, ctx.arch, ctx.task, c.peft_settings())
    notes += wrapped.notes
    return wrapped


def _attach_trainables(ctx: TrainingContext, c, model, gate_settings: GateSettings | None,
                       notes: list[str]) -> _Trainables:
    """MLP biases, activation scales and (ADA-DEFT) block gates, as configured, with the constraints they need."""
    from deftcompress.peft_methods.wrapping import enable_mlp_bias

    extras = _Trainables(biases=enable_mlp_bias(model, ctx.arch) if c.train_mlp_bias else [])
    use_scales = c.uses_activation_scales()
    if use_scales and c.activation_scale is None and _all_relu_like(model, ctx.arch):
        use_scales = False
        notes.append("activation scales off: ReLU activations are scale-equivariant (act(s x) / s = act(x)), so "
                     "scales cannot add zeros")
    if use_scales:
        extras.scales, floor = _attach_scales(ctx, model, c.activation_scale_min)
        extras.temporary.append(floor)
    if gate_settings is not None:
        extras.gates, extras.budget, gate_range = _attach_gates(ctx, model, gate_settings)
        extras.temporary.append(gate_range)
    return extras


def _training_rows(ctx: TrainingContext, c) -> tuple[list[dict], list[dict] | None]:
    """(rows to train on, held-out rows or None); rows that choose weights come from the training split, never dev."""
    train_rows = ctx.train_examples(c.max_train_samples)
    held_out = None
    if c.validation_fraction:
        train_rows, held_out = hold_out(train_rows, c.validation_fraction, ctx.seed)
    return train_rows, held_out


def _train_settings(ctx: TrainingContext, c, density_mode: str, gate_settings: GateSettings | None):
    settings = c.train_settings(padding="max_length" if density_mode == "paper" else "longest",
                                max_seq_length=ctx.max_seq_length,
                                max_target_length=ctx.eval_settings.max_target_length, seed=ctx.seed,
                                desc=f"{ctx.pass_name} {c.method}")
    if c.density_weight > 0:  # choose weights only once the density target (or weight) is fully in force
        ramp_end = c.density_warmup_ratio + c.density_ramp_ratio
        if gate_settings is not None:
            ramp_end = max(ramp_end, gate_settings.decision_ratio)  # ADA-DEFT: after the skips are fixed
        settings = dataclasses.replace(settings, select_from_ratio=ramp_end,
                                       select_max_density=c.density_target * SELECT_DENSITY_SLACK
                                       if c.density_target is not None else None)
    return settings


def _extra_losses(ctx: TrainingContext, c, model, density_mode: str, extras: _Trainables):
    """(the density loss, what the loop adds to the task loss: the density loss, with the gates' budget if any)."""
    from deftcompress.architecture import mlp_blocks
    from deftcompress.training.density_loss import DensityLoss

    density = DensityLoss(mlp_blocks(model, ctx.arch), c.density_loss_settings(density_mode))
    if extras.scales is not None and c.density_grad == "scale_only":
        density.scale_only = extras.scales.scale_of
    if extras.budget is None:
        return density, density
    from deftcompress.training.block_gates import CombinedLoss

    return density, CombinedLoss(density, extras.budget)


def _teacher(ctx: TrainingContext, c):
    if not (c.distill_from and (c.distill_weight > 0 or c.distill_features > 0)):
        return None
    from deftcompress.training.distillation import load_teacher

    return load_teacher(ctx, c.distill_from)


def _train(ctx: TrainingContext, c, model, train_rows, held_out, settings, density, extra, groups, teacher,
           temporary: list):
    """The training loop with the density loss hooked in; this training's own constraints removed after it."""
    from deftcompress.training import loop

    try:
        with density:
            return loop.train(ctx, model, train_rows, settings, extra_loss=extra, parameter_groups=groups,
                              validation=held_out, logging_dir=str(ctx.pass_dir / "logs") if c.report_to else None,
                              teacher=teacher)
    finally:
        for constraint in temporary:  # the scales and gates are folded next: their ranges bind nothing after this
            ctx.constraints.remove(constraint)


def _fold_and_save(ctx: TrainingContext, c, model, wrapped, extras: _Trainables) -> _Folded:
    """Fold the scales and gates into the weights, save the adapter (and its plain-peft form), merge if asked."""
    scale_state, scale_details = None, None
    if extras.scales is not None:
        # Fold exactly into the weights: the model keeps its architecture and saves as a plain checkpoint.
        scale_state = extras.scales.state_for_saving()
        fold = c.scale_fold(c.method)
        scale_details = extras.scales.fold(model, fold)
        scale_details["fold"] = fold
        model._modules.pop("deftcompress_activation_scales", None)
    gate_details = None
    if extras.gates is not None:
        gate_details = _finish_gates(ctx, model, extras.gates, extras.budget)
    adapter_dir = _save_adapter(ctx, model, extras.biases, scale_state)
    plain_peft = _plain_peft_form(ctx, model, wrapped, changed_base=bool(scale_state or extras.biases),
                                  skipped=bool(gate_details and gate_details["skipped"]))
    if c.merge:
        from deftcompress.peft_methods.wrapping import merge

        model = merge(model)
    ctx.enforce_constraints(model)
    ctx.release_constraints(model)
    return _Folded(model=model, scale_details=scale_details, gate_details=gate_details,
                   adapter_dir=ctx.relative(adapter_dir), plain_peft=plain_peft)


def _report(c, wrapped, result, folded: _Folded, *, total_params: int, trainable: int, density, teacher,
            train_rows: list[dict], held_out: list[dict] | None, notes: list[str]) -> dict[str, Any]:
    """The pass's details for the report: what trained, how, on what, and where the adapter went."""
    details: dict[str, Any] = {
        "method": c.method,
        "library": wrapped.library,
        "target_modules": wrapped.target_modules,
        "trainable_params": trainable,
        "trainable_fraction": round(trainable / max(total_params, 1), 6),
        "density_loss": density.describe(),
        "train_mlp_bias": c.train_mlp_bias,
        "activation_scales": folded.scale_details or False,
        "distillation": {"from": c.distill_from, "weight": c.distill_weight, "temperature": c.distill_temperature,
                         "features_weight": c.distill_features,
                         "teacher_params": sum(p.numel() for p in teacher.parameters())} if teacher is not None else None,
        **{k: v for k, v in result.to_dict().items() if k not in ("trainable_params", "notes")},
        "train_rows": len(train_rows),
        "held_out_rows": len(held_out) if held_out else 0,
        "gradient_accumulation_steps": c.gradient_accumulation_steps,
        "mixed_precision": c.mixed_precision,
        "batch_size": c.batch_size,
        "adapter_dir": folded.adapter_dir,
        "plain_peft": folded.plain_peft,
        "merged": c.merge,
        "notes": notes + result.notes,
    }
    gate_details = folded.gate_details
    if gate_details is not None:
        details["blocks"] = gate_details
        if gate_details["skipped"]:
            details["notes"].append("the adapter applies to this run's model (skipped blocks removed, block weights "
                                    "folded), not to the original base checkpoint")
    if wrapped.quantization:
        details["quantization"] = wrapped.quantization
    return details


def _plain_peft_form(ctx: TrainingContext, model, wrapped, changed_base: bool, skipped: bool) -> dict[str, Any]:
    """How plain peft reloads this pass's adapter onto the model the pass started from (no deftcompress
    import): the library adapter as it is when the base weights did not change, else a second form with
    the changed MLP layers as modules_to_save (`peft_methods.plain_peft`), or why neither can."""
    from deftcompress.architecture import mlp_blocks
    from deftcompress.measurement.size import directory_bytes
    from deftcompress.peft_methods.plain_peft import PLAIN_PEFT_DIR, save_plain_peft_adapter
    from deftcompress.training import distributed

    earlier = ctx.earlier_passes
    onto = (f"the recipe's model ({ctx.model_ref})" if not earlier else
            f"the model this step started from (after {', '.join(earlier)})")
    adapter_dir = ctx.pass_dir / "adapter"
    if wrapped.library != "peft":
        why = "a bottleneck adapter is adapters' format, not peft's"
        if changed_base:
            why += ("; it was trained on rescaled MLP weights: load model/ (base/ holds them) or use "
                    "deftcompress.load_model")
        return {"dir": None, "why_not": why}
    if skipped:
        return {"dir": None, "why_not": "ADA-DEFT removed MLP blocks: the adapter applies to this run's model only"}
    if wrapped.quantization:
        return {"dir": None, "why_not": "QLoRA's activation scales live beside the activations of a 4-bit base, which "
                                        "plain peft cannot rebuild; model/ is a stock float checkpoint with them folded in"}
    if not changed_base:
        return {"dir": ctx.relative(adapter_dir), "loads_onto": onto,
                "bytes": directory_bytes(adapter_dir)}
    inner = model.get_base_model()
    names = [b.names[part] for b in mlp_blocks(inner, ctx.arch) for part in ("up", "down")]
    folder = ctx.pass_dir / PLAIN_PEFT_DIR
    info = {"bytes": None}
    if distributed.is_main_process():
        info = save_plain_peft_adapter(model, folder, names)
    distributed.barrier()
    return {"dir": ctx.relative(folder), "loads_onto": onto, "bytes": info["bytes"],
            "modules_to_save": len(names),
            "why": "activation scales (and trained MLP biases) changed the MLP weights the adapter was trained on: "
                   "those layers travel whole"}


def _all_relu_like(model, arch) -> bool:
    from deftcompress.architecture import mlp_blocks
    from deftcompress.architecture.activation import is_relu_like

    return all(is_relu_like(b.act) for b in mlp_blocks(model, arch))


def hold_out(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(training rows, held-out rows): a seeded split of the training split, at least one row on each side."""
    import random

    order = list(range(len(rows)))
    random.Random(seed + 7).shuffle(order)
    n = min(max(1, round(fraction * len(rows))), len(rows) - 1)
    held = set(order[:n])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


def _attach_scales(ctx: TrainingContext, model, min_scale: float):
    """Per-neuron activation scales, trained with the adapter; a constraint keeps them >= their floor."""
    from deftcompress.architecture import mlp_blocks
    from deftcompress.training.activation_scale import ActivationScales, ScaleFloor

    scales = ActivationScales(mlp_blocks(model, ctx.arch), min_scale=min_scale)
    model.add_module("deftcompress_activation_scales", scales)  # its parameters train with the adapter
    scales.attach()
    floor = ScaleFloor(scales)
    ctx.constraints.append(floor)
    return scales, floor


def _attach_gates(ctx: TrainingContext, model, settings: GateSettings):
    """ADA-DEFT: a gate per MLP block on the model (so DDP and the optimizer see it), its budget and range."""
    from deftcompress.architecture import mlp_blocks
    from deftcompress.training.block_gates import BlockGates, GateBudget, GateRange

    gates = BlockGates(mlp_blocks(model, ctx.arch), trainable=settings.trains_gates)
    budget = GateBudget(gates, settings)  # checks the budget against the stacks before anything trains
    model.add_module("deftcompress_block_gates", gates)
    gates.attach()
    gate_range = GateRange(gates)
    ctx.constraints.append(gate_range)
    return gates, budget, gate_range


def _finish_gates(ctx: TrainingContext, model, gates, budget) -> dict[str, Any]:
    """Fold kept gates into their blocks, remove the skipped blocks and record them in the layout."""
    from deftcompress.architecture.layout import record_layout
    from deftcompress.architecture.skip import skip_mlp_blocks

    details = {**gates.finish(), **budget.describe()}
    model._modules.pop("deftcompress_block_gates", None)
    removed = skip_mlp_blocks(model, details["skipped"], ctx.arch) if details["skipped"] else []
    if removed:
        ctx.forget_modules(removed)  # e.g. zero masks of the removed weights
        record_layout(model, ctx.arch)
    details["removed_modules"] = len(removed)
    return details


def _parameter_groups(c, model, trained_biases, scales, gates, gate_lr):
    """AdamW groups when some parameters have their own learning rate (MLP biases, activation scales, gates,
    LoRA+'s B matrices)."""
    from deftcompress.training.loop import default_parameter_groups

    rates: dict[int, float] = {}
    if scales is not None:
        rates.update({id(p): c.activation_scale_lr for p in scales.parameters()})
    if c.mlp_bias_lr is not None:
        rates.update({id(p): c.mlp_bias_lr for _, p in trained_biases})
    if gates is not None and gate_lr is not None:
        rates.update({id(p): gate_lr for p in gates.parameters()})
    if c.lora_plus_ratio is not None:  # LoRA+: B learns faster than A
        rates.update({id(p): c.learning_rate * c.lora_plus_ratio for name, p in model.named_parameters()
                      if p.requires_grad and ".lora_B." in name})
    return default_parameter_groups(model, c.weight_decay, rates) if rates else None


def _save_adapter(ctx: TrainingContext, model, trained_biases, scale_state):
    """The adapter in its library's format under passes/NN_<pass>/adapter/, with the scales it was trained on."""
    from deftcompress.peft_methods.saving import save_adapter
    from deftcompress.training import distributed
    from deftcompress.architecture.activation_scale import SAVED_SCALES_FILE

    adapter_dir = ctx.pass_dir / "adapter"
    if distributed.is_main_process():
        save_adapter(model, adapter_dir, trained_biases)
        if scale_state is not None:
            from safetensors.torch import save_file

            # Trained on scaled MLPs: these scales (already folded into the model) belong with the adapter.
            save_file(scale_state, str(adapter_dir / SAVED_SCALES_FILE))  # read by load_adapter_into
        if scale_state or trained_biases:  # wrong on the untouched base (the test of changed_base): not for peft alone
            from deftcompress.peft_methods.saving import hide_from_plain_loaders

            hide_from_plain_loaders(adapter_dir)
    distributed.barrier()
    return adapter_dir
