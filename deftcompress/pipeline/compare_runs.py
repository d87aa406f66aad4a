"""`deftcompress compare`: run, reuse or resume each recipe, time every final model side by side, write the table.

    rows = compare(["recipes/compare_sst2.yaml", "runs/deft_lora_sst2"], output_dir="runs/compare")

- Arguments are recipe files (a `sweep:` expands into its runs; every recipe is checked before
  anything runs) or finished run folders.
- A recipe with a finished run of the same resolved recipe (its hash) in its output folder, or in
  any folder beside it, is reused, not rerun; an unfinished one resumes.
- Runs that share their first passes with an earlier run of the same comparison (a sweep over a
  later pass's option) start from that run's saved state after those passes: the shared passes run
  once (`shared` in the table).
- Timing: every run's final model (the exported graph for runs measured in onnxruntime) is timed
  on the same rows, alternating, in this one process, as ratios to the first row
  (`measurement.speed.compare_speed`). The timing is kept in compare.json and reused, without
  importing torch, when the same finished runs are compared again with the same workload.

Reading finished runs and writing the table needs no torch; running recipes and timing do.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from deftcompress.core.model_refs import resolve_model_ref
from deftcompress.pipeline.recipe import Recipe
from deftcompress.errors import DeftcompressError
from deftcompress.pipeline.progress import PROGRESS, run_digest
from deftcompress.pipeline.run_folder import is_run_folder, write_marker
from deftcompress.reporting.compare_tables import CompareRow, load_rows, row_from_run, set_report_ratios, write_outputs
from deftcompress.reporting.report import write_atomic

COMPARE_MARKER = ".deftcompress-compare"
OUTPUT_FILES = frozenset({COMPARE_MARKER, "compare.json", "compare.md", "compare.csv", "compare.png", "compare_budget.png", ".shared"})


class CompareError(DeftcompressError):
    """A comparison cannot be made as asked (a missing run, an output folder that is not ours, mixed tasks)."""


@dataclass
class Entry:
    """One row to be: a recipe to run (or reuse), or a finished run folder given as it is."""

    recipe: Recipe | None
    folder: Path
    digest: str | None = None
    how: str = "given"  # given | reused | ran | resumed | shared N step(s) with <run>
    sweep: dict[str, Any] = field(default_factory=dict)


@dataclass
class Workload:
    rows: int = 64
    repeats: int = 5
    threads: int | None = None
    rank_loaded: bool = False  # rank timings even when other processes loaded the machine meanwhile

    def key(self) -> dict[str, Any]:
        return {"rows": self.rows, "repeats": self.repeats, "threads": self.threads}


def _progress_of(folder: Path) -> dict[str, Any] | None:
    """A run folder's progress record, or None (no folder, no record, unreadable)."""
    try:
        data = json.loads((folder / PROGRESS).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class NotARun(CompareError):
    """An input folder that is not a finished deftcompress run (bad input)."""

    exit_code = 2


def _row(entry: "Entry") -> CompareRow:
    """The row of a finished run; a folder another tool wrote (or a damaged report) is one line, not a traceback."""
    try:
        return row_from_run(entry.folder, entry.sweep, entry.how)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
        raise NotARun(f"{entry.folder}: not a run deftcompress finished (its report.json cannot be read: "
                           f"{type(exc).__name__} {str(exc)[:80]})") from None


def check_one_task(rows: list[CompareRow]) -> None:
    """One table, one column of scores and one Pareto front hold runs of one task and metric only."""
    groups: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        groups.setdefault((r.task, r.task_metric), []).append(r.name)
    if len(groups) > 1:
        listed = "; ".join(f"{task or '?'} ({metric}): {', '.join(names[:3])}" for (task, metric), names in groups.items())
        raise CompareError(f"compare puts runs of one task and metric in one table and front; got {listed}: compare "
                           "each group on its own")


def _finished(folder: Path) -> dict[str, Any] | None:
    data = _progress_of(folder)
    finished = data is not None and data.get("status") == "finished" and (folder / "report.json").is_file()
    return data if finished else None


def resolve_inputs(arguments: list[str], trust_pickle: bool = False, data_dir: str | None = None) -> list[Entry]:
    """Entries for the arguments, every recipe checked first (nothing runs if one is wrong)."""
    entries: list[Entry] = []
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            if _finished(path) is None:
                raise CompareError(f"{path}: not a finished run folder (no finished progress.json and report.json)")
            entries.append(Entry(recipe=None, folder=path))
        elif path.is_file():
            for recipe in Recipe.all_from_file(path, trust_pickle=trust_pickle, data_dir=data_dir):
                digest = run_digest(recipe, resolve_model_ref(recipe.model, trust_pickle=trust_pickle))
                entries.append(Entry(recipe=recipe, folder=recipe.output_dir(), digest=digest,
                                     sweep=dict(recipe.sweep_values)))
        else:
            raise CompareError(f"{path}: no such recipe file or run folder")
    names = [e.folder.resolve() for e in entries]
    duplicates = {str(n) for n in names if names.count(n) > 1}
    if duplicates:
        raise CompareError(f"two rows would share the run folder {sorted(duplicates)[0]}; give the recipes different names")
    return entries


def find_finished_run(entry: Entry) -> Path | None:
    """A finished run of the same resolved recipe: in its output folder, or in a folder beside it."""
    candidates = [entry.folder] + sorted(p.parent for p in entry.folder.parent.glob(f"*/{PROGRESS}"))
    for folder in candidates:
        data = _finished(folder)
        if data is not None and data.get("recipe_hash") == entry.digest:
            return folder
    return None


def check_compare_dir(folder: Path) -> None:
    """The output folder is new, or one that compare made: refuse anything else (nothing of a user's is touched)."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise CompareError(f"{folder}: exists and is not a folder; choose another output folder with -o")
    if is_run_folder(folder):
        raise CompareError(f"{folder}: is a run folder; choose another output folder for the comparison with -o")
    foreign = [e.name for e in folder.iterdir() if e.name not in OUTPUT_FILES]
    if foreign and not (folder / COMPARE_MARKER).is_file():
        raise CompareError(f"{folder}: not empty and not made by deftcompress compare ({foreign[0]}, ...); "
                           "choose another output folder with -o")


# ---- shared leading passes ----------------------------------------------------------------------

def shared_passes(a: Recipe, b: Recipe) -> int:
    """How many leading passes `b` shares with `a` (-1: not even the baseline, the settings differ)."""
    da, db = a.to_dict(), b.to_dict()
    for key in ("name", "output_dir", "latency_repeats"):
        da.pop(key, None), db.pop(key, None)
    pa, pb = da.pop("passes"), db.pop("passes")
    if da != db or a.model != b.model:
        return -1
    k = 0
    while k < min(len(pa), len(pb)) - 1 and pa[k] == pb[k]:  # the last pass of b always runs
        k += 1
    return k


class SharedStates:
    """Snapshots of a run after its first k passes (its progress record, saved state and pass folders)."""

    def __init__(self, root: Path):
        self.root = root
        self.wanted: dict[int, set[int]] = {}  # entry index -> step indices to keep
        self.saved: dict[tuple[int, int], Path] = {}

    def plan(self, entries: list[Entry]) -> dict[int, tuple[int, int]]:
        """For each entry to run: (earlier entry, shared passes) to start from, and which snapshots to take."""
        starts: dict[int, tuple[int, int]] = {}
        for j, later in enumerate(entries):
            if later.recipe is None:
                continue
            best = max(((shared_passes(entries[i].recipe, later.recipe), i) for i in range(j)
                        if entries[i].recipe is not None), default=(-1, -1))
            if best[0] >= 0:
                starts[j] = (best[1], best[0])
                self.wanted.setdefault(best[1], set()).add(best[0])  # after k passes: step index k
        return starts

    def hook(self, index: int) -> Callable[[int, Path, dict], None] | None:
        steps = self.wanted.get(index)
        if not steps:
            return None

        def snapshot(step_index: int, folder: Path, data: dict[str, Any]) -> None:
            if step_index not in steps:
                return
            target = self.root / f"{index:02d}_after_step_{step_index:02d}"
            if target.exists():
                shutil.rmtree(target)
            target.mkdir(parents=True)
            if data.get("model_state"):
                shutil.copytree(folder / data["model_state"], target / data["model_state"])
            for entry in sorted((folder / "passes").glob("*")) if (folder / "passes").is_dir() else []:
                prefix = entry.name.split("_", 1)[0]
                if prefix.isdigit() and int(prefix) <= step_index:
                    shutil.copytree(entry, target / "passes" / entry.name)
            write_atomic(target / PROGRESS, json.dumps(data, indent=1, default=str) + "\n")
            self.saved[(index, step_index)] = target

        return snapshot

    def seed(self, start: tuple[int, int], entry: Entry, source_name: str) -> bool:
        """Create `entry`'s run folder from a snapshot (only a folder that does not exist yet)."""
        snapshot = self.saved.get(start)
        if snapshot is None or entry.folder.exists():
            return False
        data = copy.deepcopy(json.loads((snapshot / PROGRESS).read_text()))
        entry.folder.mkdir(parents=True)
        write_marker(entry.folder)
        write_atomic(entry.folder / "recipe.resolved.yaml", entry.recipe.to_yaml())
        for item in snapshot.iterdir():
            if item.is_dir():
                shutil.copytree(item, entry.folder / item.name)
        data["files"] = {name: e for name, e in data.get("files", {}).items() if (entry.folder / name).is_file()}
        data.update({"pending": [], "garbage": []})
        data.update({"recipe_hash": entry.digest, "status": "running",
                     "shared_from": {"run": source_name, "steps": start[1] + 1}})
        write_atomic(entry.folder / PROGRESS, json.dumps(data, indent=1, default=str) + "\n")
        return True


# ---- the comparison -------------------------------------------------------------------------------

def compare(arguments: list[str], output_dir: str | Path | None = None, timing: bool = True,
            workload: Workload | None = None, quiet: bool = False, trust_pickle: bool = False, retime: bool = False,
            log: Callable[[str], None] = print, command: str = "deftcompress compare",
            data_dir: str | None = None) -> tuple[list[CompareRow], Path]:
    """Run or reuse every entry, time the final models side by side, write compare.*; returns (rows, folder)."""
    workload = workload or Workload()
    entries = resolve_inputs(arguments, trust_pickle, data_dir)
    if not entries:
        raise CompareError("nothing to compare: give recipe files or run folders")
    first = entries[0]
    out = Path(output_dir) if output_dir else Path("runs") / (
        f"compare-{(first.recipe.sweep_name or first.recipe.name) if first.recipe else first.folder.name}")
    check_compare_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / COMPARE_MARKER).write_text("made by deftcompress compare\n")
    shared = SharedStates(out / ".shared")
    starts = shared.plan(entries)
    try:
        for i, entry in enumerate(entries):
            prefix = f"run {i + 1}/{len(entries)} {entry.recipe.name if entry.recipe else entry.folder}"
            if entry.recipe is None:
                log(f"{prefix}: finished run, as given")
                continue
            found = find_finished_run(entry)
            if found is not None:  # a finished run kept no intermediate states: later runs cannot start from it
                entry.folder, entry.how = found, "reused"
                log(f"{prefix}: reusing the finished run in {found}")
                continue
            other = (_progress_of(entry.folder) or {}).get("recipe_hash")
            if other is not None and other != entry.digest:  # an older run of another version of this recipe: kept
                entry.folder = entry.folder.parent / f"{entry.folder.name}-{entry.digest[:8]}"
                log(f"{prefix}: its output folder holds a run of another recipe (kept); this one goes to {entry.folder}")
            resumed = entry.folder.is_dir() and (entry.folder / PROGRESS).is_file()
            if i in starts and not resumed and shared.seed(starts[i], entry, entries[starts[i][0]].recipe.name):
                steps = starts[i][1]
                entry.how = f"shared {steps} pass{'es' if steps != 1 else ''} with {entries[starts[i][0]].recipe.name}" \
                    if steps else f"shared the baseline with {entries[starts[i][0]].recipe.name}"
            else:
                entry.how = "resumed" if resumed else "ran"
            log(f"{prefix}: running ({entry.how}) into {entry.folder}")
            _run(entry, quiet, shared.hook(i))
    finally:
        shutil.rmtree(out / ".shared", ignore_errors=True)
    rows = [_row(e) for e in entries]
    check_one_task(rows)
    timing_record = _timing(rows, out, workload, timing, quiet, log, retime, data_dir)
    write_outputs(rows, out, command, timing_record)
    return rows, out


