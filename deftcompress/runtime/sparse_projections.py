"""The swapped projections of the sparse MLP runtime: modules in place of an MLP's `nn.Linear` that pick, per call,
dense or a sparse path from the zeros of their input (`SparseDown`, the down-projection) or of the activation
(`SparseGate`, a gated MLP's multiplied projection), check the choice in place and keep per-layer statistics
(`LayerStats`). The cost model is `cost_model`; the products and kernels, `sparse_kernels`.
"""

from __future__ import annotations

import functools
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deftcompress.runtime.cost_model import MARGIN, PATHS, FixedChoice, LayerCosts, _choose, _union_may_win
from deftcompress.runtime.sparse_kernels import _EMPTY, _down_per_token, _down_union, _gated_per_token, _gated_union
from deftcompress.runtime.sparse_kernels import load as _kernels

# A call that went dense after its count (density above the give-up density, no path predicted faster, or the
# chosen path lost in place) makes the next this-many calls at that token count skip even the count: one count
# and its bookkeeping cost about a seventh of a one-token MLP block on a small layer.
DENSE_STREAK = 8
# The cost model predicts; the first calls check it in place: per layer, token-count bucket and path, the
# first VERIFY_CALLS sparse calls also time dense on the same input, and a path slower in place is dropped.
VERIFY_CALLS = 5
# A token-count bucket whose calls through the counting kernel all went dense binds the kernel call after this many anyway:
# its count is what keeps it honest from then on, and the sparse calls it may make later go unchecked. Few, because
# cold each call through the Python that watches costs ~70 us (a sixth of a one-token MiniLM block): with 20, a
# dense block was still 0.86x after 43 calls.
FAST_AFTER = VERIFY_CALLS


# ---- the swapped modules -----------------------------------------------------------------------

@dataclass
class LayerStats:
    label: str
    role: str  # down | gate
    calls: int = 0
    tokens: int = 0
    nonzero: int = 0  # activations (down) or active neuron-token pairs seen
    union_sum: float = 0.0
    union_calls: int = 0  # calls that measured the union (the others went dense after the count)
    unchecked: int = 0  # calls run dense without a count (a clearly dense layer, see DENSE_STREAK; a dropped kernel)
    width: int = 0  # activations per token
    # calls whose count and choice ran inside the compiled kernel (see `_Swapped._fused`), kept by the kernel itself:
    # calls, tokens, nonzero activations counted, calls that went sparse
    tally: torch.Tensor = field(default_factory=lambda: torch.zeros(4, dtype=torch.int64))
    dropped: list = field(default_factory=list)  # paths that lost to dense in place (see VERIFY_CALLS)
    paths: dict[str, int] = field(default_factory=lambda: {p: 0 for p in PATHS})
    timed_dense: list[float] = field(default_factory=list)
    timed_chosen: list[float] = field(default_factory=list)
    fused: int = 0  # one-token calls that ran the whole gated block as one compiled call (`FusedGatedMLP`)

    def record(self, tokens: int, width: int, nonzero: int, union: float | None, path: str) -> None:
        self.calls += 1
        self.tokens += tokens
        self.nonzero += nonzero
        if union is not None:
            self.union_sum += union
            self.union_calls += 1
        self.paths[path] += 1
        self.width = width

    def to_dict(self) -> dict[str, Any]:
        in_kernel, kernel_tokens, kernel_nonzero, kernel_sparse = (int(v) for v in self.tally)
        tokens, nonzero = self.tokens + kernel_tokens, self.nonzero + kernel_nonzero
        out = {"layer": self.label, "role": self.role,
               "calls": self.calls + self.unchecked + in_kernel, "unchecked_dense_calls": self.unchecked,
               "counted_in_kernel_calls": in_kernel,
               "density": round(nonzero / (tokens * max(self.width, 1)), 4) if tokens else None,
               "union_density": round(self.union_sum / self.union_calls, 4) if self.union_calls else None,
               "paths": {**self.paths, "dense": self.paths["dense"] + self.unchecked + in_kernel - kernel_sparse,
                         "per_token": self.paths["per_token"] + kernel_sparse}}
        if self.fused:
            out["fused_block_calls"] = self.fused
        if self.dropped:
            out["dropped_in_place"] = list(self.dropped)
        if self.timed_dense:
            out.update(dense_ms=round(1000 * statistics.median(self.timed_dense), 4),
                       runtime_ms=round(1000 * statistics.median(self.timed_chosen), 4),
                       timed_calls=len(self.timed_dense))
        return out


