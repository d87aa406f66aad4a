"""The one folder a deployer ships: `deploy/` when the run ends in an exported graph, else `model/` itself.

A run that ends measured in onnxruntime deploys the graph it measured (the int8 graph after
`quantize: ort_int8`), not the float PyTorch model in `model/`. That graph's folder is copied to `deploy/`
(the .onnx files, config.json, the tokenizer) with a card that describes exactly that graph: its score,
measured in onnxruntime on the run's evaluation rows, its size and the lines that load it with onnxruntime
or optimum, without deftcompress. A run that ends in PyTorch deploys `model/`, whose card already
describes it. `report.json` records the choice under `final.deploy`; `report.md` and the CLI name it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from deftcompress.models.loading import NEW_HEAD_NOTE
from deftcompress.pipeline.run_files import RunFolderError, remove_own_folder
from deftcompress.reporting.model_card import write_deploy_card
from deftcompress.reporting.report import Report, measured_in_onnxruntime, measuring_step

DEPLOY_DIR = "deploy"


def write_deploy_folder(out: Path, report: Report, graph, begin, passes: str, recipe_yaml: str,
                        model_changed: bool = True) -> dict[str, Any]:
    """Write `deploy/` when the run's last measurement ran the exported graph; return `final.deploy` for the report.

    `graph` is the run's exported graph (or None); `begin(name)` records a folder about to be written, so a kill
    leaves it to be deleted on resume; `model_changed`: whether any pass changed the model (an evaluate-only run
    of a base checkpoint with a new random head has nothing to ship).
    """
    step = measuring_step(report.steps)
    new_head = any(NEW_HEAD_NOTE in note for note in report.steps[0].details.get("notes", []))
    if new_head and not model_changed:
        return {"folder": None, "runtime": None, "score": step.task_score, "metric": step.task_metric,
                "rows": step.eval_examples, "step": step.index,
                "why": "no pass changed the model and its task head was initialised anew (random weights): a "
                       "measurement of the base model, nothing to ship"}
    if graph is None or not measured_in_onnxruntime(step):
        return {"folder": "model", "runtime": "torch", "score": step.task_score, "metric": step.task_metric,
                "rows": step.eval_examples, "step": step.index}
    source = Path(graph.folder)
    target, partial = out / DEPLOY_DIR, out / f"{DEPLOY_DIR}.partial"
    if target.exists() or target.is_symlink():
        raise RunFolderError(f"{target}: exists, but this run did not write it; move it out and run again")
    begin(f"{DEPLOY_DIR}.partial", DEPLOY_DIR)
    if partial.exists():
        remove_own_folder(out, partial.name)
    partial.mkdir()
    for path in sorted(source.iterdir()):
        if path.is_symlink() or not path.is_file():
            raise OSError(f"{path}: not a plain file in the exported graph's folder")
        shutil.copyfile(path, partial / path.name, follow_symlinks=False)
    graph_bytes = sum((partial / f).stat().st_size for f in graph.files)
    info = {"folder": DEPLOY_DIR, "runtime": "onnxruntime", "kind": graph.kind, "graph": graph.main_file(),
            "files": sorted(graph.files),
            "graph_bytes": graph_bytes, "quantized": graph.quantized, "density_outputs": graph.density_outputs,
            "copied_from": os.path.relpath(source, out), "score": step.task_score, "metric": step.task_metric,
            "rows": step.eval_examples, "step": step.index}
    write_deploy_card(partial, report, step, info, passes, recipe_yaml)
    partial.rename(target)
    return info

