"""Output folders: `apply` never replaces a folder it did not create, nor one holding its own inputs."""

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from deftcompress.cli import main
from deftcompress.errors import RecipeError
from deftcompress.pipeline.recipe import Recipe
from deftcompress.pipeline.run_folder import MARKER, RunFolderError, run_lock


def recipe_file(tmp_path: Path, model: Path, data: Path, **fields) -> Path:
    body = {"name": "t", "model": str(model), "task": "glue/sst2", "data_dir": str(data), "max_eval_samples": 4,
            "eval_batch_size": 4, "passes": [{"evaluate": {}}], **fields}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def apply(*args: str):
    return CliRunner().invoke(main, ["apply", *args, "--quiet"])


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_users_folder_is_refused_and_survives(tiny_checkpoint, tiny_data, tmp_path):
    user = tmp_path / "X"
    (user / "chapter1").mkdir(parents=True)
    (user / "chapter1" / "draft.tex").write_text("x")
    before = snapshot(user)
    result = apply(str(recipe_file(tmp_path, tiny_checkpoint("bert"), tiny_data)), "-o", str(user))
    assert result.exit_code == 2
    assert "not a deftcompress run folder" in result.output and result.output.count("\n") == 1
    assert snapshot(user) == before


def test_recipe_output_dir_pointing_at_a_source_folder_is_refused(tiny_checkpoint, tiny_data, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "main.py").write_text("print(1)\n")
    result = apply(str(recipe_file(tmp_path, tiny_checkpoint("bert"), tiny_data, output_dir=str(src))))
    assert result.exit_code == 2 and (src / "main.py").read_text() == "print(1)\n"
    assert list(src.iterdir()) == [src / "main.py"]


@pytest.mark.parametrize("name", [".", "..", "", "../../x", "/abs/x", "a/b", "x" * 101, "-dash"])
def test_run_names_are_plain_names(tiny_checkpoint, tiny_data, tmp_path, name):
    with pytest.raises(RecipeError, match="not a plain run name"):
        Recipe.from_file(recipe_file(tmp_path, tiny_checkpoint("bert"), tiny_data, name=name))


def test_recipe_file_stem_becomes_a_plain_name(tiny_checkpoint, tiny_data, tmp_path):
    path = tmp_path / "my recipe (v2).yaml"
    path.write_text(yaml.safe_dump({"model": str(tiny_checkpoint("bert")), "task": "glue/sst2",
                                    "data_dir": str(tiny_data), "passes": [{"evaluate": {}}]}))
    assert Recipe.from_file(path).name == "my_recipe__v2_"


def test_output_folder_equal_to_or_containing_the_checkpoint_is_refused(tiny_checkpoint, tiny_data, tmp_path):
    import shutil

    ckpt = tmp_path / "ckpt" / "m"
    shutil.copytree(tiny_checkpoint("bert"), ckpt)
    before = snapshot(ckpt)
    recipe = str(recipe_file(tmp_path, ckpt, tiny_data))
    for out in (ckpt, ckpt.parent):
        result = apply(recipe, "-o", str(out))
        assert result.exit_code == 2 and "input checkpoint" in result.output, result.output
    assert snapshot(ckpt) == before


def test_output_folder_containing_the_data_is_refused(tiny_checkpoint, tiny_data, tmp_path):
    before = snapshot(tiny_data)
    result = apply(str(recipe_file(tmp_path, tiny_checkpoint("bert"), tiny_data)), "-o", str(tiny_data))
    assert result.exit_code == 2 and "data folder" in result.output
    assert snapshot(tiny_data) == before


def test_own_run_folder_is_replaced_but_not_with_foreign_files_in_it(tiny_checkpoint, tiny_data, tmp_path):
    recipe = str(recipe_file(tmp_path, tiny_checkpoint("bert"), tiny_data))
    out = tmp_path / "runs" / "t"
    assert apply(recipe, "-o", str(out)).exit_code == 0
    assert (out / MARKER).is_file() and (out / "report.json").is_file()
    first = (out / "report.json").stat().st_mtime_ns
    again = apply(recipe, "-o", str(out))  # the same recipe, finished: nothing to do, the same report
    assert again.exit_code == 0 and "already finished" in again.output
    assert (out / "report.json").stat().st_mtime_ns == first
    assert apply(recipe, "-o", str(out), "--restart").exit_code == 0  # a run of ours: replaced on request
    assert (out / "report.json").stat().st_mtime_ns != first
    (out / "notes.txt").write_text("mine")
    result = apply(recipe, "-o", str(out))
    assert result.exit_code == 2 and "notes.txt" in result.output
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in out.parent.iterdir()) == ["t"]  # no temp folder, no lock left behind


def test_a_file_in_the_way_is_refused(tiny_checkpoint, tiny_data, tmp_path):
    target = tmp_path / "out"
    target.write_text("keep")
    result = apply(str(recipe_file(tmp_path, tiny_checkpoint("bert"), tiny_data)), "-o", str(target))
    assert result.exit_code == 2 and target.read_text() == "keep"


def test_a_second_concurrent_run_is_refused(tiny_checkpoint, tiny_data, tmp_path):
    out = tmp_path / "runs" / "t"
    with run_lock(out):
        result = apply(str(recipe_file(tmp_path, tiny_checkpoint("bert"), tiny_data)), "-o", str(out))
        assert result.exit_code == 2 and "another deftcompress run" in result.output
        assert not out.exists()
    with run_lock(out):  # released: can be taken again
        pass
    with pytest.raises(RunFolderError):
        with run_lock(out):
            with run_lock(out):
                pass


def test_a_stray_rank_variable_does_not_silence_apply(tiny_checkpoint, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = tmp_path / "o"
    result = apply(str(recipe_file(tmp_path, tiny_checkpoint("bert"), tiny_data)), "-o", str(out))
    assert result.exit_code == 0 and "baseline" in result.output and (out / "report.json").is_file()


def test_data_dir_flag_is_passed_not_put_in_the_environment(tiny_checkpoint, tiny_data, tmp_path, monkeypatch):
    import os

    import yaml as _yaml

    monkeypatch.delenv("DEFTCOMPRESS_DATA_DIR", raising=False)
    path = recipe_file(tmp_path, tiny_checkpoint("bert"), tiny_data)
    body = _yaml.safe_load(path.read_text())
    body.pop("data_dir")
    path.write_text(_yaml.safe_dump(body))
    result = apply(str(path), "-o", str(tmp_path / "run"), "--data-dir", str(tiny_data))
    assert result.exit_code == 0, result.output
    assert "DEFTCOMPRESS_DATA_DIR" not in os.environ
    resolved = _yaml.safe_load((tmp_path / "run" / "recipe.resolved.yaml").read_text())
    assert resolved["data_dir"] == str(tiny_data)  # the run remembers where its data came from
