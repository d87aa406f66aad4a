"""activation_threshold: per-layer cutoffs on training rows give exact zeros to SiLU / GELU, and the model reloads with them."""

from __future__ import annotations

import pytest
import torch
import transformers

from deftcompress.core.config import parse_config
from deftcompress.core.registry import get_pass
from deftcompress.errors import RecipeError
from deftcompress.pipeline.recipe import Recipe


def run_pass(state, name: str, **config):
    cls = get_pass(name, "test")
    return cls(parse_config(cls.Config, config, f"test.{name}")).run(state)


def _inputs(state):
    enc = state.tokenizer(["the film was good and warm", "dull", "a cold , boring and weak film overall"],
                          return_tensors="pt", padding=True)
    return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_cutoffs_leave_the_target_density_and_exact_zeros_below_them(pipeline_state, family, one_thread):
    from deftcompress.architecture import mlp_blocks
    from deftcompress.architecture.activation import ThresholdedActivation
    from deftcompress.measurement.density import DensityMeter

    state = pipeline_state(family)
    details = run_pass(state, "activation_threshold", density_target=0.3)
    assert set(details["thresholds"]) == {b.label for b in mlp_blocks(state.model, state.arch)}
    for label, density in details["calibration_density"].items():
        assert density == pytest.approx(0.3, abs=0.02), label  # the quantile leaves 30% above the cutoff
    block = mlp_blocks(state.model, state.arch)[0]
    assert isinstance(block.act, ThresholdedActivation)
    x = torch.linspace(-3, 3, 101)
    y = block.act(x)
    below = block.act.act(x).abs() <= block.act.threshold
    assert torch.equal(y[below], torch.zeros(int(below.sum()))) and torch.equal(y[~below], block.act.act(x)[~below])


def test_the_cutoffs_reload_and_stock_transformers_refuses_the_folder(pipeline_state, tmp_path, one_thread):
    from deftcompress.models.formats import load_model, save_model

    state = pipeline_state("llama")
    run_pass(state, "activation_threshold", density_target=0.4)
    inputs = _inputs(state)
    state.model.eval()
    with torch.no_grad():
        expected = state.model(**inputs).logits
    save_model(state.model, tmp_path / "m", tokenizer=state.tokenizer)
    reloaded, _, _ = load_model(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(**inputs).logits, expected, atol=1e-6, rtol=1e-6)
    with pytest.raises(Exception, match="deftcompress"):
        transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "m")


def test_thresholds_through_the_pipeline_then_lora(tiny_checkpoint, tiny_data, tmp_path, one_thread):
    from deftcompress.pipeline.runner import run_recipe

    recipe = Recipe.build(name="th", model=str(tiny_checkpoint("llama")), data_dir=str(tiny_data), max_eval_samples=8,
                          passes=[{"activation_threshold": {"density_target": 0.25}},
                                  {"deft": {"method": "lora", "density_weight": 0.0, "max_steps": 2, "batch_size": 4,
                                            "merge": True}}])
    report = run_recipe(recipe, output_dir=tmp_path / "run", quiet=True)
    assert report.steps[0].density["decoder"] == 1.0  # SiLU: never exactly zero
    assert report.steps[1].density["decoder"] < 0.5 and report.steps[2].density["decoder"] < 0.5
    assert report.steps[1].details["calibration"]["split"] == "train" and report.steps[1].details["calibration"]["rows"] == 64


def test_bad_threshold_plans_are_refused():
    with pytest.raises(RecipeError, match=r"density_target must be in \(0, 1\)"):
        Recipe.build(model="minilm", passes=[{"activation_threshold": {"density_target": 1.0}}])


def test_an_encoder_decoder_is_refused_in_one_line(pipeline_state):
    with pytest.raises(Exception, match="encoder-decoder models are not supported yet"):
        run_pass(pipeline_state("t5_relu"), "activation_threshold", density_target=0.5)
