"""The run folder as a state machine: create, commit, kill at any point, tamper, resume, restart.

Hypothesis drives a run folder through random sequences of these (with a stand-in for the model's
state, so thousands of steps take seconds) and checks after every one that no byte outside the run's
own files changed: files beside the run folder, targets of planted links, and files a user put inside
the run folder are never written, moved or deleted, whatever the sequence. A refused open must also
leave the run folder itself exactly as it was.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from deftcompress.pipeline.progress import PROGRESS, RunProgress, data_identity
from deftcompress.pipeline.run_files import RunFolderError
from deftcompress.pipeline.run_folder import check_output_dir, run_lock
from deftcompress.reporting.report import Report, StepRecord


class Killed(BaseException):
    """A SIGKILL at this point: nothing after it runs (not even `stopped`)."""


class FakeState:
    """What `PipelineState.save` does to a folder: a few files, and a kill possibly half-way."""

    def __init__(self, kill_after_files: int | None = None, version: int = 0):
        self.kill_after_files = kill_after_files
        self.version = version

    def save(self, folder: Path) -> dict:
        folder.mkdir(parents=True, exist_ok=True)
        for i, name in enumerate(("model/model.safetensors", "model/config.json", "state.json")):
            if self.kill_after_files is not None and i >= self.kill_after_files:
                raise Killed()
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(f"{name} v{self.version}".encode() * 50)
        return {"format": "plain"}


def _step(index: int) -> StepRecord:
    return StepRecord(index=index, pass_name=f"p{index}", task_metric="accuracy", task_score=0.5 + index / 100,
                      metrics={"accuracy": 0.5}, density={"encoder": 0.3}, params=10, nonzero_params=9, size_bytes=40,
                      latency_ms_per_example=1.0, eval_examples=8, eval_seconds=0.1, seconds=0.2)




@dataclasses.dataclass
class EvalStandIn:
    batch_size: int = 8


DATA = data_identity({"validation": [{"sentence": "a", "label": 1}]})


def fake_run(out: Path, passes: int, kill: tuple[str, int] | None, restart: bool = False, digest: str = "r" * 64) -> str:
    """The pipeline's use of the run folder, step by step; `kill` = (where, step) stops it like SIGKILL there."""
    check_output_dir(out, {})
    with run_lock(out):
        progress = RunProgress.open(out, digest, restart=restart, recipe_yaml="name: x\n", data_id=DATA)
        if progress.finished:
            return "finished already"
        report = Report(name="x", model="m", task="t", status="running", recipe_hash=digest)
        report.steps = [StepRecord.from_dict(s) for s in progress.steps]
        progress.clear_unfinished()
        if not report.steps:
            report.steps.append(_step(0))
            progress.commit(FakeState(), report, False, EvalStandIn())
        for index in range(len(report.steps), passes + 1):
            progress.begin(f"passes/{index:02d}_p")
            (out / "passes" / f"{index:02d}_p").mkdir(parents=True, exist_ok=True)
            (out / "passes" / f"{index:02d}_p" / "adapter.bin").write_bytes(b"w" * (100 + index))
            if kill == ("pass", index):
                raise Killed()
            report.steps.append(_step(index))
            state = FakeState(kill_after_files=1 if kill == ("save", index) else None, version=index)
            progress.commit(state, report, index % 2 == 1, EvalStandIn())
        progress.begin("model.partial", "model")
        (out / "model.partial").mkdir(exist_ok=True)
        (out / "model.partial" / "model.safetensors").write_bytes(b"final" * 20)
        if kill == ("final", 0):
            raise Killed()
        os.rename(out / "model.partial", out / "model")
        report.status = "finished"
        report.write(out)
        progress.finish(report)
        return "finished"


def _digest_tree(paths: list[Path]) -> dict[str, str]:
    found = {}
    for top in paths:
        for root, dirs, files in os.walk(top, followlinks=False):
            for name in files + [d for d in dirs if (Path(root) / d).is_symlink()]:
                p = Path(root) / name
                found[str(p)] = "link:" + os.readlink(p) if p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest()
    return found


