"""Sparse MLP execution on an ordinary CPU: activation zeros turned into skipped work.

Per MLP block (found through the architecture table):

- the down-projection multiplies only the nonzero activations: per token, over the rows of the
  transposed weight (`W_down^T`, rows contiguous) of its active neurons (a small C++ kernel,
  `sparse_kernels`, or `embedding_bag` where it cannot build), or, for a batch, one matmul over the
  union of active neurons;
- in gated MLPs (`down(act(up(x)) * gate(x))`, Llama's `gate_proj`/`up_proj`), the multiplied
  projection computes only the rows of neurons the activation left nonzero.
  At one token per call (decoding), once both have settled on the compiled kernel, the whole gated block
  runs as one compiled call (`FusedGatedMLP`: the block's forward, checked once against its own).

Each call counts the zeros and picks dense, per-token or union from a cost model of the layer's shape
calibrated once on the machine (`SparseCalibration`, cached under `~/.cache/deftcompress/`), sparse only
where it is predicted faster by a margin; the first sparse calls of each layer are checked against
dense in place, and a path that loses is dropped. That aims at never being slower than dense; the
remaining cost is the count itself (benchmarks/results/sparse_mlp.md has where it falls short).
Outputs equal the dense ones up to float summation order.

    with SparseMLPRuntime(model, arch) as runtime:   # swaps the projections, restores them on exit
        model(**batch)
    runtime.layer_report()                           # per layer: density, paths taken, dense vs sparse ms

This module is the entry point; the parts live beside it: `sparse_projections` (the swapped modules and their
per-call decision), `cost_model` (the calibrated costs and the choice), `sparse_kernels` (the products and the
compiled kernels, source in `kernels/`).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from deftcompress.architecture import ArchSpec, MLPBlock, mlp_blocks
from deftcompress.runtime.cost_model import FixedChoice, LayerCosts, SparseCalibration, _choose, _evict_caches
from deftcompress.runtime.sparse_kernels import _down_per_token, _down_union
from deftcompress.runtime.sparse_projections import (DENSE_STREAK, FAST_AFTER, VERIFY_CALLS, FusedGatedMLP, LayerStats,
                                                     SparseDown, SparseGate, _Timer)

# Names tests and benchmarks import from here (their homes: cost_model, sparse_projections, sparse_kernels)
__all__ = ["DENSE_STREAK", "FAST_AFTER", "VERIFY_CALLS", "FixedChoice", "LayerCosts", "LayerStats", "SparseCalibration",
           "SparseDown", "SparseGate", "SparseMLPRuntime", "_Timer", "_choose", "_down_per_token", "_down_union",
           "_evict_caches"]


class SparseMLPRuntime:
    """Swap every MLP's down-projection (and gated MLPs' multiplied projection) for the sparse modules.

    `calibration`: a `SparseCalibration` (default: the machine's cache) or `FixedChoice(path)`;
    `timed_calls`: per layer, time dense and the chosen path on the first N calls (for the report).
    """

    def __init__(self, model: nn.Module, arch: ArchSpec | None = None, calibration=None, timed_calls: int = 0):
        self.model = model
        self.blocks = mlp_blocks(model, arch)
        self.calibration = calibration if calibration is not None else SparseCalibration()
        self.timer = _Timer(timed_calls) if timed_calls else None
        self.stats: list[LayerStats] = []
        self._swaps: list[tuple] | None = None  # (module name, original Linear, sparse module, activation or None)
        self._fused: list[FusedGatedMLP] = []  # gated blocks whose one-token calls run as one compiled call
        self._hooks: list = []

    def __enter__(self) -> "SparseMLPRuntime":
        if self._swaps is None:  # built once: the in-place checks and the statistics carry over between entries
            self._swaps = []
            for block in self.blocks:
                down = self._build(block, "down", SparseDown, None)
                if block.gate is not None:
                    gate = self._build(block, "gate", SparseGate, block.act)
                    if down is not None and gate is not None:
                        self._fused.append(FusedGatedMLP(block, gate, down))
        for name, _, module, act in self._swaps:
            self.model.set_submodule(name, module)
            if act is not None:  # the gate reads the activation's zeros
                self._hooks.append(act.register_forward_hook(lambda m, inputs, output, gate=module: gate.take_pattern(output)))
        for fused in self._fused:  # an instance attribute: the block's class, hooks and names stay as they are
            fused.block.block.forward = fused.forward
        return self

    def _build(self, block: MLPBlock, role: str, cls, act):
        linear = getattr(block, role)
        if type(linear) is not nn.Linear:  # quantized or adapter-wrapped layers keep their own forward
            return None
        stats = LayerStats(block.label, role)
        self.stats.append(stats)
        module = cls(linear, self.calibration, stats, self.timer)
        self._swaps.append((block.names[role], linear, module, act))
        return module

    def __exit__(self, *exc) -> None:
        for fused in self._fused:
            fused.block.block.__dict__.pop("forward", None)
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for name, linear, _, _ in reversed(self._swaps or []):
            self.model.set_submodule(name, linear)

    def stop_timing(self) -> None:
        """No more dense-against-sparse timing for the report (e.g. before the runtime itself is timed)."""
        self.timer = None
        for _, _, module, _ in self._swaps or []:
            module.timer = None

    @property
    def swapped(self) -> int:
        return len(self.stats)

    def layer_report(self) -> list[dict[str, Any]]:
        return [s.to_dict() for s in self.stats]
