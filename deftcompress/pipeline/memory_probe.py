"""Peak memory of a run's deployed artifact, measured in a fresh process so that no other artifact shares it.

`compare` times every run in one process (the fair way to time), but memory in that process belongs to
whatever was loaded before. So each artifact is also loaded once in its own child process
(`python -m deftcompress.pipeline.memory_probe`): the child imports the libraries, builds the batch, resets
the resident-memory high-water mark (Linux: "5" into /proc/self/clear_refs), loads the artifact (the graph in
onnxruntime, or `model/` in PyTorch), runs one batch, and reports the high-water mark above its resident
memory before the load. Where the mark cannot be reset the figure is None.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any


def _status_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def peak_added_bytes(folder: str, runtime: str, onnx_folder: str | None, data_dir: str | None, task: Any,
                     rows: int, batch: int, max_seq_length: int, timeout: float = 600) -> int | None:
    """Peak resident bytes a fresh process adds to load one artifact and run one batch of `batch` rows."""
    job = {"folder": folder, "runtime": runtime, "onnx_folder": onnx_folder, "data_dir": data_dir, "task": task,
           "rows": rows, "batch": batch, "max_seq_length": max_seq_length}
    try:
        done = subprocess.run([sys.executable, "-m", "deftcompress.pipeline.memory_probe", json.dumps(job)],
                              capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])["peak_added_bytes"]
    except (ValueError, KeyError, IndexError):
        return None


def _probe(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    from deftcompress.data.tasks import get_task, load_examples
    from deftcompress.measurement.speed import fixed_batches
    from deftcompress.models.formats import load_model
    from deftcompress.models.loading import load_tokenizer
    from deftcompress.runtime.onnxruntime import onnx_forward
    from deftcompress.architecture import spec_for_model_type
    from deftcompress.core.model_refs import unmarked_model_type

    torch.set_num_threads(1)
    task = get_task(job["task"])
    model_dir = Path(job["folder"]) / "model"
    examples = load_examples(task, "validation", job["data_dir"], job["rows"])
    tokenizer = load_tokenizer(str(model_dir))  # tokenizer and batch before the mark: the same for every runtime
    arch = spec_for_model_type(unmarked_model_type(json.loads((model_dir / "config.json").read_text())["model_type"]))
    batches = fixed_batches(tokenizer, task, arch, examples, job["batch"], job["max_seq_length"])
    largest = max(batches, key=lambda b: b.inputs["input_ids"].numel())
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return {"peak_added_bytes": None}
    before = _status_bytes("VmRSS")
    if job["runtime"] == "onnxruntime":
        run = onnx_forward(job["onnx_folder"], "model.onnx", threads=1, spinning=False)
    else:
        model, _, _ = load_model(model_dir, None)
        model.eval()
        run = lambda b: model(**b.inputs)  # noqa: E731
    with torch.inference_mode():
        run(largest)
    peak = _status_bytes("VmHWM")
    return {"peak_added_bytes": None if peak is None or before is None else max(peak - before, 0)}


if __name__ == "__main__":
    print(json.dumps(_probe(json.loads(sys.argv[1]))))
