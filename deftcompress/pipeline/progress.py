"""A run's progress in its folder: what finished, the state to go on from, and the recipe it belongs to.

    runs/<name>/
      .deftcompress-run          marker (this folder is a run of ours)
      recipe.resolved.yaml       the recipe with every default filled in
      progress.json              the commit point: recipe hash, finished steps, the state to resume from
      state/after_step_NN/       the state after the last pass that changed the model (PipelineState.save)
      passes/NN_<pass>/          what passes wrote (adapters, ...)
      report.json, report.md     the report so far (status: running, failed, interrupted, finished)
      model/, density.png        written when the run finishes

`progress.json` is replaced atomically after every finished step, and only after the state it
points to is complete, so a kill at any moment leaves a folder that resumes after its last finished
pass. Everything else in the folder is derived from it and rewritten on resume.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deftcompress.pipeline.run_folder import MARKER, RunFolderError, is_run_folder, write_marker
from deftcompress.reporting.report import Report, write_atomic

if TYPE_CHECKING:
    from deftcompress.pipeline.recipe import Recipe
    from deftcompress.pipeline.state import PipelineState

PROGRESS = "progress.json"
STATE_DIR = "state"
PROGRESS_FORMAT = 1


def recipe_hash(recipe: "Recipe", model_ref: str) -> str:
    """sha256 of what decides a run's numbers: the resolved recipe (not its name or output folder), the data
    and model paths (`model_ref`: the recipe's model, resolved by `resolve_model_ref`)."""
    from deftcompress.data.tasks import data_root

    resolved = recipe.to_dict()
    for key in ("name", "output_dir", "data_dir", "latency_repeats"):  # none of these changes a score
        resolved.pop(key, None)
    root = data_root(recipe.data_dir)
    resolved["data"] = str(root.resolve()) if root is not None else "hub"
    model = Path(model_ref).expanduser()
    resolved["model"] = str(model.resolve()) if model.exists() else recipe.model
    return hashlib.sha256(json.dumps(resolved, sort_keys=True, default=str).encode()).hexdigest()


class RunProgress:
    """Reads and commits `progress.json` of one run folder (only the main process writes)."""

    def __init__(self, folder: Path, data: dict[str, Any], main: bool = True, recipe_yaml: str = ""):
        self.folder = folder
        self.data = data
        self.main = main
        self.recipe_yaml = recipe_yaml  # written with the marker when a new run's folder is created

    # -- opening ---------------------------------------------------------------------------------

    @classmethod
    def open(cls, folder: Path, digest: str, restart: bool = False, main: bool = True,
             recipe_yaml: str = "") -> "RunProgress":
        """The progress of `folder` for a recipe with hash `digest`: new, resumed, finished, or refused.

        A new run's folder is created at its first commit (the baseline), so a run that fails while
        loading its model writes nothing.
        """
        path = folder / PROGRESS
        if main and folder.is_dir() and is_run_folder(folder):
            data = _read(path) if path.is_file() and not restart else None
            if data is None and not restart and any(e.name != MARKER for e in folder.iterdir()):
                raise RunFolderError(f"{folder}: a run folder without {PROGRESS} (an older version wrote it); use "
                                     "--restart to replace it, or choose another output folder")
            if data is not None and data.get("recipe_hash") != digest:
                raise RunFolderError(f"{folder}: holds a run of another recipe (recipe hash {str(data.get('recipe_hash'))[:12]}, "
                                     f"this one {digest[:12]}); use --restart to replace it, or choose another output folder")
            if data is not None:
                return cls(folder, data, main)
            _clear_run_folder(folder)
        elif not main and path.is_file():  # other processes of a torchrun job follow what the main process found
            return cls(folder, _read(path), main)
        data = {"format": PROGRESS_FORMAT, "recipe_hash": digest, "status": "running", "steps": [], "model_state": None,
                "last_eval_settings": None, "model_changed_since_eval": False}
        return cls(folder, data, main, recipe_yaml)

    def _ensure_folder(self) -> None:
        if (self.folder / MARKER).is_file():
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        write_marker(self.folder)
        if self.recipe_yaml:
            write_atomic(self.folder / "recipe.resolved.yaml", self.recipe_yaml)

    @property
    def recipe_hash(self) -> str:
        return self.data["recipe_hash"]

    @property
    def finished(self) -> bool:
        return self.data.get("status") == "finished" and (self.folder / "report.json").is_file()

    @property
    def steps(self) -> list[dict[str, Any]]:
        return list(self.data["steps"])

    @property
    def model_state(self) -> str | None:
        return self.data.get("model_state")

    @property
    def model_changed_since_eval(self) -> bool:
        return bool(self.data.get("model_changed_since_eval"))

    def last_eval_settings(self, default):
        saved = self.data.get("last_eval_settings")
        return dataclasses.replace(default, **saved) if saved else default

    # -- committing ------------------------------------------------------------------------------

    def commit(self, state: "PipelineState", report: Report, model_changed: bool, last_eval_settings,
               model_changed_since_eval: bool = False) -> None:
        """Record the step just finished (the last one of `report.steps`); save the model first if it changed."""
        if not self.main:
            return
        self._ensure_folder()
        index = len(report.steps) - 1
        previous = self.model_state
        if model_changed:
            name = f"{STATE_DIR}/after_step_{index:02d}"
            tmp = self.folder / f"{name}.tmp"
            if tmp.exists():
                shutil.rmtree(tmp)
            state.save(tmp)
            final = self.folder / name
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            self.data["model_state"] = name
        self.data["steps"] = [s.to_dict() for s in report.steps]
        self.data["last_eval_settings"] = dataclasses.asdict(last_eval_settings)
        self.data["model_changed_since_eval"] = model_changed_since_eval
        self.data["status"] = "running"
        self._write()  # the commit point
        if model_changed and previous and previous != self.model_state:
            shutil.rmtree(self.folder / previous, ignore_errors=True)
        report.status = "running"
        report.write(self.folder)

    def finish(self, report: Report) -> None:
        """The final outputs are written: mark the run finished and drop the resume state (model/ holds the result)."""
        self.data["status"] = "finished"
        self.data["steps"] = [s.to_dict() for s in report.steps]
        self.data["model_state"] = None
        self._write()
        shutil.rmtree(self.folder / STATE_DIR, ignore_errors=True)

    def stopped(self, exc: BaseException) -> None:
        """The run stopped in a pass: say so in the report; finished passes stay committed."""
        if not (self.folder / PROGRESS).is_file():
            return  # stopped before the first commit: nothing was written, nothing to mark
        interrupted = isinstance(exc, KeyboardInterrupt)
        self.data["status"] = "interrupted" if interrupted else "failed"
        self._write()
        path = self.folder / "report.json"
        if path.is_file():
            report = Report.load(self.folder)
            report.status = self.data["status"]
            report.error = None if interrupted else f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            report.write(self.folder)

    def clear_unfinished_pass_dirs(self) -> None:
        """Remove what an interrupted pass left half-written (passes/NN_* after the last finished step, temp states)."""
        if not self.main or not self.folder.is_dir():
            return
        done = len(self.data["steps"]) - 1
        passes = self.folder / "passes"
        if passes.is_dir():
            for entry in passes.iterdir():
                prefix = entry.name.split("_", 1)[0]
                if prefix.isdigit() and int(prefix) > done:
                    shutil.rmtree(entry, ignore_errors=True)
        states = self.folder / STATE_DIR
        if states.is_dir():
            for entry in states.iterdir():
                if f"{STATE_DIR}/{entry.name}" != self.model_state:
                    shutil.rmtree(entry, ignore_errors=True)

    def _write(self) -> None:
        if self.main:
            write_atomic(self.folder / PROGRESS, json.dumps(self.data, indent=1, default=str) + "\n")


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise RunFolderError(f"{path}: unreadable ({exc}); use --restart to start this run again") from None
    if not isinstance(data, dict) or data.get("format") != PROGRESS_FORMAT or not isinstance(data.get("steps"), list):
        raise RunFolderError(f"{path}: not a progress file this version writes; use --restart to start this run again")
    return data


def _clear_run_folder(folder: Path) -> None:
    """Empty a run folder of ours (checked: marker present, nothing a run did not write), keeping the marker."""
    for entry in folder.iterdir():
        if entry.name == MARKER:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