class RunFolderMachine(RuleBasedStateMachine):
    @initialize()
    def setup(self):
        import tempfile

        self.root = Path(tempfile.mkdtemp(prefix="runfsm-"))
        self.out = self.root / "runs" / "x"
        self.outside = self.root / "user"
        (self.outside / "big_disk" / "state").mkdir(parents=True)
        (self.outside / "big_disk" / "state" / "keep.txt").write_text("user data")
        (self.outside / "notes.md").write_text("user notes")
        (self.outside / "big_disk" / "passes").mkdir()
        (self.outside / "big_disk" / "passes" / "05_mine").mkdir()
        (self.outside / "big_disk" / "passes" / "05_mine" / "w.bin").write_bytes(b"mine")
        self.user_inside: dict[Path, bytes] = {}
        self.protected = _digest_tree([self.outside])

    def teardown(self):
        shutil.rmtree(self.root, ignore_errors=True)

    def _attempt(self, **kwargs):
        before = _digest_tree([self.out]) if self.out.exists() else {}
        try:
            fake_run(self.out, **kwargs)
        except RunFolderError:
            after = _digest_tree([self.out]) if self.out.exists() else {}
            assert after == before, "a refused run changed its folder"
        except Killed:
            pass

    @rule(passes=st.integers(1, 3), kill=st.one_of(st.none(), st.tuples(st.sampled_from(["pass", "save"]), st.integers(1, 3)),
                                                   st.just(("final", 0))))
    def run(self, passes, kill):
        self._attempt(passes=passes, kill=kill)

    @rule(passes=st.integers(1, 3))
    def restart(self, passes):
        self._attempt(passes=passes, kill=None, restart=True)

    @rule(passes=st.integers(1, 3))
    def other_recipe(self, passes):
        self._attempt(passes=passes, kill=None, digest="o" * 64)

    @rule(what=st.sampled_from(["state", "passes", "model"]))
    def link_a_folder_out(self, what):
        target = self.out / what
        if self.out.is_dir() and not target.exists() and not target.is_symlink():
            target.symlink_to(self.outside / "big_disk" / ("state" if what == "state" else "passes"))

    @rule(what=st.sampled_from(["state", "passes", "model", "report.json", "progress.json"]))
    def move_part_to_another_disk(self, what):
        """What a user short of space does: move a big part of the run elsewhere and link it back."""
        source = self.out / what
        if source.exists() and not source.is_symlink():
            self.moves = getattr(self, "moves", 0) + 1
            target = self.outside / f"moved_{self.moves}_{what}"
            shutil.move(str(source), str(target))
            source.symlink_to(target)
            self.user_inside = {p: c for p, c in self.user_inside.items() if source not in p.parents}
            self.protected = _digest_tree([self.outside])  # from now on those bytes are out of the run's reach

    @rule(what=st.sampled_from(["report.json", "density.png", ".x.lock"]))
    def link_a_file_out(self, what):
        target = self.out.parent / what if what.endswith(".lock") else self.out / what
        if self.out.is_dir() and not target.exists() and not target.is_symlink():
            target.symlink_to(self.outside / "notes.md")

    @rule(where=st.sampled_from(["model", "passes/01_p", "passes/02_p", "state"]))
    def user_file_inside(self, where):
        """A user's file in a folder of the run. Not in the folder a killed pass was writing: that folder is the
        pass's own and is deleted whole when the run goes on (documented in pipeline.progress)."""
        folder = self.out / where
        try:
            pending = json.loads((self.out / PROGRESS).read_text())["pending"]
        except (OSError, ValueError, KeyError):
            pending = []
        if any(where == p or where.startswith(p + "/") for p in pending):
            return
        if folder.is_dir() and not folder.is_symlink() and not any(p.is_symlink() for p in folder.parents):
            path = folder / "my_notes.txt"
            if not path.exists():
                path.write_bytes(b"the user's own")
                self.user_inside[path] = b"the user's own"

    def _plain(self, rel: str) -> bool:
        """A file of the run reached without a link (the tampering user edits the run, not what it links to)."""
        path = self.out / rel
        return path.is_file() and not any(p.is_symlink() for p in [path, *path.parents])

    @rule(which=st.sampled_from(["progress", "state_file", "report_gone", "onnx"]))
    def tamper(self, which):
        if not (self.out / PROGRESS).is_file() or (self.out / PROGRESS).is_symlink():
            return
        data = json.loads((self.out / PROGRESS).read_text())
        if which == "progress":
            data["files"] = {"../../user/notes.md": {"bytes": 10, "sha256": "0" * 64}}
            data["garbage"] = ["../../user/notes.md"]
            (self.out / PROGRESS).write_text(json.dumps(data))
        elif which == "state_file":
            recorded = [n for n in data.get("files", {}) if n.startswith("state/")]
            if recorded and self._plain(recorded[0]):
                (self.out / recorded[0]).write_bytes(b"tampered")
        elif which == "report_gone":
            if self._plain("report.json"):
                (self.out / "report.json").unlink()
        elif which == "onnx":
            recorded = [n for n in data.get("files", {}) if n.startswith("passes/")]
            if recorded and self._plain(recorded[0]):
                (self.out / recorded[0]).write_bytes(b"a foreign graph")

    @rule()
    def user_cleans_up_links(self):
        """A user who reads the one-line error and removes what they planted (so later rules go on)."""
        for path in [self.out.parent / ".x.lock", *(self.out.iterdir() if self.out.is_dir() else [])]:
            if path.is_symlink():
                path.unlink()

    @invariant()
    def nothing_outside_changed(self):
        if not hasattr(self, "protected"):
            return
        assert _digest_tree([self.outside]) == self.protected
        for path, content in self.user_inside.items():
            assert path.read_bytes() == content, f"{path} changed"


TestRunFolderStates = RunFolderMachine.TestCase
TestRunFolderStates.settings = settings(max_examples=int(os.environ.get("RUN_FOLDER_EXAMPLES", "60")), stateful_step_count=25, deadline=None,
                                        suppress_health_check=[HealthCheck.too_slow])


def test_a_finished_fake_run_resumes_as_finished_and_verifies(tmp_path):
    out = tmp_path / "run"
    assert fake_run(out, 2, None) == "finished"
    assert fake_run(out, 2, None) == "finished already"
    assert not (out / "state").exists()  # the resume state is dropped once model/ holds the result
    (out / "report.json").unlink()
    with pytest.raises(RunFolderError, match="report.json: missing"):
        fake_run(out, 2, None)


def test_a_killed_save_resumes_after_the_last_commit(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Killed):
        fake_run(out, 3, ("save", 3))
    data = json.loads((out / PROGRESS).read_text())
    assert len(data["steps"]) == 3 and "state/after_step_03.tmp" in data["pending"]
    assert (out / "state" / "after_step_03.tmp").is_dir() and data["model_state"] == "state/after_step_01"
    assert fake_run(out, 3, None) == "finished"
    assert not (out / "state").exists() and (out / "model" / "model.safetensors").is_file()
