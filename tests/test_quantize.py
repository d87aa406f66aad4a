"""Quantization backends on CPU: what they convert, the sizes they report, saving and reloading, bad plans."""

from __future__ import annotations

import json

import pytest
import torch

from deftcompress.core.config import parse_config
from deftcompress.errors import RecipeError
from deftcompress.models.formats import save_model
from deftcompress.models.loading import load_model_and_tokenizer
from deftcompress.measurement.size import count_parameters, state_dict_bytes
from deftcompress.pipeline.recipe import Recipe
from deftcompress.core.registry import get_pass


def run_quantize(state, **config):
    cls = get_pass("quantize", "test")
    return cls(parse_config(cls.Config, config, "test.quantize")).run(state)


def sample_inputs(state) -> dict[str, torch.Tensor]:
    enc = state.tokenizer(["the film was good and warm", "dull", "a cold , boring and weak film"], return_tensors="pt",
                          padding=True)
    inputs = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    if state.arch.kind == "encoder_decoder":
        inputs["decoder_input_ids"] = torch.tensor([[0, 5, 9], [0, 7, 1], [0, 3, 3]])
    return inputs


@torch.no_grad()
def logits(model, inputs) -> torch.Tensor:
    model.eval()
    return model(**inputs).logits


@pytest.mark.parametrize("family", ["bert", "t5_relu"])
def test_torch_int8_quantizes_linear_layers_and_reloads_exactly(pipeline_state, family, tmp_path):
    state = pipeline_state(family)
    inputs = sample_inputs(state)
    float_logits = logits(state.model, inputs)
    params_before, _ = count_parameters(state.model)
    details = run_quantize(state, backend="torch_int8")
    quantized = [n for n, m in state.model.named_modules() if type(m).__name__ == "Linear"
                 and type(m).__module__.startswith("torch.ao.nn.quantized.dynamic")]
    assert details["layers_quantized"] == len(quantized) == (12 if family == "bert" else 2 * 6 + 2 * 10)
    assert all("classifier" in n or "pooler" in n or "lm_head" in n for n in details["layers_kept_float"])
    assert details["size_bytes_after"] < details["size_bytes_before"]
    assert details["size_bytes_after"] == state_dict_bytes(state.model)
    assert details["params"] == params_before  # packed int8 weights still count as parameters
    int8_logits = logits(state.model, inputs)
    assert not torch.equal(int8_logits, float_logits)
    assert (int8_logits - float_logits).abs().max() < 0.05 * float_logits.abs().max()

    manifest = save_model(state.model, tmp_path, tokenizer=state.tokenizer)  # what the pipeline calls at the end
    assert manifest["format"] == "torch_int8"
    assert (tmp_path / "model.int8.safetensors").is_file() and not (tmp_path / "model.safetensors").exists()
    assert json.loads((tmp_path / "config.json").read_text())["deftcompress_quantization"]["backend"] == "torch_int8"
    reloaded, _, _ = load_model_and_tokenizer(str(tmp_path), state.task)
    assert torch.equal(logits(reloaded, inputs), int8_logits)


def test_torch_int8_after_structured_pruning_reloads(pipeline_state, tmp_path):
    state = pipeline_state("llama")
    cls = get_pass("structured_prune", "test")
    cls(parse_config(cls.Config, {"mlp_ratio": 0.5, "head_ratio": 0.5}, "t")).run(state)
    run_quantize(state, backend="torch_int8")
    save_model(state.model, tmp_path, tokenizer=state.tokenizer)
    inputs = sample_inputs(state)
    reloaded, _, _ = load_model_and_tokenizer(str(tmp_path), state.task)
    assert torch.equal(logits(reloaded, inputs), logits(state.model, inputs))


def test_bnb_after_structured_pruning_saves_dequantized_and_reloads(pipeline_state, tmp_path):
    state = pipeline_state("bert")
    cls = get_pass("structured_prune", "test")
    cls(parse_config(cls.Config, {"mlp_ratio": 0.5, "head_ratio": 0.5}, "t")).run(state)
    details = run_quantize(state, backend="bnb_4bit")
    assert details["saved_format"].startswith("float32, dequantized")
    save_model(state.model, tmp_path, tokenizer=state.tokenizer)
    inputs = sample_inputs(state)
    reloaded, _, _ = load_model_and_tokenizer(str(tmp_path), state.task)
    assert not any(type(m).__module__.startswith("bitsandbytes") for m in reloaded.modules())
    assert torch.allclose(logits(reloaded, inputs), logits(state.model, inputs), atol=1e-4)


