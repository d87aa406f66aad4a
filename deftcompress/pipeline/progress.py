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
pass. It also records every file the run wrote under `state/`, `passes/` and `model/` (and the final
reports) with its sha256 (`pipeline.run_files`): resume verifies what it reuses, and only recorded
files, or the folder a running pass was writing (`pending`), are ever deleted. The top-level reports
are derived from it and rewritten on resume.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deftcompress.core.files import write_atomic
from deftcompress.pipeline.run_files import (RunFolderError, changed_file, check_record, checked_relative,
                                             foreign_files, record_files, remove_own_folder, remove_recorded)
from deftcompress.pipeline.run_folder import MARKER, is_run_folder, write_marker
from deftcompress.reporting.report import Report

if TYPE_CHECKING:
    from deftcompress.pipeline.recipe import Recipe
    from deftcompress.pipeline.state import PipelineState

PROGRESS = "progress.json"
STATE_DIR = "state"
PROGRESS_FORMAT = 2  # 2: with the record of files (`files`), `pending`, `garbage` and the data's identity
OWN_FOLDERS = ("state", "passes", "model", "deploy")  # every file under these must be one the run recorded
STATUSES = ("running", "failed", "interrupted", "finished")
_STATE_NAME = re.compile(r"state/after_step_\d{2,}")
_STEP_CHECKPOINT_NAME = re.compile(r"state/training_step_\d{6,}")
_PASS_FOLDER_NAME = re.compile(r"passes/\d{2,}_[A-Za-z0-9_]+")


def data_identity(splits: dict[str, list]) -> dict[str, Any]:
    """What the run's numbers were computed on: rows per split and a sha256 of every row read."""
    h = hashlib.sha256()
    for name in sorted(splits):
        h.update(name.encode())
        for row in splits[name]:
            h.update(json.dumps(row, sort_keys=True, default=str).encode())
    return {"rows": {name: len(rows) for name, rows in sorted(splits.items())}, "sha256": h.hexdigest()}


def recipe_hash(recipe: "Recipe", model_ref: str, data: dict[str, Any] | None = None) -> str:
    """sha256 of what decides a run's numbers: the resolved recipe (not its name or output folder), the data
    (its identity from `data_identity` when known, else its folder) and the model path (`model_ref`: the recipe's
    model, resolved by `resolve_model_ref`)."""
    from deftcompress.data.tasks import data_root

    import dataclasses

    resolved = recipe.to_dict()
    for key in ("name", "output_dir", "data_dir", "latency_repeats"):  # none of these changes a score
        resolved.pop(key, None)
    for item, planned in zip(resolved.get("passes") or [], getattr(recipe, "plan", None) or []):
        config = item.get(planned.name) if isinstance(item, dict) else None
        for f in dataclasses.fields(planned.cls.Config) if isinstance(config, dict) else ():
            if f.metadata.get("timing_only"):  # e.g. evaluate's decode_speed: what is timed, not what is scored
                config.pop(f.name, None)
    root = data_root(recipe.data_dir)
    resolved["data"] = str(root.resolve()) if root is not None else "hub"
    if data is not None:
        resolved["data_identity"] = data
    from deftcompress.core.model_refs import gguf_alias_of

    model = Path(model_ref).expanduser()
    # a GGUF alias's folder appears on its first load: the alias names the model before and after
    resolved["model"] = recipe.model if gguf_alias_of(model_ref) else str(model.resolve()) if model.exists() \
        else recipe.model
    return hashlib.sha256(json.dumps(resolved, sort_keys=True, default=str).encode()).hexdigest()


def recipe_splits(recipe: "Recipe") -> dict[str, list]:
    """The splits a recipe's run reads: evaluation, and training if a pass trains (every row parsed up front, so bad
    data fails before any model loads and not an hour in)."""
    from deftcompress.data.tasks import get_task, read_split

    task = get_task(recipe.task)
    splits = {"validation": read_split(task, "validation", recipe.data_dir)}
    if any(p.cls.needs_train_data(p.config) for p in recipe.plan):
        splits["train"] = read_split(task, "train", recipe.data_dir)
    return splits


