"""A run folder is verified before it is trusted: the hostile re-run, category by category, through the CLI.

Each case ends in a one-line error with exit 2 (or a correct run), no traceback, and no byte outside the
run's own files changed: link targets, a user's files inside the run folder, the data.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from deftcompress.cli import main


def recipe_file(tmp_path: Path, model: Path, data: Path, passes=None, **fields) -> Path:
    body = {"name": "t", "model": str(model), "task": "glue/sst2", "data_dir": str(data), "max_eval_samples": 4,
            "eval_batch_size": 4, "latency_repeats": 0,
            "passes": passes or [{"magnitude_prune": {"sparsity": 0.3}}, {"evaluate": {}}], **fields}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def apply(*args: str):
    return CliRunner().invoke(main, ["apply", *args, "--quiet"])


def tree(folder: Path) -> dict[str, str]:
    """Every file and link under `folder` (links not followed) with its content digest or target."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in files + dirs:
            p = Path(root) / name
            if p.is_symlink():
                out[str(p)] = "-> " + os.readlink(p)
            elif p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def one_line_error(result, *phrases: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and result.output.count("\n") == 1, result.output
    assert "Traceback" not in result.output
    for phrase in phrases:
        assert phrase in result.output, result.output


@pytest.fixture
def finished(tiny_checkpoint, tiny_data, tmp_path, one_thread):
    recipe = recipe_file(tmp_path, tiny_checkpoint("bert"), tiny_data)
    out = tmp_path / "run"
    assert apply(str(recipe), "-o", str(out)).exit_code == 0
    return recipe, out


@pytest.fixture
def interrupted(tiny_checkpoint, tiny_data, tmp_path, one_thread, monkeypatch):
    """A run killed in its last pass: finished passes and their state are on disk."""
    recipe = recipe_file(tmp_path, tiny_checkpoint("bert"), tiny_data)
    out = tmp_path / "run"
    from deftcompress.passes import evaluate as evaluate_pass

    def boom(self, state):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(evaluate_pass.Evaluate, "run", boom)
        assert apply(str(recipe), "-o", str(out)).exit_code == 130
    assert (out / "state").is_dir()
    return recipe, out


@pytest.mark.parametrize("part", ["state", "passes"])
def test_a_linked_part_of_a_run_is_refused_and_its_target_untouched(interrupted, tmp_path, part):
    recipe, out = interrupted
    elsewhere = tmp_path / "other_disk"
    elsewhere.mkdir()
    (elsewhere / "keep").mkdir()
    (elsewhere / "keep" / "data.bin").write_bytes(b"user")
    if (out / part).exists():
        for item in (out / part).iterdir():
            shutil.move(str(item), str(elsewhere / item.name))
        (out / part).rmdir()
    (out / part).symlink_to(elsewhere)
    before = tree(elsewhere), tree(out)
    one_line_error(apply(str(recipe), "-o", str(out)), "symbolic link", part)
    assert (tree(elsewhere), tree(out)) == before


@pytest.mark.parametrize("dangling", [False, True])
def test_a_linked_lock_is_refused_and_nothing_written_through_it(finished, tmp_path, dangling):
    recipe, out = finished
    target = tmp_path / "precious.txt"
    if not dangling:
        target.write_text("precious bytes")
    (tmp_path / ".run.lock").symlink_to(target)
    one_line_error(apply(str(recipe), "-o", str(out), "--restart"), "lock")
    assert (target.read_text() == "precious bytes") if not dangling else not target.exists()


@pytest.mark.parametrize("name", ["density.png", "report.json", "report.md"])
def test_a_linked_run_file_is_refused(finished, tmp_path, name):
    recipe, out = finished
    target = tmp_path / "mine.txt"
    target.write_text("mine")
    (out / name).unlink()
    (out / name).symlink_to(target)
    one_line_error(apply(str(recipe), "-o", str(out)), "symbolic link")
    assert target.read_text() == "mine"


@pytest.mark.parametrize("where", ["model", "passes/01_magnitude_prune"])
def test_restart_leaves_a_users_files_inside_the_run_and_touches_nothing(finished, where):
    recipe, out = finished
    (out / where).mkdir(parents=True, exist_ok=True)
    (out / where / "my_notes.txt").write_text("mine")
    before = tree(out)
    one_line_error(apply(str(recipe), "-o", str(out), "--restart"), "my_notes.txt", "did not write")
    assert tree(out) == before


def test_restart_of_a_clean_run_runs_again(finished):
    recipe, out = finished
    result = apply(str(recipe), "-o", str(out), "--restart")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "report.json").read_text())["status"] == "finished"


def test_a_finished_run_missing_its_report_is_refused_not_resumed_from_the_source(finished):
    recipe, out = finished
    (out / "report.json").unlink()
    before = tree(out)
    one_line_error(apply(str(recipe), "-o", str(out)), "report.json: missing", "--restart")
    assert tree(out) == before


