"""The run folder's store of step checkpoints (`training.step_checkpoint.StepCheckpointStore`) for one pass.

A checkpoint is a folder `state/training_step_NNNNNN/` holding `tensors.safetensors` and `meta.json`,
written and recorded by `RunProgress.save_step_checkpoint` (atomic, sha256 of every file, one kept). On
resume the run is verified before anything is reused, so a changed checkpoint is refused, never loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from deftcompress.core.files import write_atomic
from deftcompress.pipeline.progress import RunProgress

TENSORS, META = "tensors.safetensors", "meta.json"


class RunStepCheckpoints:
    def __init__(self, progress: RunProgress, pass_folder: str):
        self.progress, self.pass_folder = progress, pass_folder

    def save(self, step: int, tensors: dict[str, Any], meta: dict[str, Any]) -> None:
        from safetensors.torch import save_file

        def write(folder: Path) -> None:
            save_file(tensors, str(folder / TENSORS))
            write_atomic(folder / META, json.dumps(meta) + "\n")

        self.progress.save_step_checkpoint(self.pass_folder, step, write)

    def load(self) -> tuple[dict[str, Any], dict[str, Any]] | None:
        from safetensors.torch import load_file

        folder = self.progress.step_checkpoint(self.pass_folder)
        if folder is None:
            return None
        return load_file(str(folder / TENSORS)), json.loads((folder / META).read_text())