def run_digest(recipe: "Recipe", model_ref: str) -> str:
    """The hash a run folder records for `recipe`: its settings, model and the identity of the data it reads."""
    return recipe_hash(recipe, model_ref, data_identity(recipe_splits(recipe)))


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
             recipe_yaml: str = "", data_id: dict[str, Any] | None = None) -> "RunProgress":
        """The progress of `folder` for a recipe with hash `digest`: new, resumed, finished, or refused.

        What a resume reuses is verified against the record first; `restart` deletes only recorded files
        (and refuses, touching nothing, when the run's folders hold anything else). A new run's folder is
        created at its first commit (the baseline), so a run that fails while loading its model writes nothing.
        """
        path = folder / PROGRESS
        fresh = {"format": PROGRESS_FORMAT, "recipe_hash": digest, "status": "running", "steps": [], "model_state": None,
                 "last_eval_settings": None, "model_changed_since_eval": False, "files": {}, "pending": [],
                 "garbage": [], "data": data_id, "step_checkpoint": None}
        if not main:  # other processes of a torchrun job follow what the main process found
            return cls(folder, _read(path) if path.is_file() else fresh, main, recipe_yaml)
        if not (folder.is_dir() and is_run_folder(folder)):
            return cls(folder, fresh, main, recipe_yaml)
        if not path.is_file():
            if any(e.name not in (MARKER, "recipe.resolved.yaml") for e in folder.iterdir()):
                raise RunFolderError(f"{folder}: a run folder without {PROGRESS} (an older version wrote it, or it "
                                     "was deleted): nothing in it can be verified; delete it yourself or choose another "
                                     "output folder")
            return cls(folder, fresh, main, recipe_yaml)  # killed between creating the folder and its first commit
        found = cls(folder, _read(path), main)
        if restart:
            found.remove_everything()
            return cls(folder, fresh, main, recipe_yaml)
        found.check_same_run(digest, data_id)
        found.verify()
        return found

    def check_same_run(self, digest: str, data_id: dict[str, Any] | None) -> None:
        recorded = self.data.get("data")
        if data_id is not None and recorded is not None and recorded != data_id:
            raise RunFolderError(f"{self.folder}: the data changed since this run started (rows {recorded.get('rows')}, "
                                 f"sha256 {str(recorded.get('sha256'))[:12]}; now rows {data_id['rows']}, sha256 "
                                 f"{data_id['sha256'][:12]}); use --restart to run it again on the new data")
        if self.data.get("recipe_hash") != digest:
            raise RunFolderError(f"{self.folder}: holds a run of another recipe (recipe hash "
                                 f"{str(self.data.get('recipe_hash'))[:12]}, this one {digest[:12]}); use --restart to "
                                 "replace it, or choose another output folder")

    def verify(self) -> None:
        """Refuse, touching nothing, a run whose reused files are missing or differ from what it recorded."""
        files = self.data["files"]
        if self.data["status"] == "finished":
            problem = changed_file(self.folder, files, list(files)) or self._missing_reports()
            what = "a finished run whose records are incomplete or changed"
        else:
            checkpoint = (self.data.get("step_checkpoint") or {}).get("folder")
            problem = changed_file(self.folder, files, [p for p in (self.model_state, "passes", checkpoint) if p])
            what = "the saved state this run would resume from"
        if problem:
            raise RunFolderError(f"{self.folder}: {what} ({problem}); use --restart to run it again")

    def _missing_reports(self) -> str | None:
        for name in ("report.json", "model"):
            if not (self.folder / name).exists():
                return f"{name}: missing"
        return None

    def remove_everything(self) -> None:
        """`--restart`: delete what the run recorded and the folders it was writing; refuse if anything else is there."""
        foreign = foreign_files(self.folder, self.data["files"], OWN_FOLDERS)
        pending = [p for p in self.data["pending"] if p.split("/")[0] in OWN_FOLDERS]
        foreign = [f for f in foreign if not any(f.startswith(p.rstrip("/") + "/") for p in pending)]
        if foreign:
            raise RunFolderError(f"{self.folder}: --restart would delete {foreign[0]}, which this run did not write "
                                 f"(or which changed since){f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''};"
                                 " move it out first; nothing was touched")
        for rel in pending:
            remove_own_folder(self.folder, rel)
        remove_recorded(self.folder, self.data["files"], list(self.data["files"]))
        for name in ("report.json", "report.md", "density.png", PROGRESS):  # derived: owned by name
            target = self.folder / name
            if target.is_file() and not target.is_symlink():
                target.unlink()

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
        return self.data.get("status") == "finished"

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
        try:
            return dataclasses.replace(default, **saved) if saved else default
        except (TypeError, ValueError):
            raise RunFolderError(f"{self.folder / PROGRESS}: last_eval_settings: not settings this version knows; use "
                                 "--restart to start this run again") from None

    # -- committing ------------------------------------------------------------------------------

    def begin(self, *folders: str) -> None:
        """Name the folders a pass (or the final save) is about to write, before it writes them: a kill leaves
        them to be deleted on resume, as recorded, never found by pattern."""
        if not self.main or not (self.folder / PROGRESS).is_file():
            return
        self.data["pending"] = sorted({*self.data["pending"], *folders})
        self._write()

    def commit(self, state: "PipelineState", report: Report, model_changed: bool, last_eval_settings,
               model_changed_since_eval: bool = False) -> None:
        """Record the step just finished (the last one of `report.steps`); save the model first if it changed."""
        if not self.main:
            return
        self._ensure_folder()
        index = len(report.steps) - 1
        previous = self.model_state
        written = [p for p in self.data["pending"] if p.startswith("passes/")]
        if model_changed:
            name = f"{STATE_DIR}/after_step_{index:02d}"
            self.begin(f"{name}.tmp", name)
            remove_own_folder(self.folder, f"{name}.tmp")
            (self.folder / STATE_DIR).mkdir(exist_ok=True)
            state.save(self.folder / f"{name}.tmp")
            remove_own_folder(self.folder, name)
            (self.folder / f"{name}.tmp").rename(self.folder / name)
            self.data["model_state"] = name
            written.append(name)
        files = dict(self.data["files"])
        self._let_go_of_step_checkpoint(files)  # the pass it belonged to is committed whole
        if model_changed and previous and previous != self.model_state:
            self.data["garbage"] = sorted({*self.data["garbage"], *(f for f in files if f.startswith(previous + "/"))})
        files.update(record_files(self.folder, written))
        self.data["files"] = files
        self.data["pending"] = []
        self.data["steps"] = [s.to_dict() for s in report.steps]
        self.data["last_eval_settings"] = dataclasses.asdict(last_eval_settings)
        self.data["model_changed_since_eval"] = model_changed_since_eval
        self.data["status"] = "running"
        self._write()  # the commit point
        self._collect_garbage()
        report.status = "running"
        report.write(self.folder)

    # -- step checkpoints inside a training pass -----------------------------------------------

    def step_checkpoint(self, pass_folder: str) -> Path | None:
        """The step checkpoint a resumed pass continues from (verified with the rest when the run was opened)."""
        found = self.data.get("step_checkpoint")
        if found and found["pass"] == pass_folder:
            return self.folder / found["folder"]
        return None

    def save_step_checkpoint(self, pass_folder: str, step: int, write) -> None:
        """Write a pass's step checkpoint with `write(folder)` into a new folder, record it, then let the old go.

        The record names the new folder only once it is complete (a kill before leaves it pending, deleted on
        resume, and the previous checkpoint stands); its files are recorded with their sha256 like every other."""
        if not self.main:
            return
        name = f"{STATE_DIR}/training_step_{step:06d}"
        self.begin(f"{name}.tmp", name)
        remove_own_folder(self.folder, f"{name}.tmp")
        (self.folder / f"{name}.tmp").mkdir(parents=True)
        write(self.folder / f"{name}.tmp")
        remove_own_folder(self.folder, name)
        (self.folder / f"{name}.tmp").rename(self.folder / name)
        files = dict(self.data["files"])
        self._let_go_of_step_checkpoint(files)
        files.update(record_files(self.folder, [name]))
        self.data["files"] = files
        self.data["step_checkpoint"] = {"pass": pass_folder, "step": step, "folder": name}
        self.data["pending"] = [p for p in self.data["pending"] if p not in (name, f"{name}.tmp")]
        self._write()  # the commit point of the checkpoint
        self._collect_garbage()

    def _let_go_of_step_checkpoint(self, files: dict[str, Any]) -> None:
        old = (self.data.get("step_checkpoint") or {}).get("folder")
        if old:
            self.data["garbage"] = sorted({*self.data["garbage"], *(f for f in files if f.startswith(old + "/"))})
        self.data["step_checkpoint"] = None

    def finish(self, report: Report) -> None:
        """The final outputs are written: record them, mark the run finished and drop the resume state."""
        self.data["files"].update(record_files(self.folder, ["model", "deploy", "report.json", "report.md",
                                                                  "density.png"]))
        self.data["garbage"] = sorted({*self.data["garbage"], *(f for f in self.data["files"]
                                                                 if f.startswith(STATE_DIR + "/"))})
        self.data["status"] = "finished"
        self.data["steps"] = [s.to_dict() for s in report.steps]
        self.data["model_state"] = None
        self.data["pending"] = []
        self._write()
        self._collect_garbage()
        try:
            (self.folder / STATE_DIR).rmdir()
        except OSError:
            pass

    def stopped(self, exc: BaseException) -> None:
        """The run stopped in a pass: say so in the report; finished passes stay committed."""
        if not (self.folder / PROGRESS).is_file():
            return  # stopped before the first commit: nothing was written, nothing to mark
        interrupted = isinstance(exc, KeyboardInterrupt)
        self.data["status"] = "interrupted" if interrupted else "failed"
        self._write()
        path = self.folder / "report.json"
        if path.is_file():
            try:
                report = Report.load(self.folder)
            except Exception:  # noqa: BLE001  a report we cannot read is rewritten on resume anyway
                return
            report.status = self.data["status"]
            report.error = None if interrupted else f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            report.write(self.folder)

    def clear_unfinished(self) -> None:
        """Remove what an interrupted pass or save left half-written (the folders it named before writing), and
        recorded files a commit let go of."""
        if not self.main or not self.folder.is_dir() or not (self.folder / PROGRESS).is_file():
            return
        for rel in self.data["pending"]:
            remove_own_folder(self.folder, rel)
        self.data["pending"] = []
        self._write()
        self._collect_garbage()

    def _collect_garbage(self) -> None:
        garbage = self.data["garbage"]
        if not garbage:
            return
        remove_recorded(self.folder, self.data["files"], garbage)
        for name in garbage:
            self.data["files"].pop(name, None)
        self.data["garbage"] = []
        self._write()

    def _write(self) -> None:
        if self.main:
            write_atomic(self.folder / PROGRESS, json.dumps(self.data, indent=1, default=str) + "\n")