def test_a_changed_model_file_of_a_finished_run_is_refused(finished):
    recipe, out = finished
    weights = next((out / "model").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    one_line_error(apply(str(recipe), "-o", str(out)), "changed since the run wrote it")


def test_data_changed_between_a_kill_and_the_resume_is_refused(tiny_checkpoint, tiny_data, tmp_path, one_thread,
                                                                monkeypatch):
    data = tmp_path / "data_copy"
    shutil.copytree(tiny_data, data)
    recipe = recipe_file(tmp_path, tiny_checkpoint("bert"), data)
    out = tmp_path / "run"
    from deftcompress.passes import evaluate as evaluate_pass

    with monkeypatch.context() as m:
        m.setattr(evaluate_pass.Evaluate, "run", lambda self, state: (_ for _ in ()).throw(KeyboardInterrupt))
        assert apply(str(recipe), "-o", str(out)).exit_code == 130
    dev = data / "glue" / "sst2" / "dev.tsv"
    lines = dev.read_text().splitlines()
    dev.write_text("\n".join(lines[:1] + [lines[2], lines[1]] + lines[3:]) + "\n")  # same rows, new order
    one_line_error(apply(str(recipe), "-o", str(out)), "the data changed since this run started")


def test_a_tampered_saved_state_is_refused_in_one_line(interrupted):
    recipe, out = interrupted
    progress = json.loads((out / "progress.json").read_text())
    state_json = out / progress["model_state"] / "state.json"
    state_json.write_text(state_json.read_text().replace('"constraints"', '"constraintz"'))
    one_line_error(apply(str(recipe), "-o", str(out)), "state.json", "changed since the run wrote it")


@pytest.mark.parametrize("edit", [
    lambda d: d.update(steps="nope"),
    lambda d: d["steps"][0].update(task_score="high"),
    lambda d: d.update(model_state="../../etc"),
    lambda d: d.update(files={"/etc/passwd": {"bytes": 1, "sha256": "0" * 64}}),
    lambda d: d.update(pending=["../outside"]),
    lambda d: d.update(last_eval_settings={"no_such_field": 1}),
    lambda d: d.update(format=99),
])
def test_a_tampered_progress_file_is_refused_in_one_line(interrupted, tmp_path, edit):
    recipe, out = interrupted
    (tmp_path / "outside").mkdir()
    data = json.loads((out / "progress.json").read_text())
    edit(data)
    (out / "progress.json").write_text(json.dumps(data))
    before = tree(tmp_path / "outside")
    one_line_error(apply(str(recipe), "-o", str(out)))
    assert tree(tmp_path / "outside") == before and (tmp_path / "outside").is_dir()


def test_a_run_killed_during_its_final_save_resumes(interrupted, monkeypatch):
    recipe, out = interrupted
    from deftcompress.pipeline import runner

    real = runner.save_model

    def half(model, folder, **kw):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "half.bin").write_bytes(b"x")
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "save_model", half)
    assert apply(str(recipe), "-o", str(out)).exit_code == 130
    assert (out / "model.partial" / "half.bin").is_file()
    monkeypatch.setattr(runner, "save_model", real)
    result = apply(str(recipe), "-o", str(out))
    assert result.exit_code == 0, result.output
    assert not (out / "model.partial").exists() and (out / "model" / "config.json").is_file()


def test_a_full_disk_while_model_is_written_is_one_line_and_leaves_no_half_model(interrupted, monkeypatch):
    recipe, out = interrupted
    from deftcompress.pipeline import runner

    def full(model, folder, **kw):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "model.safetensors").write_bytes(b"x" * 10)
        raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                           "message: \"No space left on device\" })")

    monkeypatch.setattr(runner, "save_model", full)
    result = apply(str(recipe), "-o", str(out))
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "no space left" in result.output
    assert not (out / "model.partial").exists() and not (out / "model").exists()
    assert json.loads((out / "progress.json").read_text())["status"] == "failed"


def test_max_seq_length_past_the_models_positions_is_one_line_and_writes_nothing(tiny_checkpoint, tiny_data, tmp_path):
    from transformers import AutoConfig

    limit = AutoConfig.from_pretrained(tiny_checkpoint("bert")).max_position_embeddings
    recipe = recipe_file(tmp_path, tiny_checkpoint("bert"), tiny_data, max_seq_length=limit + 8)
    one_line_error(apply(str(recipe), "-o", str(tmp_path / "run")), f"past the {limit} positions")
    assert not (tmp_path / "run").exists()


def test_a_folder_from_another_tool_given_to_compare_is_one_line(tmp_path):
    other = tmp_path / "other_tool_run"
    other.mkdir()
    (other / "progress.json").write_text(json.dumps({"status": "finished"}))
    (other / "report.json").write_text(json.dumps({"model": "x", "accuracy": 0.9}))
    result = CliRunner().invoke(main, ["compare", str(other), "--no-timing", "-q", "-o", str(tmp_path / "cmp")])
    one_line_error(result, "not a run deftcompress finished")
