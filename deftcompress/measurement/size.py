"""How big a model is: parameters, nonzero parameters, bytes in memory and on disk."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn


def unique_parameters(model: nn.Module) -> list[torch.Tensor]:
    seen, out = set(), []
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(parameters, nonzero parameters); 4-bit packed weights count as the elements they encode."""
    total = nonzero = 0
    for p in unique_parameters(model):
        n = p.numel()
        quant = getattr(p, "quant_state", None)
        if quant is not None and getattr(quant, "shape", None) is not None:
            n = int(torch.Size(quant.shape).numel())
            total += n
            nonzero += n  # packed codes: zeros are not observable without dequantising
            continue
        total += n
        nonzero += int(torch.count_nonzero(p.detach()).item())
    from torch.ao.nn.quantized import Linear as QuantizedLinear

    for module in model.modules():
        # torch.ao (dynamic) int8 Linear layers keep weight and bias in packed params, not Parameters
        if isinstance(module, QuantizedLinear):
            weight, bias = module.weight(), module.bias()
            total += weight.numel()
            nonzero += int(torch.count_nonzero(weight.dequantize()).item())
            if bias is not None:
                total += bias.numel()
                nonzero += int(torch.count_nonzero(bias).item())
    return total, nonzero


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of every tensor in the state dict (shared storage counted once): the checkpoint payload."""
    seen: set[tuple[int, int]] = set()
    total = 0

    def add(t: Any) -> None:
        nonlocal total
        if isinstance(t, torch.Tensor):
            if t.is_quantized:
                total += t.int_repr().numel() * 1
                return
            key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.device.type != "meta" else (id(t), 0)
            if key in seen:
                return
            seen.add(key)
            total += t.numel() * t.element_size()
        elif isinstance(t, (tuple, list)):
            for x in t:
                add(x)

    for value in model.state_dict().values():
        add(value)
    return total


def directory_bytes(path: str | os.PathLike) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
