"""Timing the final models of several finished runs side by side, for `deftcompress compare`.

Each run is timed as it is deployed: its `model/` folder in PyTorch, or its exported graph in
onnxruntime when its last step was measured there. Every model runs the same evaluation rows
(the first `rows` of the task's validation split) at batch 1 and at the first run's evaluation
batch size, alternating, in this process (`measurement.speed.compare_speed`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from deftcompress.errors import DeftcompressError
from deftcompress.reporting.compare_tables import CompareRow


LOADED = 0.25  # other processes using more than a quarter of the machine make a timing a measure of them


def time_runs(rows: list[CompareRow], workload, progress: bool = True, data_dir: str | None = None) -> dict[str, Any]:
    """Fill each row's latency (ms per batch and ratio to the first row); returns what was timed and how. The rows
    come from `data_dir` if given, else from the data folder the first run recorded."""
    import torch

    from deftcompress.architecture import spec_for_model_type
    from deftcompress.core.model_refs import unmarked_model_type
    from deftcompress.data.tasks import get_task, load_examples
    from deftcompress.export.onnx import CLASSIFIER_FILE
    from deftcompress.measurement.speed import compare_speed
    from deftcompress.models.formats import load_model
    from deftcompress.reporting.report import Report
    from deftcompress.runtime.onnxruntime import onnx_forward

    if workload.threads:
        torch.set_num_threads(workload.threads)
    reports = [Report.load(r.folder) for r in rows]
    tasks = {rep.task for rep in reports}
    families = {spec_for_model_type(unmarked_model_type(
                    json.loads((Path(r.folder) / "model" / "config.json").read_text())["model_type"])).family
                for r in rows if (Path(r.folder) / "model" / "config.json").is_file()}
    if len(tasks) > 1 or len(families) > 1:
        raise DeftcompressError(f"compare times runs of one task and model family side by side; got tasks {sorted(tasks)} "
                                f"and families {sorted(families)} (use --no-timing to tabulate them anyway)")
    resolved = yaml.safe_load((Path(rows[0].folder) / "recipe.resolved.yaml").read_text()) or {}
    task = get_task(resolved.get("task") or reports[0].task)  # own-data tasks are given by their mapping
    examples = load_examples(task, "validation", data_dir or resolved.get("data_dir"), workload.rows)
    models: dict[str, Any] = {}
    tokenizer = arch = None
    notes = []
    for row, rep in zip(rows, reports):
        model, row_tokenizer, row_arch = load_model(Path(row.folder) / "model", None)
        tokenizer, arch = tokenizer or row_tokenizer, arch or row_arch
        onnx = (rep.final or {}).get("onnx")
        if row.runtime == "onnxruntime" and onnx:
            if row_arch.text_to_text:
                notes.append(f"{row.name}: a text-to-text graph; its PyTorch model/ was timed instead")
                models[row.name] = model
            else:
                models[row.name] = onnx_forward(str(Path(row.folder) / onnx["folder"]), CLASSIFIER_FILE, spinning=False)
        else:
            models[row.name] = model
    batch = int(resolved.get("eval_batch_size") or 64)
    sizes = (1, batch) if batch != 1 else (1,)
    result = compare_speed(models, tokenizer, task, arch, examples, batch_sizes=sizes, repeats=workload.repeats,
                           max_seq_length=int(resolved.get("max_seq_length") or 128), progress=progress)
    loaded = (result.others_load or 0.0) > LOADED and not getattr(workload, "rank_loaded", False)
    from deftcompress.pipeline.memory_probe import peak_added_bytes

    for row, rep in zip(rows, reports):  # each artifact alone in a fresh process: memory no other model shares
        onnx = (rep.final or {}).get("onnx")
        graph = not isinstance(models[row.name], torch.nn.Module)  # the graph was timed, not model/
        row.peak_memory_bytes = peak_added_bytes(
            row.folder, "onnxruntime" if graph else "torch", str(Path(row.folder) / onnx["folder"]) if graph else None,
            data_dir or resolved.get("data_dir"), resolved.get("task") or rep.task, workload.rows, batch,
            int(resolved.get("max_seq_length") or 128))
    for row in rows:
        row.latency_ms = {f"b{b}": round(1000 * result.seconds[row.name][b], 3) for b in sizes}
        row.latency_spread = {f"b{b}": [round(1000 * q, 3) for q in result.spread[row.name][b]] for b in sizes}
        row.latency_ratio = {} if loaded else {f"b{b}": round(result.ratio(row.name, b), 4) for b in sizes}
        row.timing, row.timing_load = ("loaded" if loaded else "compare"), result.others_load or 0.0
    return {"batch_sizes": list(sizes), "examples": len(examples), "threads": torch.get_num_threads(),
            "statistic": "median ms per batch over alternating repetitions in one process; spread = quartiles",
            "others_load": result.others_load, "ranked": not loaded, "notes": notes,
            "memory": "peak resident memory a fresh process added to load the artifact and run one batch of the "
                      "largest size (Linux high-water mark)"}
