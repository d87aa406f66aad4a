"""relufy: ReLU (or a shifted ReLU) in place of every MLP activation, exact zeros at once, and a model that reloads."""

import json
from pathlib import Path

import pytest
import torch

from conftest import assert_measured_again_alike, resume_after_boom
from deftcompress import Recipe, run_recipe
from deftcompress.architecture import mlp_blocks
from deftcompress.architecture.activation import ShiftedReLU
from deftcompress.errors import RecipeError

CLASSES = {"bert": "AutoModelForSequenceClassification", "llama": "AutoModelForSequenceClassification",
           "t5_gated": "AutoModelForSeq2SeqLM"}


def _hidden(model, family):
    torch.manual_seed(1)
    ids = torch.randint(5, 1000, (2, 7))
    with torch.no_grad():
        if family.startswith("t5"):
            return model(input_ids=ids, decoder_input_ids=ids[:, :3]).logits
        return model(input_ids=ids, output_hidden_states=True).hidden_states[-1]


@pytest.mark.parametrize("family", ["bert", "t5_gated", "llama"])
@pytest.mark.parametrize("activation, threshold", [("relu", 0.0), ("shifted_relu", 0.05)])
def test_relufy_cuts_density_and_the_saved_model_reloads_with_it(tiny_checkpoint, tiny_data, tmp_path, family,
                                                                 activation, threshold):
    import transformers

    from deftcompress.models.formats import load_model

    task = "squad" if family.startswith("t5") else "glue/sst2"
    recipe = Recipe.build(name="r", model=str(tiny_checkpoint(family)), task=task, data_dir=str(tiny_data),
                          max_eval_samples=4, eval_batch_size=4,
                          passes=[{"relufy": {"activation": activation, "threshold": threshold}}])
    out = tmp_path / "run"
    report = run_recipe(recipe, output_dir=out, quiet=True)
    base, relufied = report.steps
    stack = "decoder" if family == "llama" else "encoder"
    # tiny random GELU / SiLU models are nearly fully dense; ReLU zeroes the negative half at once
    assert base.density[stack] > 0.9 and relufied.density[stack] < 0.7
    details = relufied.details
    assert details["layers"] == len(mlp_blocks(report_model := load_model(out / "model")[0]))
    assert details["stock_config"] == (activation == "relu")
    acts = [b.act for b in mlp_blocks(report_model)]
    assert all(isinstance(a, torch.nn.ReLU if activation == "relu" else ShiftedReLU) for a in acts)
    manifest = json.loads((out / "model" / "deftcompress_model.json").read_text())
    assert manifest["format"] == ("plain" if activation == "relu" else "restructured")
    if activation == "relu":  # transformers alone builds the same model
        stock = getattr(transformers, CLASSES[family]).from_pretrained(out / "model")
        assert all(isinstance(b.act, torch.nn.ReLU) for b in mlp_blocks(stock))
        torch.testing.assert_close(_hidden(stock, family), _hidden(report_model, family))


def test_relufy_then_deft_turns_the_scales_off_and_trains(tiny_checkpoint, tiny_data, tmp_path):
    recipe = Recipe.build(name="rd", model=str(tiny_checkpoint("bert")), data_dir=str(tiny_data), max_eval_samples=8,
                          passes=[{"relufy": {}}, {"deft": {"max_steps": 3, "batch_size": 8, "max_train_samples": 24,
                                                            "density_target": 0.2, "train_mlp_bias": True}}])
    report = run_recipe(recipe, output_dir=tmp_path / "run", quiet=True)
    details = report.steps[2].details
    assert details["activation_scales"] is False
    assert any("scale-equivariant" in n for n in details["notes"])
    assert details["density_loss"]["thresholds"] == [0.0]  # ReLU's exact-zero point


@pytest.mark.parametrize("config, message", [
    ({"activation": "relu", "threshold": 0.5}, "threshold applies to activation: shifted_relu"),
    ({"activation": "shifted_relu", "threshold": -1}, "threshold must be in"),
    ({"activation": "swish"}, "activation"),
])
def test_bad_relufy_configs_are_one_line_errors(config, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.build(model="minilm", passes=[{"relufy": config}])


def test_exact_zero_point_of_relu_family():
    from deftcompress.training.density_loss import exact_zero_point

    assert exact_zero_point(torch.nn.ReLU()) == 0.0
    assert exact_zero_point(ShiftedReLU(0.5)) == pytest.approx(0.5, abs=2e-3)


def test_shipped_relufy_then_deft_recipe_runs_as_shipped(tmp_path, monkeypatch):
    """The contract of recipes/relufy_then_deft.yaml on the real MiniLM, its training budget cut to a few steps:
    relufy, DEFT, then the same model evaluated dense and sparse with equal scores, both timed."""
    import os

    import yaml

    from deftcompress.pipeline.runner import run_recipe as run

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    data = yaml.safe_load((Path(__file__).resolve().parent.parent / "recipes" / "relufy_then_deft.yaml").read_text())
    # the only changes: budget and rows
    data["passes"][1]["deft"].update(max_steps=4, max_train_samples=64, budget_held_out_samples=16)
    data.update(max_eval_samples=12, data_dir=os.environ.get("DEFTCOMPRESS_DATA_DIR",
                                                             str(Path(__file__).resolve().parents[2] / "shared" / "data")))
    recipe = Recipe.from_dict(data)
    report = run(recipe, output_dir=tmp_path / "run", quiet=True)
    assert [s.pass_name for s in report.steps] == ["baseline", "relufy", "deft", "evaluate", "evaluate"]
    dense, sparse = report.steps[3], report.steps[4]
    assert sparse.task_score == dense.task_score and sparse.eval_examples == 12
    assert sparse.details["sparse_mlp"]["layers"] and dense.latency and sparse.latency
    assert report.steps[1].density["encoder"] < 0.3  # ReLU's zeros, before any training
    assert "Sparse MLP execution in step 4" in (tmp_path / "run" / "report.md").read_text()


def test_a_shifted_relu_qlora_state_reloads_with_its_activation_and_scales(tiny_checkpoint, tiny_data, tmp_path,
                                                                          fails_once):
    """A 4-bit state carrying both recorded modules (relufy's shifted ReLU, DEFT's scales) resumes to the same numbers."""
    deft = {"method": "qlora", "r": 4, "activation_scale": True, "activation_scale_min": 10.0, "max_steps": 3,
            "batch_size": 16, "learning_rate": 5e-3}
    recipe = Recipe.build(name="q", model=str(tiny_checkpoint("bert")), data_dir=str(tiny_data), eval_batch_size=8,
                          passes=[{"relufy": {"activation": "shifted_relu", "threshold": 0.05}}, {"deft": deft},
                                  "test_fails_once",
                                  {"evaluate": {"density_tau": 0.02}}])  # another tau: measured again, not reused
    report = resume_after_boom(recipe, tmp_path / "out", fails_once, at=3)
    trained, evaluated = report.steps[2], report.steps[4]
    assert trained.details["activation_scales"]["fold"] == "module"
    assert_measured_again_alike(trained, evaluated)