@pytest.mark.parametrize("backend, bits", [("bnb_8bit", 8), ("bnb_4bit", 4)])
def test_bitsandbytes_backends_run_on_cpu_and_reload(pipeline_state, backend, bits, tmp_path):
    state = pipeline_state("bert")
    inputs = sample_inputs(state)
    float_logits = logits(state.model, inputs)
    details = run_quantize(state, backend=backend)
    assert details["bits"] == bits and details["layers_quantized"] == 12
    # tiny layers: per-layer scale tables weigh as much as the codes; still well under half
    assert details["weight_bytes_after"] < details["weight_bytes_before"] / (3 if bits == 8 else 2)
    assert details["size_bytes_after"] < details["size_bytes_before"]
    kinds = {type(m).__name__ for m in state.model.modules() if type(m).__module__.startswith("bitsandbytes")}
    assert kinds == {"Linear8bitLt" if bits == 8 else "Linear4bit"}
    quant_logits = logits(state.model, inputs)
    assert torch.allclose(quant_logits, float_logits, atol=0.1)

    save_model(state.model, tmp_path, tokenizer=state.tokenizer)
    assert "quantization_config" not in vars(state.model.config)  # only the saved config carries it
    reloaded, _, _ = load_model_and_tokenizer(str(tmp_path), state.task)
    assert any(type(m).__module__.startswith("bitsandbytes") for m in reloaded.modules())
    assert torch.allclose(logits(reloaded, inputs), quant_logits, atol=1e-4)


def test_quantize_through_the_pipeline_reports_sizes(tiny_checkpoint, tiny_data, tmp_path):
    from deftcompress.pipeline.runner import run_recipe

    recipe = Recipe.build(name="q", model=str(tiny_checkpoint("bert")), data_dir=str(tiny_data), max_eval_samples=8,
                          passes=[{"quantize": {"backend": "torch_int8"}}])
    report = run_recipe(recipe, output_dir=tmp_path / "run", quiet=True)
    base, quant = report.steps[0], report.steps[-1]
    assert quant.size_bytes < base.size_bytes and quant.params == base.params
    assert quant.details["backend"] == "torch_int8"
    assert (tmp_path / "run" / "model" / "model.int8.safetensors").is_file()

    # the saved int8 model is a model: like any other: evaluated again it scores the same, and saves as int8 again
    again = run_recipe(Recipe.build(name="q2", model=str(tmp_path / "run" / "model"), data_dir=str(tiny_data),
                                    max_eval_samples=8, passes=[{"evaluate": {}}]), output_dir=tmp_path / "run2", quiet=True)
    assert again.steps[0].task_score == quant.task_score and again.steps[0].density == quant.density
    assert again.steps[0].size_bytes == quant.size_bytes
    assert (tmp_path / "run2" / "model" / "model.int8.safetensors").is_file()


@pytest.mark.parametrize("passes, message", [
    ([{"quantize": {"backend": "ort_int8"}}], r"passes\[0\]\.quantize\.backend: ort_int8 .* needs an ONNX export pass"),
    ([{"quantize": {}}, {"deft": {}}], r"passes\[1\]\.deft: cannot train after .*torch_int8 layers have no trainable"),
    ([{"quantize": {"backend": "bnb_4bit"}}, {"deft": {}}], r"passes\[1\]\.deft: cannot train after .*method: qlora"),
    ([{"quantize": {}}, {"magnitude_prune": {}}], r"passes\[1\]\.magnitude_prune: .*must come after every pass"),
    ([{"deft": {"method": "lora"}}, {"quantize": {}}], r"passes\[1\]\.quantize: .*set merge: true"),
    ([{"deft": {"merge": True}}, {"quantize": {}}], r"passes\[1\]\.quantize: .*activation scales folded into the "
                                                     r"weights.*activation_scale_fold: activation"),
    ([{"deft": {"merge": True}}, {"onnx_export": {}}, {"quantize": {"backend": "ort_int8"}}],
     r"passes\[2\]\.quantize: .*activation_scale_fold: activation"),
    ([{"quantize": {"backend": "int4"}}], r"backend: expected one of"),
    ([{"quantize": {"ignore": ["re:["]}}], r"ignore: bad regular expression"),
])
def test_bad_quantize_plans_are_rejected_before_loading(passes, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.build(model="minilm", passes=passes)


def test_good_quantize_plans_validate():
    Recipe.build(model="minilm", passes=[{"deft": {"merge": True, "activation_scale_fold": "activation"}},
                                         {"quantize": {}}, {"evaluate": {}}])
    Recipe.build(model="minilm", passes=[{"deft": {"merge": True, "density_weight": 0}}, {"quantize": {}}])  # no scales
    Recipe.build(model="minilm", passes=[{"structured_prune": {}}, {"quantize": {"backend": "bnb_4bit"}}])


def test_ort_int8_fails_clearly_when_the_plan_is_bypassed(pipeline_state):
    from deftcompress.errors import DeftcompressError

    with pytest.raises(DeftcompressError, match="ONNX export pass"):
        run_quantize(pipeline_state("bert"), backend="ort_int8")
