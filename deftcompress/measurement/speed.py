"""Latency and memory of models on one fixed workload, measured side by side in one process.

    result = compare_speed({"before": old, "after": new}, tokenizer, task, arch, rows, batch_sizes=(1, 32))
    latency = step_latency(model, tokenizer, task, arch, rows, eval_batch_size=64)   # one model, one run's steps

A "model" is a torch module or any callable that runs a `Batch` (e.g. `runtime.onnxruntime.onnx_forward(...)` for
an exported graph: measurement times PyTorch, runtime builds the rest); memory is measured for torch modules only.

Timing on a shared machine is only comparable within one process and one stretch of time, so the
models take turns (the order alternates every repetition) on the same batches (same rows, same
padding: each batch padded to its longest row), and the median of the repetitions is reported,
with ratios to the first model. The forward is the one training and evaluation use (labels given,
teacher-forced decoder for text-to-text models), under `torch.inference_mode`.

Memory, two figures per model:
- `weight_bytes`: bytes of the parameters and buffers in memory (shared storage counted once);
- `peak_forward_bytes`: the peak of the bytes held by tensors that one forward of the largest batch
  allocates. On CUDA this is `torch.cuda.max_memory_allocated` above the level before the forward;
  on the CPU, where torch keeps no allocator statistics, a dispatch mode adds the bytes of every new
  storage an operator returns and subtracts them when the storage is freed (views are not counted).
  `peak_bytes` is their sum: what an evaluation batch needs.
"""

from __future__ import annotations

import os
import statistics
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from deftcompress.data.features import Batch, collate, encode_examples
from deftcompress.measurement.size import state_dict_bytes


class _LiveAllocations(TorchDispatchMode):
    """Tracks the bytes of storages created by operators while active, and their peak."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}

    def _freed(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_storage_ptr(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
                continue
            try:
                storage = t.untyped_storage()
            except (RuntimeError, NotImplementedError):  # quantized or opaque tensors: not counted
                continue
            key, size = id(storage), storage.nbytes()
            if size == 0 or key in self._sizes or storage.data_ptr() in inputs:
                continue  # a view of an input, or already counted
            self._sizes[key] = size
            self.live += size
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._freed, key)  # storages keep their Python object while alive
        return out


def _storage_ptr(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None


def peak_forward_bytes(model: nn.Module, batch: Batch) -> int:
    """Peak bytes of the tensors one forward of `batch` allocates (see the module docstring)."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    batch = batch.to(device)
    with torch.inference_mode():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            start = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            model(**batch.inputs)
            torch.cuda.synchronize(device)
            return int(torch.cuda.max_memory_allocated(device) - start)
        with _LiveAllocations() as tracker:
            out = model(**batch.inputs)
            del out
        return int(tracker.peak)


@dataclass
class SpeedResult:
    """Per model: median seconds per batch at each batch size, memory, and ratios to the first model."""

    batch_sizes: tuple[int, ...]
    rows: int
    repeats: int
    seconds: dict[str, dict[int, float]] = field(default_factory=dict)
    spread: dict[str, dict[int, tuple[float, float]]] = field(default_factory=dict)  # quartiles of the repeats
    memory: dict[str, dict[str, int]] = field(default_factory=dict)
    others_load: float | None = None  # share of the machine other processes used while this ran (0 = idle)

    def ratio(self, name: str, batch_size: int, reference: str | None = None) -> float:
        reference = reference or next(iter(self.seconds))
        return self.seconds[name][batch_size] / self.seconds[reference][batch_size]

    def memory_ratio(self, name: str, what: str, reference: str | None = None) -> float | None:
        reference = reference or next(iter(self.memory))
        mine, theirs = self.memory[name][what], self.memory[reference][what]
        return None if mine is None or theirs is None else mine / max(theirs, 1)

    def to_dict(self) -> dict[str, Any]:
        names = list(self.seconds)
        return {
            "workload": {"rows": self.rows, "batch_sizes": list(self.batch_sizes), "repeats": self.repeats,
                         "statistic": "median ms per batch; models alternate in one process",
                         "memory": "weights in memory + peak bytes allocated by one forward of the largest batch"},
            "models": {n: {**{f"ms_batch_{b}": round(1000 * s, 3) for b, s in self.seconds[n].items()},
                           **{f"iqr_batch_{b}": [round(1000 * q, 3) for q in qs] for b, qs in self.spread.get(n, {}).items()},
                           **self.memory[n],
                           **{f"latency_ratio_batch_{b}": round(self.ratio(n, b), 4) for b in self.batch_sizes},
                           "weight_ratio": _rounded(self.memory_ratio(n, "weight_bytes")),
                           "peak_ratio": _rounded(self.memory_ratio(n, "peak_bytes"))}
                       for n in names},
        }