class _Timer:
    """Times the dense path and the chosen one on the same input for the first `budget` calls of a layer."""

    def __init__(self, budget: int):
        self.budget = budget

    def wants(self, stats: LayerStats) -> bool:
        return len(stats.timed_dense) < self.budget

    @staticmethod
    def seconds(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start


# nn.Module's global hook registries (dicts filled in place by torch.nn.modules.module.register_module_*_hook): any hook
# in them sends a swapped module's call through nn.Module.__call__, which runs them
_GLOBAL_HOOKS = tuple(getattr(torch.nn.modules.module, name, {}) for name in (
    "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks"))


class _Swapped(nn.Module):
    """What both swapped projections share: the per-call decision (see the module docstring), the state it keeps
    per token count (cost plan, dense streak, in-place verdicts), and the replaced Linear's weight and bias
    (family forwards read e.g. `wo.weight.dtype`)."""

    gated = False  # which cost model: the down-projection's or the gated side's
    kernel_name = "down_auto"  # the compiled call that counts, chooses and computes (see `_fused`)

    def __init__(self, linear: nn.Linear, calibration, stats: LayerStats, timer: _Timer | None):
        super().__init__()
        self.linear = linear
        # Plain attributes for the per-call path: a submodule or parameter read through nn.Module's __getattr__, or
        # a tensor attribute written through its __setattr__, costs microseconds per call, tens with cold caches.
        self._dense = functools.partial(F.linear, weight=linear.weight, bias=linear.bias)
        kernels = _kernels()
        self._kernel = getattr(kernels, self.kernel_name) if kernels is not None else None
        self._weight_bias = (linear.weight.detach(), linear.bias.detach() if linear.bias is not None else _EMPTY)
        self.calibration, self.stats, self.timer = calibration, stats, timer
        self._plans: dict[int, tuple[LayerCosts, float, float | None]] = {}  # tokens -> see `_plan`
        self._streaks: dict[int, int] = {}  # tokens -> calls left that skip the count (a layer found dense)
        self._verdicts: dict[tuple[int, str], list | str] = {}  # (token bucket, path) -> timings, or "dropped"
        self._fast_calls: dict[int, Any] = {}  # tokens -> the bound kernel call that is the whole forward (`_fused`)
        # token-count bucket -> calls through `_fused` before binding: per bucket, not per token count, so a model fed
        # sentences of many lengths binds after FAST_AFTER calls of similar length, not of each exact length
        self._fused_seen: dict[int, int] = {}
        self._sparse_calls = stats.tally.numpy()[3:]  # a view: read without a tensor op (cold, one costs ~20 us)
        stats.width = linear.in_features if not self.gated else linear.out_features

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # nn.Module.__call__ adds two Python frames and its hook bookkeeping: about 19 us a call with cold caches,
        # as long as a one-token sparse product on MiniLM. Inference with no hook to run goes to forward directly.
        if self._forward_hooks or self._forward_pre_hooks or any(_GLOBAL_HOOKS) or x.requires_grad:
            return super().__call__(x)  # hooks to run, or gradients (backward hooks): nn.Module's whole call
        return self.forward(x)

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.linear.bias

    def _run(self, flat: torch.Tensor, pattern: torch.Tensor, sparse_paths) -> torch.Tensor:
        """`flat` through the path this call should take. `pattern` [tokens, width] holds the zeros that decide;
        `sparse_paths(nonzero)` gives {"per_token": fn, "union": fn} (nonzero: `pattern != 0` where measured)."""
        tokens, width = pattern.shape
        dense = lambda: self.linear(flat)  # noqa: E731
        costs, give_up, _ = self._plan(tokens, flat.shape[-1])
        timed = self._timed()
        count = int(torch.count_nonzero(pattern))
        per_token = count / max(pattern.numel(), 1)
        if per_token > give_up:  # one count, then dense: what the decision costs a dense batch
            if timed:
                self.stats.timed_dense.append(_Timer.seconds(dense))
                self.stats.timed_chosen.append(_Timer.seconds(lambda: (torch.count_nonzero(pattern).item(), dense())))
            self.stats.record(tokens, width, count, None, "dense")
            self._streaks[tokens] = DENSE_STREAK
            return dense()
        nonzero = union = None
        if _union_may_win(costs, per_token):
            nonzero = pattern != 0
            union = float(nonzero.any(0).sum()) / width
        path = _choose(costs, per_token, union)
        path = "dense" if self._dropped(tokens, path) else path
        if path == "dense":  # below the give-up density but still dense (or its path lost in place): same streak
            self._streaks[tokens] = DENSE_STREAK
        run = dense if path == "dense" else sparse_paths(nonzero)[path]
        if timed:
            self.stats.timed_dense.append(_Timer.seconds(dense))
            self.stats.timed_chosen.append(_Timer.seconds(run))
        out = self._verified(tokens, path, run, dense)
        self.stats.record(tokens, width, count, union, path)
        return out

    def _skips_count(self, tokens: int) -> bool:
        """True (and counted) if this call goes dense without counting zeros: a dense streak (see DENSE_STREAK) is on
        at this token count and the call is not one the report times. Checked first in `forward`, before any other
        work: on a small layer the Python around a dense call is a visible part of its time."""
        left = self._streaks.get(tokens, 0)
        if left <= 0 or self._timed():
            return False
        self._streaks[tokens] = left - 1
        self.stats.unchecked += 1
        return True

    def _timed(self) -> bool:
        """Whether this call is one of the first the report times (dense and chosen path on the same input)."""
        return self.timer is not None and self.timer.wants(self.stats)

    def _plan(self, tokens: int, d_in: int) -> tuple[LayerCosts, float, float | None]:
        """(cost model, give-up density, kernel limit) at `tokens` tokens, looked up once per token count. "Kernel
        limit": where only dense and the compiled kernel compete (the calibration has no union beside the kernel), the
        density up to which the kernel is predicted faster by MARGIN; the count and the choice then run inside it."""
        if tokens not in self._plans:
            costs = self.calibration.costs(d_in, self.linear.out_features, tokens, gated=self.gated)
            limit = None
            if _kernels() is not None and costs.per_token is not None and costs.union is None \
                    and not isinstance(self.calibration, FixedChoice):
                a, b = costs.per_token
                limit = 1.0 if b <= 0 else min((MARGIN * costs.dense - a) / b, 1.0)
                limit = limit if limit > 0 else None
            self._plans[tokens] = (costs, costs.give_up_density(), limit)
        return self._plans[tokens]

    def _fused(self, tokens: int, d_in: int, inputs: tuple, dense) -> torch.Tensor | None:
        """This call through the compiled kernel that counts, chooses and computes at once (`down_auto`/`gate_auto`),
        or None where the choice needs Python (no kernels, report timing, a union in the cost model, a fixed choice).
        Its first VERIFY_CALLS calls that go sparse are checked against dense in place, as in `_verified`; after
        them (or after FAST_AFTER calls in this token-count bucket that all went dense) the bound kernel call is all a
        forward does at this token count (`_fast_calls`); where they found the kernel slower, the plain dense
        product is."""
        limit = self._plan(tokens, d_in)[2]
        if limit is None or self._timed():
            return None
        if self._dropped(tokens, "per_token"):  # the kernel lost in place: plain dense from now on, not even a count
            self._fast_calls[tokens] = self._dense_uncounted
            return self._dense_uncounted(*inputs)
        call = functools.partial(self._kernel, *self._kernel_args, limit, self.stats.tally)
        bucket = tokens.bit_length()
        samples = self._verdicts.setdefault((bucket, "per_token"), [])
        seen = self._fused_seen.get(bucket, 0)
        if len(samples) >= VERIFY_CALLS or seen >= FAST_AFTER:
            self._fast_calls[tokens] = call
            return call(*inputs)
        self._fused_seen[bucket] = seen + 1
        sparse_before = int(self._sparse_calls[0])
        start = time.perf_counter()
        out = call(*inputs)
        if int(self._sparse_calls[0]) > sparse_before:  # it went sparse: time dense on the same input
            middle = time.perf_counter()
            dense()
            self._check_in_place(tokens, "per_token", middle - start, time.perf_counter() - middle)
        return out

    def _dense_uncounted(self, x: torch.Tensor, *pattern) -> torch.Tensor:
        self.stats.unchecked += 1
        return self._dense(x)

    def _dropped(self, tokens: int, path: str) -> bool:
        """True if `path` lost to dense in place for this layer at this token-count bucket (see VERIFY_CALLS)."""
        return self._verdicts.get((tokens.bit_length(), path)) == "dropped"

    def _verified(self, tokens: int, path: str, run, dense):
        """Run `path`; on its first VERIFY_CALLS calls in this bucket also time dense on the same input, and drop
        the path for the bucket if its median time was not below dense's."""
        if path == "dense" or isinstance(self.calibration, FixedChoice):  # a fixed choice stays fixed
            return run()
        key = (tokens.bit_length(), path)
        samples = self._verdicts.setdefault(key, [])
        if not isinstance(samples, list) or len(samples) >= VERIFY_CALLS:
            return run()
        start = time.perf_counter()
        out = run()
        middle = time.perf_counter()
        dense()
        self._check_in_place(tokens, path, middle - start, time.perf_counter() - middle)
        return out

    def _check_in_place(self, tokens: int, path: str, sparse_seconds: float, dense_seconds: float) -> None:
        """One in-place timing of `path` against dense; after VERIFY_CALLS of them the path is dropped for the
        token-count bucket if its median time was not below dense's."""
        key = (tokens.bit_length(), path)
        samples = self._verdicts.setdefault(key, [])
        samples.append((sparse_seconds, dense_seconds))
        if len(samples) == VERIFY_CALLS:
            sparse_time = statistics.median(t for t, _ in samples)
            dense_time = statistics.median(t for _, t in samples)
            if sparse_time >= dense_time:
                self._verdicts[key] = "dropped"
                self.stats.dropped.append({"tokens_bucket": f"{2 ** (key[0] - 1)}-{2 ** key[0] - 1}", "path": path,
                                           "sparse_ms": round(1e3 * sparse_time, 4),
                                           "dense_ms": round(1e3 * dense_time, 4)})


class SparseDown(_Swapped):
    """In place of a down-projection `nn.Linear`: dense, per-token or union, per call; its input's zeros decide."""

    def __init__(self, linear: nn.Linear, calibration, stats: LayerStats, timer: _Timer | None):
        super().__init__(linear, calibration, stats, timer)
        self.register_buffer("weight_t", linear.weight.detach().t().contiguous(), persistent=False)
        self._kernel_args = (self.weight_t, *self._weight_bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        fast = self._fast_calls.get(h.numel() // h.shape[-1])
        if fast is not None and not h.requires_grad:  # as little Python as possible: cold, it costs as much as the product
            return fast(h)
        if h.requires_grad or h.dtype != self.weight_t.dtype:
            return self.linear(h)
        flat = h.reshape(-1, h.shape[-1])
        tokens, width = flat.shape
        if self._skips_count(tokens):
            return self._dense(h)
        out = self._fused(tokens, width, (flat,), lambda: self.linear(flat))
        if out is None:
            bias = self.linear.bias
            out = self._run(flat, flat, lambda nonzero: {
                "per_token": lambda: _down_per_token(flat, self.weight_t, bias, nonzero),
                "union": lambda: _down_union(flat, self.weight_t, bias, nonzero)})
        return out.reshape(*h.shape[:-1], out.shape[-1])


class SparseGate(_Swapped):
    """In place of a gated MLP's multiplied projection: rows only for neurons the activation left nonzero.

    The activation runs first in the families' forwards (Llama: `down(act(gate_proj(x)) * up_proj(x))`
    evaluates the activation before `up_proj`; T5 gated likewise); a hook on the activation hands its
    output over, whose zeros decide. Without a fresh output of the right size the projection runs dense.
    """

    gated = True
    kernel_name = "gate_auto"

    def __init__(self, linear: nn.Linear, calibration, stats: LayerStats, timer: _Timer | None):
        super().__init__(linear, calibration, stats, timer)
        self._pattern: list[torch.Tensor | None] = [None]  # the activation's output, handed over by `take_pattern`
        self._kernel_args = self._weight_bias

    def take_pattern(self, act_output: torch.Tensor) -> None:
        self._pattern[0] = act_output  # its zeros are counted only when the gate runs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act_output, self._pattern[0] = self._pattern[0], None
        fast = self._fast_calls.get(x.numel() // x.shape[-1])
        if fast is not None and act_output is not None and not x.requires_grad:  # the kernel checks the sizes
            return fast(x, act_output)
        flat = x.reshape(-1, x.shape[-1])
        width = self.linear.out_features
        if x.requires_grad or act_output is None or act_output.numel() != flat.shape[0] * width \
                or x.dtype != self.linear.weight.dtype:
            return self.linear(x)
        if self._skips_count(flat.shape[0]):
            return self._dense(x)
        pattern = act_output.reshape(flat.shape[0], width)
        out = self._fused(flat.shape[0], flat.shape[1], (flat, pattern), lambda: self.linear(flat))
        if out is None:
            weight, bias = self.linear.weight, self.linear.bias
            out = self._run(flat, pattern, lambda nonzero: {
                "per_token": lambda: _gated_per_token(flat, weight, bias, pattern),
                "union": lambda: _gated_union(flat, weight, bias, nonzero)})
        return out.reshape(*x.shape[:-1], width)



class FusedGatedMLP:
    """A gated MLP block's own forward, replaced for one-token calls (decoding) once both of its swapped projections
    chose the compiled kernel at one token and passed their in-place checks: the whole block,
    `down(act(up(x)) * gate(x))`, in one compiled call over the activation's nonzeros (`gated_mlp_auto`), which
    counts and chooses as the projections' calls do and adds to both their tallies. At one token the two calls,
    the product between them and the Python around each cost about as much as the sparse rows themselves.

    The first fused call is checked against the block's own forward on the same input; a block that computes
    something else (a family whose forward is not that formula) keeps its own forward. Other calls (prompts,
    batches, gradients, arguments beyond the input) go to the block's own forward, whose projections are the
    swapped ones.
    """

    def __init__(self, block, gate: SparseGate, down: SparseDown):
        self.block, self.gate, self.down = block, gate, down
        self.own_forward = type(block.block).forward.__get__(block.block)
        self._call: Any = None  # the bound compiled call; False once the check refused it

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self._call is not False and not args and not kwargs and x.numel() == x.shape[-1] and not x.requires_grad:
            call = self._call or self._settle(x)
            if call:
                self.gate.stats.fused += 1
                return call(x, self.block.act(self.block.up(x)))
        return self.own_forward(x, *args, **kwargs)

    def _settle(self, x: torch.Tensor):
        """The fused call once both projections run the kernel at one token (None before; False if it computes
        something other than the block's own forward)."""
        kernels = _kernels()
        if kernels is None or not hasattr(kernels, "gated_mlp_auto") or x.dtype != torch.float32:
            return None
        settled = [getattr(m._fast_calls.get(1), "func", None) is m._kernel for m in (self.gate, self.down)]
        if not all(settled):
            return None
        limit = min(self.gate._plans[1][2], self.down._plans[1][2])
        call = functools.partial(kernels.gated_mlp_auto, *self.gate._weight_bias, self.down.weight_t,
                                 *self.down._weight_bias, limit, self.gate.stats.tally, self.down.stats.tally)
        # checked once with a limit of 1.0 (sparse whatever the count) against the block's own forward
        probe = functools.partial(kernels.gated_mlp_auto, *self.gate._weight_bias, self.down.weight_t,
                                  *self.down._weight_bias, 1.0, torch.zeros(4, dtype=torch.int64),
                                  torch.zeros(4, dtype=torch.int64))
        own = self.own_forward(x)
        fused = probe(x, self.block.act(self.block.up(x)))
        self._call = call if torch.allclose(fused, own, rtol=1e-4, atol=1e-5) else False
        return self._call
