"""How much each transformer layer changes its input: block influence, the score depth pruning ranks layers by.

Block influence (Men et al., "ShortGPT: Layers in Large Language Models are More Redundant Than You
Expect", 2024) is 1 - cos(h_in, h_out) between the hidden state entering a layer and the one leaving it,
averaged over the real (non-padding) tokens of calibration rows. A layer that barely turns its input
(small influence) is the one whose removal changes the model least. No labels are needed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deftcompress.architecture import ArchSpec
from deftcompress.architecture.depth import layer_modules


def _hidden(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


@torch.no_grad()
def block_influence(model: nn.Module, arch: ArchSpec, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """`stack.index` -> mean of 1 - cos(layer input, layer output) over the real tokens of `batches` (model inputs)."""
    layers = layer_modules(model, arch)
    sums = {label: 0.0 for label in layers}
    counts = {label: 0 for label in layers}
    mask_now: dict[str, torch.Tensor | None] = {"mask": None}

    def hook(label: str):
        def record(module, args, kwargs, output):
            h_in = _hidden(args[0] if args else kwargs.get("hidden_states"))
            h_out = _hidden(output)
            if h_in is None or h_out is None or h_in.shape != h_out.shape:
                raise RuntimeError(f"{label}: cannot read the layer's input and output hidden states")
            cos = nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1)  # [batch, tokens]
            mask = mask_now["mask"]
            if mask is not None and mask.shape == cos.shape:
                keep = mask.bool()
                sums[label] += float((1 - cos)[keep].sum())
                counts[label] += int(keep.sum())
            else:
                sums[label] += float((1 - cos).sum())
                counts[label] += cos.numel()
        return record

    handles = [module.register_forward_hook(hook(label), with_kwargs=True) for label, module in layers.items()]
    was_training = model.training
    model.eval()
    try:
        for inputs in batches:
            mask_now["mask"] = inputs.get("attention_mask")
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {label: sums[label] / max(counts[label], 1) for label in layers}