def _rounded(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def fixed_batches(tokenizer, task, arch, rows: list[dict], batch_size: int, max_seq_length: int = 128,
                  max_target_length: int = 32) -> list[Batch]:
    """The rows in order, `batch_size` at a time, each batch padded to its longest row."""
    features = encode_examples(tokenizer, task, arch, rows, max_seq_length, max_target_length)
    return [collate(tokenizer, task, arch, features[i:i + batch_size], "longest", max_seq_length, max_target_length)
            for i in range(0, len(features), batch_size)]


Forward = Callable[[Batch], Any]


def step_latency(model: nn.Module | Forward, tokenizer, task, arch, rows: list[dict], eval_batch_size: int,
                 repeats: int = 3, batch_one_rows: int = 8, max_seq_length: int = 128,
                 max_target_length: int = 32) -> dict[str, Any]:
    """Median ms per batch at batch 1 (the first `batch_one_rows` rows) and at `eval_batch_size` (the first
    `eval_batch_size` rows, one batch): the same workload for every step of a run, whatever its density mode."""
    sizes = (1, eval_batch_size) if eval_batch_size != 1 else (1,)
    workloads = {b: fixed_batches(tokenizer, task, arch, rows[:batch_one_rows] if b == 1 else rows[:b], b,
                                  max_seq_length, max_target_length) for b in sizes}
    device = _device_of(model)
    if isinstance(model, nn.Module):
        model.eval()
    _run(model, workloads[1][:1], device)  # warm-up
    times = {b: [_run(model, workloads[b], device) / len(workloads[b]) for _ in range(repeats)] for b in sizes}
    out: dict[str, Any] = {f"ms_batch_{b}": round(1000 * statistics.median(t), 3) for b, t in times.items()}
    if repeats >= 2:  # the spread of the repeats: a ratio smaller than it is noise (the report marks it)
        out.update({f"iqr_batch_{b}": [round(1000 * q, 3) for q in quartiles(t)] for b, t in times.items()})
    out.update({"rows": {b: sum(x.size for x in workloads[b]) for b in sizes}, "repeats": repeats,
                "padding": "longest per batch"})
    return out


def _device_of(model) -> torch.device:
    if isinstance(model, nn.Module):
        return next((p.device for p in model.parameters()), torch.device("cpu"))
    return torch.device("cpu")


def compare_speed(models: dict[str, nn.Module | Forward], tokenizer, task, arch, rows: list[dict],
                  batch_sizes: tuple[int, ...] = (1, 32), repeats: int = 5, max_seq_length: int = 128,
                  max_target_length: int = 32, batch_one_rows: int = 16, progress: bool = False) -> SpeedResult:
    """Median latency per batch of each model at each batch size, and memory; see the module docstring.

    Batch size 1 runs the first `batch_one_rows` rows one at a time (enough for a stable median);
    larger sizes run all `rows`.
    """
    from tqdm.auto import tqdm

    workloads = {b: fixed_batches(tokenizer, task, arch, rows[:batch_one_rows] if b == 1 else rows, b,
                                  max_seq_length, max_target_length) for b in batch_sizes}
    names = list(models)
    result = SpeedResult(batch_sizes=tuple(batch_sizes), rows=len(rows), repeats=repeats)
    timings: dict[str, dict[int, list[float]]] = {n: {b: [] for b in batch_sizes} for n in names}
    devices = {n: _device_of(m) for n, m in models.items()}
    for n in names:
        if isinstance(models[n], nn.Module):
            models[n].eval()
        _run(models[n], workloads[batch_sizes[0]][:1], devices[n])  # warm-up: first calls allocate and dispatch
    bar = tqdm(total=repeats * len(names), desc="latency", disable=not progress, leave=False)
    with OthersLoad() as load:
        for r in range(repeats):
            for n in (names if r % 2 == 0 else names[::-1]):
                for b in batch_sizes:
                    timings[n][b].append(_run(models[n], workloads[b], devices[n]) / len(workloads[b]))
                bar.update(1)
    bar.close()
    result.others_load = load.share
    largest = max(workloads[max(batch_sizes)], key=lambda batch: batch.inputs["input_ids"].numel())
    for n in names:
        result.seconds[n] = {b: statistics.median(timings[n][b]) for b in batch_sizes}
        result.spread[n] = {b: quartiles(timings[n][b]) for b in batch_sizes}
        if not isinstance(models[n], nn.Module):
            result.memory[n] = {"weight_bytes": None, "peak_forward_bytes": None, "peak_bytes": None}
            continue
        weights = state_dict_bytes(models[n])  # parameters and buffers (packed int8 too), shared storage once
        peak = peak_forward_bytes(models[n], largest)
        result.memory[n] = {"weight_bytes": weights, "peak_forward_bytes": peak, "peak_bytes": weights + peak}
    return result


def quartiles(values: list[float]) -> tuple[float, float]:
    """First and third quartile of repeated timings (both the value itself for one repeat)."""
    if len(values) < 2:
        return (values[0], values[0]) if values else (float("nan"), float("nan"))
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


class OthersLoad:
    """The share of the machine's CPU time that OTHER processes used during a `with` block (Linux /proc/stat;
    None elsewhere): timings taken while it is high compare a loaded machine, not the models."""

    def __init__(self):
        self.share: float | None = None

    @staticmethod
    def _busy_and_total() -> tuple[int, int] | None:
        try:
            fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields) - idle, sum(fields)

    def __enter__(self) -> "OthersLoad":
        self._start, self._own = self._busy_and_total(), os.times()
        return self

    def __exit__(self, *exc) -> None:
        end, own = self._busy_and_total(), os.times()
        if self._start is None or end is None:
            return
        ticks = os.sysconf("SC_CLK_TCK")
        busy, total = end[0] - self._start[0], end[1] - self._start[1]
        mine = (own.user + own.system - self._own.user - self._own.system) * ticks
        if total > 0:
            self.share = round(max(0.0, busy - mine) / total, 3)


def _run(model: nn.Module | Forward, batches: list[Batch], device: torch.device) -> float:
    moved = [b.to(device) for b in batches]
    call = (lambda b: model(**b.inputs)) if isinstance(model, nn.Module) else model
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        for b in moved:
            call(b)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start
