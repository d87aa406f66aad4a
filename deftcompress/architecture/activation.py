"""Replacing the MLP activation (relufication), recorded in the config so the model reloads with it.

GELU and SiLU are almost never exactly zero (SiLU in float32 only below -88.7), so a model keeps
nearly every activation nonzero however it is trained. ReLU is zero for every negative input;
a shifted ReLU (FATReLU: x if x > t else 0) also zeroes small positive ones. In gated MLPs the gate's
activation is the one replaced (Llama: act_fn(gate_proj(x)) * up_proj(x)), as ProSparse and
TurboSparse do. Fine-tuning afterwards (DEFT) recovers the accuracy.

The config records what was done (`deftcompress_activation`); where the family's own config can
say it (plain ReLU: BERT's and Llama's `hidden_act`, T5's `feed_forward_proj`), that is set too,
so stock `from_pretrained` rebuilds the same model; a shifted ReLU needs deftcompress to reload.
"""

from __future__ import annotations

from typing import Any, Literal

import torch.nn.functional as F
from torch import nn

from deftcompress.architecture.locate import mlp_blocks, model_config, spec_for
from deftcompress.architecture.spec import ArchSpec

ACTIVATION_RECORD = "deftcompress_activation"
THRESHOLD_RECORD = "deftcompress_activation_thresholds"  # {"format": 1, "thresholds": {block label: cutoff}}
Kind = Literal["relu", "shifted_relu"]


class ShiftedReLU(nn.Module):
    """x where x > threshold, else exactly 0 (FATReLU)."""

    def __init__(self, threshold: float):
        super().__init__()
        self.threshold = float(threshold)

    def forward(self, x):
        return F.threshold(x, self.threshold, 0.0)

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}"


class ThresholdedActivation(nn.Module):
    """act(x) where |act(x)| > threshold, else exactly 0: a per-layer cutoff calibrated on data (CATS, TEAL), which
    gives exact zeros to activations such as SiLU and GELU that are never exactly zero themselves."""

    def __init__(self, act: nn.Module, threshold: float):
        super().__init__()
        self.act = act
        self.threshold = float(threshold)

    def forward(self, x):
        y = self.act(x)
        return y.masked_fill(y.abs() <= self.threshold, 0.0)

    def extra_repr(self) -> str:
        return f"threshold={self.threshold:.6g}"


def innermost_activation(block) -> tuple[nn.Module, Any]:
    """The activation function of an MLP block and what holds it: DEFT's scaled activation or the layer itself."""
    holder = block.act if hasattr(block.act, "act") and hasattr(block.act, "inverse_scale") else None
    return (holder.act if holder is not None else block.act), holder


def set_thresholds(model: nn.Module, thresholds: dict[str, float], arch: ArchSpec | None = None) -> int:
    """Put a cutoff on the activation of each block named in `thresholds` (replacing an earlier cutoff) and record them
    in the config, so the model reloads with the same zeros. Returns the number of blocks changed."""
    arch = arch or spec_for(model)
    count = 0
    for block in mlp_blocks(model, arch):
        if block.label not in thresholds:
            continue
        act, holder = innermost_activation(block)
        base = act.act if isinstance(act, ThresholdedActivation) else act
        new = ThresholdedActivation(base, thresholds[block.label])
        if holder is not None:
            holder.act = new
        else:
            model.set_submodule(block.names["act"], new)
            block.act = new
        count += 1
    setattr(model_config(model), THRESHOLD_RECORD, {"format": 1, "thresholds": dict(thresholds)})
    return count


def new_activation(kind: Kind, threshold: float = 0.0) -> nn.Module:
    return nn.ReLU() if kind == "relu" else ShiftedReLU(threshold)


def is_relu_like(module: nn.Module) -> bool:
    """ReLU-family activations are scale-equivariant (act(s x) / s = act(x)), so DEFT's activation scales cannot
    create zeros there."""
    inner = getattr(module, "act", module)  # a ScaledActivation's own activation
    return isinstance(inner, (nn.ReLU, ShiftedReLU))


def replace_activations(model: nn.Module, kind: Kind, threshold: float = 0.0, arch: ArchSpec | None = None) -> dict[str, Any]:
    """Put `kind` in place of every MLP activation of `model`; record it in the config. Returns what changed."""
    arch = arch or spec_for(model)
    replaced: dict[str, int] = {}
    labels = []
    for block in mlp_blocks(model, arch):
        old, holder = innermost_activation(block)
        replaced[type(old).__name__] = replaced.get(type(old).__name__, 0) + 1
        new = new_activation(kind, threshold)
        if holder is not None:  # DEFT's scales stay around the activation
            holder.act = new
        else:
            model.set_submodule(block.names["act"], new)
            block.act = new
        labels.append(block.label)
    stock = _set_stock_activation(model, arch) if kind == "relu" else False
    setattr(model_config(model), ACTIVATION_RECORD,
            {"format": 1, "kind": kind, "threshold": threshold, "layers": labels, "stock": stock})
    return {"layers": len(labels), "replaced": replaced, "kind": kind, "threshold": threshold,
            "stock_config": stock}


def _set_stock_activation(model: nn.Module, arch: ArchSpec) -> bool:
    """Say "relu" in the family's own config field, so stock `from_pretrained` builds ReLU too."""
    if not arch.activation_attr:
        return False
    config = model_config(model)
    prefix = arch.gated_activation_prefix if getattr(config, "is_gated_act", False) else ""
    setattr(config, arch.activation_attr, prefix + "relu")
    if hasattr(config, "dense_act_fn"):  # T5 derives it from feed_forward_proj when it reads the config
        config.dense_act_fn = "relu"
    return True


def needs_rebuild(config) -> bool:
    """A recorded activation that the family's own config cannot express (a shifted ReLU, calibrated cutoffs)."""
    record = getattr(config, ACTIVATION_RECORD, None)
    return (bool(record) and not record.get("stock", False)) or bool(getattr(config, THRESHOLD_RECORD, None))


def apply_recorded_activation(model: nn.Module) -> int:
    """Rebuild the recorded activations in a model built from its config (before its weights load)."""
    config = model_config(model)
    record = getattr(config, ACTIVATION_RECORD, None)
    count = 0
    if record and not record.get("stock"):
        wanted = set(record.get("layers", []))
        for block in mlp_blocks(model):
            if block.label in wanted:
                model.set_submodule(block.names["act"], new_activation(record["kind"], record.get("threshold", 0.0)))
                count += 1
    cutoffs = getattr(config, THRESHOLD_RECORD, None)
    if cutoffs:
        if not isinstance(cutoffs, dict) or cutoffs.get("format") != 1 or not isinstance(cutoffs.get("thresholds"), dict) \
                or not all(isinstance(v, (int, float)) and v >= 0 for v in cutoffs["thresholds"].values()):
            from deftcompress.errors import ArchitectureError

            raise ArchitectureError(f"{THRESHOLD_RECORD}: not a record of activation cutoffs this version writes")
        count += set_thresholds(model, {k: float(v) for k, v in cutoffs["thresholds"].items()})
    return count