_NUMBER = (int, float)
_STEP_FIELDS = {"index": int, "pass": str, "task_metric": str, "task_score": _NUMBER, "metrics": dict, "density": dict,
                "params": int, "nonzero_params": int, "size_bytes": int, "latency_ms_per_example": _NUMBER,
                "eval_examples": int, "eval_seconds": _NUMBER, "seconds": _NUMBER, "details": dict, "latency": dict}


def _wrong_step_field(step: Any) -> str | None:
    """Why `step` is not a step record as a run writes it (None if it is one)."""
    if not isinstance(step, dict):
        return "not a step record"
    for name, kind in _STEP_FIELDS.items():
        value = step.get(name)
        if name in ("details", "latency") and value is None:
            continue
        if not isinstance(value, kind) or isinstance(value, bool):
            return f"{name}: not what a run writes ({str(value)[:40]!r})"
    return None


def _read(path: Path) -> dict[str, Any]:
    """A progress file, checked field by field: a hand-edited or damaged one is refused in one line."""
    def bad(what: str) -> RunFolderError:
        return RunFolderError(f"{path}: {what}; use --restart to start this run again")

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise bad(f"unreadable ({str(exc)[:120]})") from None
    if not isinstance(data, dict) or data.get("format") not in (1, PROGRESS_FORMAT):
        raise bad("not a progress file this version writes")
    if data["format"] == 1:
        raise RunFolderError(f"{path.parent}: written by an older deftcompress that kept no record of its files, so "
                             "nothing in it can be verified or safely deleted; delete it yourself or choose another "
                             "output folder")
    if not isinstance(data.get("recipe_hash"), str) or data.get("status") not in STATUSES:
        raise bad("recipe_hash or status is not what a run writes")
    steps = data.get("steps")
    if not isinstance(steps, list):
        raise bad("steps: not a list")
    for i, step in enumerate(steps):
        wrong = _wrong_step_field(step)
        if wrong:
            raise bad(f"steps[{i}]: {wrong}")
    state = data.get("model_state")
    if state is not None and not (isinstance(state, str) and _STATE_NAME.fullmatch(state)):
        raise bad("model_state: not a state folder of this run")
    if not isinstance(data.get("last_eval_settings"), (dict, type(None))) or \
            not isinstance(data.get("model_changed_since_eval"), bool):
        raise bad("last_eval_settings or model_changed_since_eval is not what a run writes")
    check_record(data.get("files"), str(path))
    for key in ("pending", "garbage"):
        if not isinstance(data.get(key), list):
            raise bad(f"{key}: not a list")
        for name in data[key]:
            checked_relative(name, f"{path}: {key}")
    if not isinstance(data.get("data"), (dict, type(None))):
        raise bad("data: not a mapping")
    checkpoint = data.get("step_checkpoint")
    if checkpoint is not None and not (
            isinstance(checkpoint, dict) and isinstance(checkpoint.get("step"), int)
            and isinstance(checkpoint.get("pass"), str) and _PASS_FOLDER_NAME.fullmatch(checkpoint["pass"])
            and isinstance(checkpoint.get("folder"), str) and _STEP_CHECKPOINT_NAME.fullmatch(checkpoint["folder"])):
        raise bad("step_checkpoint: not a step checkpoint of this run")
    return data
