"""What a sparse path costs on this machine, and the choice it leads to (the sparse MLP runtime's cost model).

Per projection shape and token count: dense time, and linear fits in density of the per-token and union
paths (`LayerCosts`), timed with cold caches (`measure_costs`) at TOKEN_BUCKETS and log-interpolated between.
`SparseCalibration` measures each shape once per machine and keeps the fits in
`~/.cache/deftcompress/sparse_mlp.json` (or under $XDG_CACHE_HOME), keyed by torch, threads, CPU and kernels;
`FixedChoice` always picks one path. `_choose` takes a sparse path only where it is predicted faster than
dense by MARGIN.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from deftcompress.errors import DeftcompressError
from deftcompress.runtime.sparse_kernels import _down_per_token, _down_union, _gated_per_token, _gated_union
from deftcompress.runtime.sparse_kernels import load as _kernels

PATHS = ("dense", "per_token", "union")
TOKEN_BUCKETS = (1, 8, 64, 512)  # tokens per call at which the cost model is measured (log-interpolated between)
DENSITIES = (0.5, 0.2, 0.1, 0.05, 0.02)
MARGIN = 0.9  # take a sparse path only where its predicted time is below 90% of dense


@dataclass
class LayerCosts:
    """Seconds per call of one projection shape at one token count: dense, and linear fits in density."""

    dense: float
    per_token: tuple[float, float] | None  # (a, b): a + b * per-token density
    union: tuple[float, float] | None  # (c, e): c + e * union density

    def give_up_density(self) -> float:
        """Per-token density at or above which no sparse path can be chosen (the union is never below it):
        calls above it go dense after one count, without the union's extra passes."""
        limit = 0.0
        for fit in (self.per_token, self.union):
            if fit is not None:
                a, b = fit
                limit = max(limit, 1.0 if b <= 0 else (MARGIN * self.dense - a) / b)
        return min(max(limit, 0.0), 1.0)

    def predict(self, path: str, per_token: float, union: float) -> float:
        if path == "dense":
            return self.dense
        fit = self.per_token if path == "per_token" else self.union
        if fit is None:
            return math.inf
        return fit[0] + fit[1] * (per_token if path == "per_token" else union)


_SCRATCH: list[torch.Tensor] = []


def _evict_caches() -> None:
    """Read 32 MB between timed calls: in a model the other layers run in between, so no layer finds its
    weights in cache; timing with hot caches made sparse paths look faster than they are in place. Reading,
    not writing: written lines must be written back, and that cost fell on the timed call."""
    if not _SCRATCH:
        _SCRATCH.append(torch.zeros(8 * 1024 * 1024))
    _SCRATCH[0].sum()


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        _evict_caches()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares line y = a + b x."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs) or 1e-12
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var
    return my - b * mx, b


def _random_activations(tokens: int, width: int, density: float, generator: torch.Generator) -> torch.Tensor:
    h = torch.randn(tokens, width, generator=generator)
    return h * (torch.rand(tokens, width, generator=generator) < density)


def measure_costs(d_in: int, d_out: int, tokens: int, gated: bool, repeats: int = 15) -> LayerCosts:
    """Time one projection shape at `tokens` tokens: `gated` is the multiplied projection (rows of active
    neurons, input x), else the down-projection (input: the activations)."""
    g = torch.Generator().manual_seed(0)
    if gated:  # x [tokens, d_in] -> [tokens, d_out]; rows of W kept for the active neurons
        weight = torch.randn(d_out, d_in, generator=g) / math.sqrt(d_in)
        x = torch.randn(tokens, d_in, generator=g)
        dense = _median_seconds(lambda: F.linear(x, weight), repeats)
        per, pts, us, ts = [], [], [], []
        kernel = _kernels() is not None
        for density in DENSITIES:
            act = _random_activations(tokens, d_out, density, g)
            active = act != 0
            if kernel:  # it reads each active row once per call: the union's gain without its copies
                per.append(float(active.float().mean()))
                pts.append(_median_seconds(lambda: _gated_per_token(x, weight, None, act), repeats))
            else:
                us.append(float(active.any(0).float().mean()))
                ts.append(_median_seconds(lambda: _gated_union(x, weight, None, active), repeats))
        return LayerCosts(dense, _fit(per, pts), None) if kernel else LayerCosts(dense, None, _fit(us, ts))
    weight = torch.randn(d_out, d_in, generator=g) / math.sqrt(d_in)  # down: [d_model, d_ff]
    weight_t = weight.t().contiguous()
    per, pts, us, uts = [], [], [], []
    dense = None
    kernel = _kernels() is not None
    for density in DENSITIES:
        h = _random_activations(tokens, d_in, density, g)
        if dense is None:
            dense = _median_seconds(lambda: F.linear(h, weight), repeats)
        per.append(float((h != 0).float().mean()))
        pts.append(_median_seconds(lambda: _down_per_token(h, weight_t, None, h != 0), repeats))
        if not kernel:  # the kernel reads each active row once per call: the union's gain without its copies
            us.append(float((h != 0).any(0).float().mean()))
            uts.append(_median_seconds(lambda: _down_union(h, weight_t, None, h != 0), repeats))
    return LayerCosts(dense, _fit(per, pts), None if kernel else _fit(us, uts))


