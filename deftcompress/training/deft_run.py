"""DEFT fine-tuning, shared by the `deft` and `ada_deft` passes (no pass imports another).

`run_deft(state, config, pass_name)` wraps `state.model` with the configured PEFT method, trains it
on the task loss plus the density loss (`training.density_loss`), folds the activation scales,
saves the adapter under the pass's folder, optionally merges it, and returns the report details.
With `gate_settings` (ADA-DEFT) it also trains a gate per MLP block (`training.block_gates`), folds
kept gates into their blocks and removes the skipped blocks (`architecture.skip`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from deftcompress.training.options import GateSettings

# Keep-best with a density target: only evaluations whose held-out density is at most the target times this
# (per-layer targets, an overall density: a little slack for layers that end a bit apart)
SELECT_DENSITY_SLACK = 1.1


def run_deft(state, c, pass_name: str, gate_settings: GateSettings | None = None,
             gate_lr: float | None = None) -> dict[str, Any]:
    """Train `state.model` as configured by `c` (PeftOptions + DensityOptions + TrainingOptions); see the module docstring."""
    import torch

    from deftcompress.architecture import mlp_blocks
    from deftcompress.peft_methods.wrapping import enable_mlp_bias, trainable_parameter_count, wrap_model
    from deftcompress.training.density_loss import DensityLoss
    from deftcompress.training.loop import train

    density_mode = c.density_mode or state.recipe.density_mode
    torch.manual_seed(state.seed)  # same adapter initialisation for PEFT and DEFT runs of one recipe
    total_params = sum(p.numel() for p in state.model.parameters())
    notes: list[str] = []
    side = state.arch.prompt_tuning_padding_side
    if c.method == "prompt" and side and state.tokenizer.padding_side != side:
        state.tokenizer.padding_side = side
        notes.append(f"tokenizer padding side set to {side} (prompt tuning of a {state.arch.family} classifier)")

    wrapped = wrap_model(state.model, state.arch, state.task, c.peft_settings())
    model = state.model = wrapped.model  # from here on the wrapped model is the pipeline's model
    notes += wrapped.notes
    trained_biases = enable_mlp_bias(model, state.arch) if c.train_mlp_bias else []
    temporary = []  # constraints that bind only this training
    scales = None
    use_scales = c.uses_activation_scales()
    if use_scales and c.activation_scale is None and _all_relu_like(model, state.arch):
        use_scales = False
        notes.append("activation scales off: ReLU activations are scale-equivariant (act(s x) / s = act(x)), so "
                     "scales cannot add zeros")
    if use_scales:
        scales, floor = _attach_scales(state, model, c.activation_scale_min)
        temporary.append(floor)
    gates = budget = None
    if gate_settings is not None:
        gates, budget, gate_range = _attach_gates(state, model, gate_settings)
        temporary.append(gate_range)
    groups = _parameter_groups(c, model, trained_biases, scales, gates, gate_lr)
    trainable = trainable_parameter_count(model)
    state.bind_constraints(model)

    train_rows = state.examples("train", c.max_train_samples)
    held_out = None
    if c.validation_fraction:  # rows that choose weights during training come from the training split, never dev
        train_rows, held_out = hold_out(train_rows, c.validation_fraction, state.seed)
    settings = c.train_settings(padding="max_length" if density_mode == "paper" else "longest",
                                max_seq_length=state.recipe.max_seq_length,
                                max_target_length=state.eval_settings().max_target_length, seed=state.seed,
                                desc=f"{pass_name} {c.method}")
    if c.density_weight > 0:  # choose weights only once the density target (or weight) is fully in force
        ramp_end = c.density_warmup_ratio + c.density_ramp_ratio
        if gate_settings is not None:
            ramp_end = max(ramp_end, gate_settings.decision_ratio)  # ADA-DEFT: after the skips are fixed
        settings = dataclasses.replace(settings, select_from_ratio=ramp_end,
                                       select_max_density=c.density_target * SELECT_DENSITY_SLACK
                                       if c.density_target is not None else None)
    density = DensityLoss(mlp_blocks(model, state.arch), c.density_loss_settings(density_mode))
    if scales is not None and c.density_grad == "scale_only":
        density.scale_only = scales.scale_of
    extra = density
    if budget is not None:
        from deftcompress.training.block_gates import CombinedLoss

        extra = CombinedLoss(density, budget)
    teacher = None
    if c.distill_from and c.distill_weight > 0:
        from deftcompress.training.distillation import load_teacher

        teacher = load_teacher(state, c.distill_from)
    try:
        with density:
            result = train(state, model, train_rows, settings, extra_loss=extra, parameter_groups=groups,
                           validation=held_out,
                           logging_dir=str(state.pass_dir(pass_name) / "logs") if c.report_to else None,
                           teacher=teacher)
    finally:
        for constraint in temporary:  # the scales and gates are folded below: their ranges bind nothing after this
            state.constraints.remove(constraint)
    model = result.model
    scale_state, scale_details = None, None
    if scales is not None:
        # Fold exactly into the weights: the model keeps its architecture and saves as a plain checkpoint.
        scale_state = scales.state_for_saving()
        fold = c.scale_fold(c.method)
        scale_details = scales.fold(model, fold)
        scale_details["fold"] = fold
        model._modules.pop("deftcompress_activation_scales", None)
    gate_details = None
    if gates is not None:
        gate_details = _finish_gates(state, model, gates, budget)
    adapter_dir = _save_adapter(state, pass_name, model, trained_biases, scale_state)
    plain_peft = _plain_peft_form(state, pass_name, model, wrapped, changed_base=bool(scale_state or trained_biases),
                                  skipped=bool(gate_details and gate_details["skipped"]))
    if c.merge:
        from deftcompress.peft_methods.wrapping import merge

        model = merge(model)
    state.enforce_constraints(model)
    state.release_constraints(model)
    state.model = model

    details: dict[str, Any] = {
        "method": c.method,
        "library": wrapped.library,
        "target_modules": wrapped.target_modules,
        "trainable_params": trainable,
        "trainable_fraction": round(trainable / max(total_params, 1), 6),
        "density_loss": density.describe(),
        "train_mlp_bias": c.train_mlp_bias,
        "activation_scales": scale_details or False,
        "distillation": {"from": c.distill_from, "weight": c.distill_weight, "temperature": c.distill_temperature,
                         "teacher_params": sum(p.numel() for p in teacher.parameters())} if teacher is not None else None,
        **{k: v for k, v in result.to_dict().items() if k not in ("trainable_params", "notes")},
        "train_rows": len(train_rows),
        "held_out_rows": len(held_out) if held_out else 0,
        "gradient_accumulation_steps": c.gradient_accumulation_steps,
        "mixed_precision": c.mixed_precision,
        "batch_size": c.batch_size,
        "adapter_dir": str(adapter_dir.relative_to(state.work_dir)),
        "plain_peft": plain_peft,
        "merged": c.merge,
        "notes": notes + result.notes,
    }
    if gate_details is not None:
        details["blocks"] = gate_details
        if gate_details["skipped"]:
            details["notes"].append("the adapter applies to this run's model (skipped blocks removed, block weights "
                                    "folded), not to the original base checkpoint")
    if wrapped.quantization:
        details["quantization"] = wrapped.quantization
    return details


def _plain_peft_form(state, pass_name, model, wrapped, changed_base: bool, skipped: bool) -> dict[str, Any]:
    """How plain peft reloads this pass's adapter onto the model the pass started from (no deftcompress
    import): the library adapter as it is when the base weights did not change, else a second form with
    the changed MLP layers as modules_to_save (`peft_methods.plain_peft`), or why neither can."""
    from deftcompress.architecture import mlp_blocks
    from deftcompress.measurement.size import directory_bytes
    from deftcompress.peft_methods.plain_peft import PLAIN_PEFT_DIR, save_plain_peft_adapter
    from deftcompress.training import distributed

    earlier = [p.name for p in state.recipe.plan[:max(state.step_index - 1, 0)] if p.cls.changes_model]
    onto = (f"the recipe's model ({state.recipe.model})" if not earlier else
            f"the model this step started from (after {', '.join(earlier)})")
    adapter_dir = state.pass_dir(pass_name) / "adapter"
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
        return {"dir": str(adapter_dir.relative_to(state.work_dir)), "loads_onto": onto,
                "bytes": directory_bytes(adapter_dir)}
    inner = model.get_base_model()
    names = [b.names[part] for b in mlp_blocks(inner, state.arch) for part in ("up", "down")]
    folder = state.pass_dir(pass_name) / PLAIN_PEFT_DIR
    info = {"bytes": None}
    if distributed.is_main_process():
        info = save_plain_peft_adapter(model, folder, names)
    distributed.barrier()
    return {"dir": str(folder.relative_to(state.work_dir)), "loads_onto": onto, "bytes": info["bytes"],
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


def _attach_scales(state, model, min_scale: float):
    """Per-neuron activation scales, trained with the adapter; a constraint keeps them >= their floor."""
    from deftcompress.architecture import mlp_blocks
    from deftcompress.training.activation_scale import ActivationScales, ScaleFloor

    scales = ActivationScales(mlp_blocks(model, state.arch), min_scale=min_scale)
    model.add_module("deftcompress_activation_scales", scales)  # its parameters train with the adapter
    scales.attach()
    floor = ScaleFloor(scales)
    state.constraints.append(floor)
    return scales, floor


def _attach_gates(state, model, settings: GateSettings):
    """ADA-DEFT: a gate per MLP block on the model (so DDP and the optimizer see it), its budget and range."""
    from deftcompress.architecture import mlp_blocks
    from deftcompress.training.block_gates import BlockGates, GateBudget, GateRange

    gates = BlockGates(mlp_blocks(model, state.arch), trainable=settings.trains_gates)
    budget = GateBudget(gates, settings)  # checks the budget against the stacks before anything trains
    model.add_module("deftcompress_block_gates", gates)
    gates.attach()
    gate_range = GateRange(gates)
    state.constraints.append(gate_range)
    return gates, budget, gate_range


def _finish_gates(state, model, gates, budget) -> dict[str, Any]:
    """Fold kept gates into their blocks, remove the skipped blocks and record them in the layout."""
    from deftcompress.architecture.layout import record_layout
    from deftcompress.architecture.skip import skip_mlp_blocks

    details = {**gates.finish(), **budget.describe()}
    model._modules.pop("deftcompress_block_gates", None)
    removed = skip_mlp_blocks(model, details["skipped"], state.arch) if details["skipped"] else []
    if removed:
        state.forget_modules(removed)  # e.g. zero masks of the removed weights
        record_layout(model, state.arch)
    details["removed_modules"] = len(removed)
    return details


def _parameter_groups(c, model, trained_biases, scales, gates, gate_lr):
    """AdamW groups when some parameters have their own learning rate (MLP biases, activation scales, gates)."""
    from deftcompress.training.loop import default_parameter_groups

    rates: dict[int, float] = {}
    if scales is not None:
        rates.update({id(p): c.activation_scale_lr for p in scales.parameters()})
    if c.mlp_bias_lr is not None:
        rates.update({id(p): c.mlp_bias_lr for _, p in trained_biases})
    if gates is not None and gate_lr is not None:
        rates.update({id(p): gate_lr for p in gates.parameters()})
    return default_parameter_groups(model, c.weight_decay, rates) if rates else None


def _save_adapter(state, pass_name, model, trained_biases, scale_state):
    """The adapter in its library's format under passes/NN_<pass>/adapter/, with the scales it was trained on."""
    from deftcompress.peft_methods.saving import save_adapter
    from deftcompress.training import distributed
    from deftcompress.architecture.activation_scale import SAVED_SCALES_FILE

    adapter_dir = state.pass_dir(pass_name) / "adapter"
    if distributed.is_main_process():
        save_adapter(model, adapter_dir, trained_biases)
        if scale_state is not None:
            from safetensors.torch import save_file

            # Trained on scaled MLPs: these scales (already folded into the model) belong with the adapter.
            save_file(scale_state, str(adapter_dir / SAVED_SCALES_FILE))  # read by load_adapter_into
    distributed.barrier()
    return adapter_dir
