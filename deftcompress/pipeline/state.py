"""`PipelineState`: what every pass sees and changes, and how it is saved after a pass.

Passes replace `state.model` when they wrap or rebuild it, add constraints that bind later passes,
and write their own artifacts under `state.pass_dir(name)`. `save` / `restore` write and read the
state after a pass (model in its format, tokenizer, constraints), ready for resumable runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from deftcompress.architecture import ArchSpec
from deftcompress.core.protocol import Constraint, HoldsConstraints
from deftcompress.pipeline.recipe import Recipe
from deftcompress.data.tasks import TaskSpec, read_split, take_examples
from deftcompress.measurement.evaluation import EvalSettings

STATE_FILE = "state.json"


@dataclass
class PipelineState(HoldsConstraints):
    """What every pass sees. Passes replace `model` when they wrap or rebuild it."""

    recipe: Recipe
    task: TaskSpec
    arch: ArchSpec
    model: Any
    tokenizer: Any
    device: torch.device
    work_dir: Path  # the run's (temporary) output folder; passes may write artifacts under it
    quiet: bool = False
    constraints: list[Constraint] = field(default_factory=list)
    step_index: int = 0
    onnx: Any = None  # the exported graph (deftcompress.export.onnx.OnnxGraph) once an export pass ran
    step_checkpoints: Any = None  # the running pass's store of step checkpoints (training.step_checkpoint)
    _splits: dict[str, list] = field(default_factory=dict, repr=False)
    _examples: dict[tuple, list] = field(default_factory=dict, repr=False)

    @property
    def seed(self) -> int:
        return self.recipe.seed

    def examples(self, split: str, max_samples: int | None = None) -> list[dict]:
        """Rows of a split: each split is read once, subsets are taken from it (seeded)."""
        key = (split, max_samples)
        if key not in self._examples:
            if split not in self._splits:
                self._splits[split] = read_split(self.task, split, self.recipe.data_dir)
            self._examples[key] = take_examples(self._splits[split], split, max_samples, self.recipe.seed)
        return self._examples[key]

    def preload_splits(self, splits: dict[str, list]) -> None:
        """Splits already read (the pipeline reads them before any model loads)."""
        self._splits.update(splits)

    def eval_examples(self) -> list[dict]:
        return self.examples("validation", self.recipe.max_eval_samples)

    def eval_settings(self) -> EvalSettings:
        r = self.recipe
        return EvalSettings(density_mode=r.density_mode, density_tau=r.density_tau, batch_size=r.eval_batch_size,
                            max_seq_length=r.max_seq_length)

    def pass_dir(self, name: str) -> Path:
        path = self.work_dir / "passes" / f"{self.step_index:02d}_{name}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    # Constraints: training passes bind, enforce and release them (HoldsConstraints).

    # Saving and restoring: the state after a pass, complete enough to go on from there.
    def save(self, folder: str | os.PathLike) -> dict[str, Any]:
        """Write the model (exact: adapters stay separate), its tokenizer and the constraints to `folder`."""
        from safetensors.torch import save_file

        from deftcompress.models.formats import save_model

        folder = Path(folder)
        manifest = save_model(self.model, folder / "model", merge_adapters=False, tokenizer=self.tokenizer)
        saved = []
        for i, constraint in enumerate(self.constraints):
            tensors = constraint.state_tensors()
            if not tensors:
                raise RuntimeError(f"constraint {constraint.name} cannot be saved (it binds only the pass that made it)")
            file = f"constraint_{i:02d}_{constraint.name}.safetensors"
            save_file(tensors, str(folder / file))
            saved.append({"name": constraint.name, "file": file})
        onnx = None
        if self.onnx is not None:  # the graph stays where the export pass wrote it, inside the run folder
            onnx = dataclasses.asdict(self.onnx)
            onnx["folder"] = os.path.relpath(onnx["folder"], self.work_dir)
        (folder / STATE_FILE).write_text(json.dumps({"model_format": manifest["format"], "constraints": saved,
                                                     "step_index": self.step_index, "onnx": onnx}, indent=2) + "\n")
        return manifest

    def restore(self, folder: str | os.PathLike) -> None:
        """Replace model, tokenizer and constraints by what `save` wrote to `folder`."""
        from safetensors.torch import load_file

        from deftcompress.core.registry import constraint_class
        from deftcompress.models.formats import load_model

        folder = Path(folder)
        info = json.loads((folder / STATE_FILE).read_text())
        self.model, self.tokenizer, self.arch = load_model(folder / "model", None, self.device)
        self.constraints = [constraint_class(c["name"]).from_state(load_file(str(folder / c["file"])))
                            for c in info["constraints"]]
        self.step_index = info["step_index"]
        if info.get("onnx"):
            from deftcompress.export.onnx import OnnxGraph

            self.onnx = OnnxGraph(**{**info["onnx"], "folder": str(self.work_dir / info["onnx"]["folder"])})