class SparseCalibration:
    """Cost models per (projection shape, token bucket), measured once per machine and cached on disk."""

    def __init__(self, path: str | os.PathLike | None = None, repeats: int = 15, progress=None):
        default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "deftcompress" / "sparse_mlp.json"
        self.path = Path(path) if path else default
        self.repeats = repeats
        self.progress = progress
        kernels = "C++ kernels v5" if _kernels() is not None else "PyTorch only"  # v5: no union path beside them
        self.key = (f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()} {_cpu_name()}, "
                    f"{kernels}, cold caches (read)")
        self._costs: dict[str, LayerCosts] = {}
        self._load()

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return
        for name, c in (data.get(self.key) or {}).items():
            self._costs[name] = LayerCosts(c["dense"], tuple(c["per_token"]) if c["per_token"] else None,
                                           tuple(c["union"]) if c["union"] else None)

    def _save(self) -> None:
        try:
            data = json.loads(self.path.read_text()) if self.path.is_file() else {}
        except ValueError:
            data = {}
        data[self.key] = {k: {"dense": v.dense, "per_token": v.per_token, "union": v.union} for k, v in self._costs.items()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(self.path)

    def costs(self, d_in: int, d_out: int, tokens: int, gated: bool) -> LayerCosts:
        """The cost model at `tokens`, interpolated (in log tokens) between the two nearest measured buckets."""
        low = max([b for b in TOKEN_BUCKETS if b <= tokens], default=TOKEN_BUCKETS[0])
        high = min([b for b in TOKEN_BUCKETS if b >= tokens], default=TOKEN_BUCKETS[-1])
        a, b = self._bucket(d_in, d_out, low, gated), self._bucket(d_in, d_out, high, gated)
        if low == high:
            return a
        w = (math.log(tokens) - math.log(low)) / (math.log(high) - math.log(low))
        mix = lambda x, y: None if x is None or y is None else tuple((1 - w) * p + w * q for p, q in zip(x, y))  # noqa: E731
        return LayerCosts((1 - w) * a.dense + w * b.dense, mix(a.per_token, b.per_token), mix(a.union, b.union))

    def _bucket(self, d_in: int, d_out: int, tokens: int, gated: bool) -> LayerCosts:
        name = f"{'gate' if gated else 'down'} {d_in}x{d_out} @{tokens}"
        if name not in self._costs:
            if self.progress:
                self.progress(f"calibrating sparse MLP: {name}")
            self._costs[name] = measure_costs(d_in, d_out, tokens, gated, self.repeats)
            self._save()
        return self._costs[name]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


class FixedChoice:
    """A stand-in calibration that always picks one path (tests, and the dense reference of a benchmark)."""

    def __init__(self, path: str):
        if path not in PATHS:
            raise DeftcompressError(f"sparse MLP path {path!r} is unknown (known: {', '.join(PATHS)})")
        self.path = path

    def costs(self, d_in, d_out, tokens, gated) -> LayerCosts:
        if gated:  # the multiplied projection: union, or per token with the compiled kernel
            per_token = self.path == "per_token" and _kernels() is not None
            return LayerCosts(0.0 if self.path == "dense" else 1.0, (0.0, 0.0) if per_token else None,
                              None if self.path == "dense" or per_token else (0.0, 0.0))
        fits = {p: (0.0, 0.0) if p == self.path else None for p in ("per_token", "union")}
        return LayerCosts(0.0 if self.path == "dense" else 1.0, fits["per_token"], fits["union"])


# ---- the choice -------------------------------------------------------------------------------

def _union_may_win(costs: LayerCosts, per_token: float) -> bool:
    """Whether measuring the union (two more passes) can change the choice: its time at the lowest union
    possible (the per-token density) beats dense and the per-token path."""
    if costs.union is None:
        return False
    bound = costs.union[0] + costs.union[1] * per_token
    return bound < MARGIN * costs.dense and bound < costs.predict("per_token", per_token, per_token)


def _choose(costs: LayerCosts, per_token: float, union: float | None) -> str:
    dense = costs.predict("dense", per_token, 1.0)
    best, best_time = "dense", dense
    for path in ("per_token", "union"):
        if path == "union" and union is None:
            continue
        t = costs.predict(path, per_token, union if union is not None else 1.0)
        if t < MARGIN * dense and t < best_time:
            best, best_time = path, t
    return best
