"""Per-neuron activation scales: a reversible reparametrisation that lets DEFT reach exact zeros.

Each MLP neuron gets a trainable scale s = exp(rho) >= 1. The up-projection's output u is multiplied
by s before the activation and the down-projection's input is divided by s after it, so the block
computes W_down (act(s * u) / s). For large s this behaves like a ReLU of u: the positive part is
unchanged while every u below zero_point / s lands where the frozen activation (GELU in float32:
x <= -5.543) returns exactly 0. A rank-8 LoRA cannot shift 1,536 neurons independently; these scales
can. After training the scales fold exactly into the weights (rows of the up-projection, columns of
the down-projection), so the saved model is a plain checkpoint of the original architecture; or they
stay beside the activation (`ScaledActivation`) where the weights cannot hold them (int8, 4-bit). How scales
live in a model (folding, `ScaledActivation`, saving and loading) is `deftcompress.architecture.activation_scale`.

Finding (benchmarks/results/deft_research.md): with the pre-activation loss and a per-layer density
target, this cut MiniLM's SST-2 density by about two thirds in 250 steps where the paper's loss
barely moved it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from deftcompress.architecture import MLPBlock
from deftcompress.architecture.activation_scale import (FOLDS, record_scaled_activations, scale_columns, scale_rows,
                                                       wrap_activation)
from deftcompress.errors import DeftcompressError
from deftcompress.core.protocol import Constraint


def _width(block: MLPBlock) -> int:
    down = block.down
    width = getattr(down, "in_features", None)
    if width is None:
        raise DeftcompressError(f"{block.names.get('down')}: cannot tell the MLP width for activation scales")
    return int(width)


class ActivationScales(nn.Module):
    """Holds rho per MLP block and hooks the blocks' up and down projections while attached."""

    def __init__(self, blocks: list[MLPBlock], min_scale: float = 1.0):
        super().__init__()
        self.blocks = blocks
        self.min_log = math.log(min_scale)
        device = next(blocks[0].down.parameters()).device
        self.rho = nn.ParameterList([nn.Parameter(torch.full((_width(b),), self.min_log, device=device)) for b in blocks])
        self._index = {b.label: i for i, b in enumerate(blocks)}  # by label: callers may locate blocks anew
        self._handles: list = []

    def scale(self, i: int) -> torch.Tensor:
        return self.rho[i].exp()

    def attach(self) -> None:
        for i, b in enumerate(self.blocks):
            self._handles.append(b.up.register_forward_hook(self._scale_output(i)))
            self._handles.append(b.down.register_forward_pre_hook(self._unscale_input(i)))

    def detach_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _scale_output(self, i: int):
        def hook(module, inputs, output):
            return output * self.scale(i).to(output.dtype)

        return hook

    def _unscale_input(self, i: int):
        def hook(module, args):
            # times exp(-rho), not divided by s: a division and its backward cost several times a multiply here
            inverse = (-self.rho[i]).exp().to(args[0].dtype)
            return (args[0] * inverse,) + tuple(args[1:])

        return hook

    def scale_of(self, block: MLPBlock) -> torch.Tensor:
        """s of `block` (the density loss sends its gradient here only: density_grad scale_only)."""
        return self.scale(self._index[block.label])

    @torch.no_grad()
    def clamp_(self) -> None:
        for rho in self.rho:
            rho.clamp_(min=self.min_log)

    @torch.no_grad()
    def fold(self, model: nn.Module | None = None, where: str = "weights") -> dict:
        """Make the trained scales permanent; `where` (DEFT's `activation_scale_fold`):

        - ``weights``: s into the up-projection rows (and its LoRA B), 1/s into the down-projection columns
          (and LoRA A): a stock checkpoint of the original architecture;
        - ``activation``: s into the up-projection rows, 1/s a per-neuron multiply after the activation
          (`ScaledActivation`): the down-projection keeps its weights and its input its range, which int8
          (per-tensor activations) needs;
        - ``module``: no weight changes: the activation computes act(s * x) / s (`ScaledActivation` with both
          scales), for 4-bit weights (qlora) that cannot absorb either.

        The two module forms are recorded in the config so the model reloads. `model` holds the blocks.
        """
        if where not in FOLDS:
            raise DeftcompressError(f"activation_scale_fold {where!r} is unknown (known: {', '.join(FOLDS)})")
        self.detach_hooks()
        for i, b in enumerate(self.blocks):
            s = self.scale(i)
            if where != "module":
                scale_rows(b.up, s, b.names.get("up", "up"))
            if where == "weights":
                scale_columns(b.down, 1.0 / s, b.names.get("down", "down"))
            else:
                wrap_activation(model, b, 1.0 / s, pre_scale=s if where == "module" else None)
        if where != "weights":
            record_scaled_activations(model, [b.label for b in self.blocks], pre_scale=where == "module")
        values = torch.cat([r.detach().exp().cpu() for r in self.rho])
        return {"neurons": int(values.numel()), "median": round(float(values.median()), 3),
                "max": round(float(values.max()), 3), "fraction_above_10": round(float((values > 10).float().mean()), 4)}

    def state_for_saving(self) -> dict[str, torch.Tensor]:
        return {f"{b.label}.scale": self.scale(i).detach().cpu().contiguous() for i, b in enumerate(self.blocks)}


class ScaleFloor(Constraint):
    """Keeps s >= min_scale after every optimizer step (clamping inside the forward would freeze neurons)."""

    name = "activation_scale_floor"

    def __init__(self, scales: ActivationScales):
        self.scales = scales

    def enforce(self, model) -> None:
        self.scales.clamp_()