def _run(entry: Entry, quiet: bool, on_commit) -> None:
    from deftcompress.pipeline.runner import Pipeline

    Pipeline(entry.recipe, output_dir=entry.folder, quiet=quiet, on_commit=on_commit).run()


def _timing(rows: list[CompareRow], out: Path, workload: Workload, timing: bool, quiet: bool,
            log, retime: bool = False, data_dir: str | None = None) -> dict[str, Any] | None:
    """Side-by-side latency (reused from an earlier compare.json of the same runs and workload), or the reports' own."""
    if not timing:
        set_report_ratios(rows)
        return None
    runs = [[str(Path(r.folder).resolve()), r.recipe_hash] for r in rows]
    if (out / "compare.json").is_file() and not retime:
        try:
            old_rows, old = load_rows(out)
        except (ValueError, KeyError, TypeError):
            old_rows, old = [], {}
        if old.get("runs") == runs and old.get("workload") == workload.key():
            for row, before in zip(rows, old_rows):
                row.latency_ms, row.latency_ratio, row.timing = before.latency_ms, before.latency_ratio, before.timing
                row.latency_spread, row.timing_load = before.latency_spread, before.timing_load
                row.peak_memory_bytes = before.peak_memory_bytes
            log("timing: reused from the earlier compare.json (same runs, same workload)")
            return old
    from deftcompress.pipeline.timing import time_runs

    log(f"timing {len(rows)} models side by side ({workload.repeats} repetitions)")
    measured = time_runs(rows, workload, progress=not quiet, data_dir=data_dir)
    return {"runs": runs, "workload": workload.key(), **measured}
