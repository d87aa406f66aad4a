"""Activation density: the fraction of MLP activation outputs that are exactly nonzero.

`ActivationTap` hooks the activation module of every MLP block found through the architecture
table and hands (block, pre-activation, activation) to a callback; the density meter here and the
DEFT loss both build on it. `DensityMeter` counts on the device without synchronising, so it
rides along with the evaluation forward passes at little cost.

Modes:
- ``masked`` (default): only real tokens count (the attention mask / label mask of each stack).
- ``paper``: every position counts, padding included, as in the DEFT paper's code (inputs are then
  padded to ``max_seq_length`` by the evaluator).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal

import torch
from torch import nn

from deftcompress.architecture import MLPBlock

DensityMode = Literal["masked", "paper"]
TapFn = Callable[[MLPBlock, torch.Tensor, torch.Tensor], None]


def align_token_mask(mask: torch.Tensor, positions: int) -> torch.Tensor:
    """Fit a [batch, seq] token mask to activations with `positions` positions.

    Prompt tuning prepends virtual tokens inside the model, so activations can be longer than the
    input's mask; those leading positions are real (computed for every example) and count as 1.
    """
    extra = positions - mask.shape[-1]
    if extra == 0:
        return mask
    if extra < 0:
        raise ValueError(f"token mask covers {mask.shape[-1]} positions but the activations have only {positions}")
    return torch.cat([mask.new_ones(mask.shape[0], extra), mask], dim=-1)


class ActivationTap:
    """Forward hooks on the MLP activations of `blocks`; calls `fn(block, pre, act)` when a stack is enabled."""

    def __init__(self, blocks: list[MLPBlock], fn: TapFn):
        self.blocks = blocks
        self.fn = fn
        self.enabled = {b.stack for b in blocks}
        self._handles: list = []

    def __enter__(self) -> "ActivationTap":
        for block in self.blocks:
            self._handles.append(block.act.register_forward_hook(self._hook(block)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, block: MLPBlock):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if block.stack in self.enabled:
                self.fn(block, inputs[0], output)

        return hook

    @contextmanager
    def paused(self, *stacks: str) -> Iterator[None]:
        before = set(self.enabled)
        self.enabled -= set(stacks)
        try:
            yield
        finally:
            self.enabled = before


@dataclass
class LayerDensity:
    stack: str
    layer: int
    density: float
    above_tau: float | None  # None where it is not measured (the onnxruntime graph counts exact zeros only)
    width: int


@dataclass
class DensityResult:
    encoder: float | None
    decoder: float | None
    encoder_above_tau: float | None
    decoder_above_tau: float | None
    per_layer: list[LayerDensity]
    mode: str
    tau: float
    counted_positions: dict[str, int] = field(default_factory=dict)  # tokens counted per stack

    def overall(self) -> float | None:
        """Single figure for tables: the encoder density, else the decoder density."""
        return self.encoder if self.encoder is not None else self.decoder


class DensityMeter:
    """Counts exact nonzeros (and |a| > tau) of MLP activations per layer over the tokens of each stack.

    Before every forward, call `set_token_mask(stack, mask)` with a [batch, seq] mask of the tokens that
    count (ignored in ``paper`` mode, where every position counts).
    """

    def __init__(self, blocks: list[MLPBlock], mode: DensityMode = "masked", tau: float = 1e-3):
        self.blocks = blocks
        self.mode = mode
        self.tau = tau
        self.tap = ActivationTap(blocks, self._count)
        self._index = {id(b): i for i, b in enumerate(blocks)}
        self._nonzero: torch.Tensor | None = None  # per-layer counts, accumulated on the device (no sync)
        self._above: torch.Tensor | None = None
        self._width = [0] * len(blocks)
        self._positions = [0] * len(blocks)  # counted token positions per layer (python ints)
        self._padding: dict[str, torch.Tensor | None] = {}  # per stack: bool [batch, seq] of positions to drop
        self._real: dict[str, int | None] = {}
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def __enter__(self) -> "DensityMeter":
        self.tap.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.tap.__exit__(*exc)

    def set_token_mask(self, stack: str, mask: torch.Tensor | None) -> None:
        """Positions that count for `stack` in the next forward (1 = real token)."""
        if self.mode != "masked" or mask is None:
            self._padding[stack], self._real[stack] = None, None
            return
        padding = mask == 0
        n_pad = int(padding.sum())  # one sync per batch, not per layer
        self._padding[stack] = padding if n_pad else None
        self._real[stack] = mask.numel() - n_pad

    def _count_above_tau(self, act: torch.Tensor) -> torch.Tensor:
        # |a| > tau through reused buffers: allocating two activation-sized tensors per layer and batch
        # cost more than the counting itself (benchmarks/density_overhead.py).
        n = act.numel()
        buf = self._buffers
        if buf is None or buf[0].numel() < n or buf[0].device != act.device or buf[0].dtype != act.dtype:
            buf = self._buffers = (torch.empty(n, dtype=act.dtype, device=act.device),
                                   torch.empty(n, dtype=torch.bool, device=act.device))
        magnitude = torch.abs(act.reshape(-1), out=buf[0][:n])
        return torch.count_nonzero(torch.gt(magnitude, self.tau, out=buf[1][:n]))

    def _count(self, block: MLPBlock, pre: torch.Tensor, act: torch.Tensor) -> None:
        i = self._index[id(block)]
        act = act.detach()
        if self._nonzero is None:
            self._nonzero = torch.zeros(len(self.blocks), dtype=torch.int64, device=act.device)
            self._above = torch.zeros(len(self.blocks), dtype=torch.int64, device=act.device)
        self._width[i] = act.shape[-1]
        # Count over every position, then subtract the padding positions: batches are length-sorted,
        # so padding is a small slice and this is cheaper than gathering the real tokens.
        nonzero = torch.count_nonzero(act)
        above = self._count_above_tau(act)
        padding = self._padding.get(block.stack)
        virtual = 0
        if padding is not None and padding.shape[-1] != act.shape[-2]:
            # prompt tuning prepends virtual tokens inside the model: real positions, not padding
            virtual = act.shape[-2] - padding.shape[-1]
            padding = ~align_token_mask(~padding, act.shape[-2])
        if padding is not None:
            pad = act[padding]
            nonzero = nonzero - torch.count_nonzero(pad)
            above = above - self._count_above_tau(pad)
            self._positions[i] += self._real[block.stack] + virtual * padding.shape[0]
        else:
            self._positions[i] += act.numel() // act.shape[-1]
        self._nonzero[i] += nonzero
        self._above[i] += above

    def counts(self) -> list[tuple[int, int, int]]:
        """Per block (in `blocks` order): exact nonzeros, counted positions and width so far."""
        nonzero = self._nonzero.tolist() if self._nonzero is not None else [0] * len(self.blocks)
        return [(int(nonzero[i]), self._positions[i], self._width[i]) for i in range(len(self.blocks))]

    def result(self) -> DensityResult:
        above = self._above.tolist() if self._above is not None else [0] * len(self.blocks)
        return density_from_counts([(b.stack, b.index) for b in self.blocks], self.counts(), above, self.mode, self.tau)


def density_from_counts(layers: list[tuple[str, int]], counts: list[tuple[int, int, int]], above: list[int] | None,
                        mode: str, tau: float) -> DensityResult:
    """Per-layer and per-stack density from (nonzero, positions, width) per layer and optional |a| > tau counts.

    Shared by the PyTorch meter and the onnxruntime runtime (whose graph returns the same counts);
    without `above` the above-tau figures are None. Layers that counted nothing are left out.
    """
    per_layer: list[LayerDensity] = []
    sums: dict[str, list[float]] = {}
    positions: dict[str, int] = {}
    for i, ((stack, index), (nonzero, pos, width)) in enumerate(zip(layers, counts)):
        total = pos * width
        if total == 0:
            continue
        positions[stack] = pos
        above_i = above[i] if above is not None else None
        per_layer.append(LayerDensity(stack, index, nonzero / total, above_i / total if above_i is not None else None, width))
        acc = sums.setdefault(stack, [0, 0, 0])
        acc[0] += nonzero
        acc[1] += above_i or 0
        acc[2] += total

    def frac(stack: str, k: int) -> float | None:
        acc = sums.get(stack)
        if k == 1 and above is None:
            return None
        return acc[k] / acc[2] if acc and acc[2] else None

    return DensityResult(
        encoder=frac("encoder", 0), decoder=frac("decoder", 0),
        encoder_above_tau=frac("encoder", 1), decoder_above_tau=frac("decoder", 1),
        per_layer=per_layer, mode=mode, tau=tau, counted_positions=positions,
    )
