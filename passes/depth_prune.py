"""`depth_prune`: remove whole transformer layers, the least influential first; the result is the stock model, shallower.

On a small encoder at batch 1 about half of the time sits outside the MLP blocks (attention, layer
norms, per-operator overhead: docs/deployment.md), where no activation lever reaches; removing whole
layers removes all of it. Which layers go is decided by block influence (ShortGPT, Men et al. 2024):
1 - cos(hidden state in, hidden state out) over the real tokens of a few hundred training rows, no
labels; the `layers` least influential go, or the ones listed in `remove`. A training pass afterwards
(DEFT, ADA-DEFT, plain PEFT) recovers the task score. The saved config names the new layer count, so
stock `from_pretrained` builds the shallower model exactly (no deftcompress needed to load it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from deftcompress.core.config import PassConfig, option
from deftcompress.core.protocol import ADAPTER, ZERO_MASK, Need, Pass
from deftcompress.core.registry import register_pass
from deftcompress.errors import DeftcompressError


class DepthPruningError(DeftcompressError):
    """The model's layers cannot be removed as configured."""


@dataclass
class DepthPruneConfig(PassConfig):
    layers: int = option(1, "number of layers removed, the least influential first (ignored when `remove` lists them)")
    remove: list[int] | None = option(None, "layer indices to remove instead (0 = the first layer); scores are still "
                                            "measured and reported")
    calibration_samples: int = option(256, "training rows whose hidden states score each layer's influence")
    calibration_batch_size: int = option(16, "rows per calibration batch")

    def problem(self) -> str | None:
        if self.remove is not None:
            if not self.remove or any(not isinstance(i, int) or i < 0 for i in self.remove) or len(set(self.remove)) != len(self.remove):
                return f"remove must list distinct layer indices >= 0, got {self.remove}"
        elif not 1 <= self.layers <= 1_000:
            return f"layers must be in [1, 1000], got {self.layers}"
        if not 1 <= self.calibration_samples <= 100_000:
            return f"calibration_samples must be in [1, 100000], got {self.calibration_samples}"
        if not 1 <= self.calibration_batch_size <= 4_096:
            return f"calibration_batch_size must be in [1, 4096], got {self.calibration_batch_size}"
        return None


@register_pass
class DepthPrune(Pass):
    name = "depth_prune"
    Config = DepthPruneConfig
    summary = ("Remove whole layers, the least influential on training rows first (block influence); "
               "saved as the stock model with fewer layers.")

    @classmethod
    def needs_train_data(cls, config) -> bool:
        return True  # calibration rows come from the training split, never from evaluation rows

    @classmethod
    def needs(cls, config) -> list[Need]:
        return super().needs(config) + [
            Need(ADAPTER, False, "{here}: {earlier} leaves its adapter on the model; remove layers before training, "
                                 "or set merge: true there"),
            Need(ZERO_MASK, False, "{here}: {earlier} keeps {note} by layer position, which removing layers renumbers; "
                                   "put depth_prune before it"),
        ]

    @classmethod
    def label(cls, config) -> str:
        return f"depth-{len(config.remove) if config.remove is not None else config.layers}"

    def run(self, state) -> dict[str, Any]:
        from deftcompress.architecture.depth import layer_labels, remove_layers
        from deftcompress.data.features import calibration_inputs
        from deftcompress.measurement.layer_influence import block_influence
        from deftcompress.measurement.size import count_parameters
        from deftcompress.peft_methods.wrapping import is_wrapped
        from deftcompress.quantization.bnb import is_quantized
        from deftcompress.quantization.torch_int8 import quantized_modules

        c, model, arch = self.config, state.model, state.arch
        if arch.layer_count_attr is None:
            raise DepthPruningError(f"depth_prune: {arch.family} layers cannot be removed ({arch.fixed_depth_because})")
        if len(arch.stacks) != 1:
            raise DepthPruningError(f"depth_prune: {arch.family} has {len(arch.stacks)} stacks; only single-stack models are supported")
        if is_wrapped(model):
            raise DepthPruningError("depth_prune: the model carries a PEFT adapter; remove layers before training, or merge it first")
        if is_quantized(model) or quantized_modules(model):
            raise DepthPruningError("depth_prune: the model is quantized; remove layers before quantizing")
        if state.constraints:
            names = ", ".join(sorted({x.name for x in state.constraints}))
            raise DepthPruningError(f"depth_prune: earlier passes left constraints ({names}) that name layers by position; "
                                    "put depth_prune before them")
        t0 = time.perf_counter()
        labels = layer_labels(model, arch)
        stack = arch.stacks[0].name
        examples = state.examples("train", c.calibration_samples)
        batches = calibration_inputs(state.tokenizer, state.task, state.arch, examples, c.calibration_batch_size,
                                     state.recipe.max_seq_length, state.device)
        scores = block_influence(model, arch, batches)
        if c.remove is not None:
            remove = [f"{stack}.{i}" for i in c.remove]
            missing = [label for label in remove if label not in scores]
            if missing:
                raise DepthPruningError(f"depth_prune: remove {c.remove}: the model has layers 0 to {len(labels) - 1}")
        else:
            if c.layers >= len(labels):
                raise DepthPruningError(f"depth_prune: layers {c.layers} would remove every one of the model's {len(labels)} layers")
            remove = sorted(labels, key=lambda label: (scores[label], label))[:c.layers]
        if len(remove) >= len(labels):
            raise DepthPruningError(f"depth_prune: cannot remove all {len(labels)} layers")
        params_before, _ = count_parameters(model)
        renamed = remove_layers(model, arch, remove)
        _smoke_forward(model, batches[0])
        params_after, _ = count_parameters(model)
        return {
            "layers_before": len(labels),
            "layers_after": len(labels) - len(remove),
            "removed": sorted(remove, key=labels.index),
            "chosen_by": "remove (given)" if c.remove is not None else "lowest block influence",
            "block_influence": {label: round(scores[label], 6) for label in labels},
            "kept_renumbered": renamed,
            "calibration": {"split": "train", "rows": len(examples),
                            "tokens": int(sum(int(b["attention_mask"].sum()) for b in batches))},
            "params_before": params_before,
            "params_after": params_after,
            "prune_seconds": round(time.perf_counter() - t0, 3),
            "saved_format": f"stock config.json with {arch.layer_count_attr} = {len(labels) - len(remove)}: "
                            "loads with plain transformers",
        }


def _smoke_forward(model, inputs) -> None:
    """One forward pass: a model that no longer runs fails here, not in evaluation."""
    import torch

    with torch.no_grad():
        try:
            model(**inputs)
        except RuntimeError as exc:
            raise DepthPruningError(f"depth_prune: the shallower model does not run ({str(exc).splitlines()[0][:200]})") from None


__all__ = ["DepthPrune", "DepthPruneConfig"]
