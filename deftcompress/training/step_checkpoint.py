"""Step checkpoints of a running training: what resuming inside a pass needs to continue with identical numbers.

Every `save_steps` optimizer steps the loop hands a snapshot to the run's `StepCheckpointStore` (the pipeline
writes it atomically into the run folder and records every file's sha256, `deftcompress.pipeline.progress`).
A snapshot holds the trainable weights, AdamW's moments, the schedule's position, the random state (dropout),
the loss controllers' state (DEFT's per-layer multipliers, ADA-DEFT's gate decisions), the best weights kept
so far, and the tallies the report is made of. Tensors go to safetensors and the rest to JSON: nothing is
unpickled on resume. The data order needs nothing saved: each epoch's batches follow from the seed.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import torch

SNAPSHOT_FORMAT = 1


class StepCheckpointStore(Protocol):
    """Where a training's step checkpoints go (the pipeline's run folder; None in a context without one)."""

    def save(self, step: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None: ...

    def load(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None: ...


def snapshot(run, tally, epoch: int, done_in_epoch: int, sums: dict[str, float]) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and the JSON-able rest of a training after `tally.step` optimizer steps."""
    tensors: dict[str, torch.Tensor] = {f"param.{name}": p.detach() for name, p in run.params}
    optimizer = run.optimizer.state_dict()
    for index, state in optimizer["state"].items():
        for key, value in state.items():
            tensors[f"optim.{index}.{key}"] = value if isinstance(value, torch.Tensor) else torch.tensor(value)
    tensors["rng.torch"] = torch.get_rng_state()
    extra_scalars: dict[str, Any] = {}
    if hasattr(run.extra_loss, "state_dict"):
        for key, value in run.extra_loss.state_dict().items():
            if isinstance(value, torch.Tensor):
                tensors[f"extra.{key}"] = value
            else:
                extra_scalars[key] = value
    for kind in ("best_weights", "best_step_weights"):
        for i, w in enumerate(getattr(tally, kind) or []):
            tensors[f"{kind}.{i}"] = w
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {
        "format": SNAPSHOT_FORMAT, "step": tally.step, "epoch": epoch, "done_in_epoch": done_in_epoch,
        "total_steps": run.plan.total_steps, "params": [name for name, _ in run.params],
        "optimizer_groups": optimizer["param_groups"], "scheduler": _plain(run.scheduler.state_dict()),
        "sums": dict(sums), "extra": extra_scalars,
        "tally": {"train_seconds": tally.train_seconds, "step_seconds": list(tally.step_seconds),
                  "epochs": [dataclasses.asdict(e) for e in tally.epochs], "step_evals": list(tally.step_evals),
                  "best_score": _finite(tally.best_score), "best_epoch": tally.best_epoch, "best_step": tally.best_step,
                  "best_step_score": _finite(tally.best_step_score),
                  "best_weights": tally.best_weights is not None, "best_step_weights": tally.best_step_weights is not None},
    }
    return tensors, meta


def restore(run, tally, tensors: dict[str, torch.Tensor], meta: dict[str, Any], epoch_log_type) -> tuple[int, int, dict]:
    """Put a snapshot back into the training; returns (epoch, batches done in it, the epoch's running sums)."""
    names = [name for name, _ in run.params]
    if meta.get("format") != SNAPSHOT_FORMAT or meta.get("params") != names or meta.get("total_steps") != run.plan.total_steps:
        raise ValueError("the step checkpoint belongs to another training (trainable parameters or step count differ)")
    with torch.no_grad():
        for name, p in run.params:
            p.copy_(tensors[f"param.{name}"].to(p.device, p.dtype))
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, field = key.split(".", 2)
            state.setdefault(int(index), {})[field] = value
    device = run.params[0][1].device
    state = {i: {k: v.to(device) if k != "step" else v for k, v in s.items()} for i, s in state.items()}
    run.optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer_groups"]})
    run.scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    if hasattr(run.extra_loss, "load_state_dict"):
        extra = {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}
        run.extra_loss.load_state_dict({**extra, **meta.get("extra", {})})
    t = meta["tally"]
    tally.step, tally.train_seconds, tally.step_seconds = meta["step"], t["train_seconds"], list(t["step_seconds"])
    tally.epochs = [epoch_log_type(**e) for e in t["epochs"]]
    tally.step_evals = list(t["step_evals"])
    tally.best_score, tally.best_epoch = _infinite(t["best_score"]), t["best_epoch"]
    tally.best_step, tally.best_step_score = t["best_step"], _infinite(t["best_step_score"])
    for kind in ("best_weights", "best_step_weights"):
        if t[kind]:
            setattr(tally, kind, [tensors[f"{kind}.{i}"] for i in range(len(run.params))])
    return meta["epoch"], meta["done_in_epoch"], dict(meta["sums"])


def _plain(value: Any) -> Any:
    """A scheduler's state as JSON holds it (tuples as lists; callables it cannot save as None)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    return None


def _finite(x: float) -> float | None:
    return None if x == -float("inf") else x


def _infinite(x: float | None) -> float:
    return -float("inf") if x is None else x
