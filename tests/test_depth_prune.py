"""depth_prune: whole layers removed, the model computes what skipping them computes, and stock transformers reloads it."""

from __future__ import annotations

import pytest
import torch
import transformers

from deftcompress.core.config import parse_config
from deftcompress.core.registry import get_pass
from deftcompress.data.tasks import get_task
from deftcompress.errors import RecipeError
from deftcompress.models.loading import load_model_and_tokenizer
from deftcompress.pipeline.recipe import Recipe
from deftcompress.pipeline.runner import PipelineState


def run_pass(state, name: str, **config):
    cls = get_pass(name, "test")
    return cls(parse_config(cls.Config, config, f"test.{name}")).run(state)


@pytest.fixture(scope="module")
def deep_checkpoint(tmp_path_factory):
    """Tiny BERT and Llama classifiers with 4 layers (the shared fixtures have 2)."""
    from deftcompress.core.model_refs import alias_path

    tokenizer = transformers.AutoTokenizer.from_pretrained(alias_path("minilm"))
    folders = {}
    torch.manual_seed(0)
    for family, model in {
        "bert": transformers.BertForSequenceClassification(transformers.BertConfig(
            vocab_size=30522, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=128)),
        "llama": transformers.LlamaForSequenceClassification(transformers.LlamaConfig(
            vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)),
    }.items():
        folder = tmp_path_factory.mktemp(f"deep_{family}")
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        folders[family] = folder
    return folders


@pytest.fixture
def deep_state(deep_checkpoint, tiny_data, tmp_path):
    def make(family: str) -> PipelineState:
        ref = str(deep_checkpoint[family])
        recipe = Recipe.build(model=ref, data_dir=str(tiny_data), passes=[{"evaluate": {}}])
        spec = get_task("glue/sst2")
        torch.manual_seed(0)
        model, tokenizer, arch = load_model_and_tokenizer(ref, spec)
        model.eval()
        return PipelineState(recipe=recipe, task=spec, arch=arch, model=model, tokenizer=tokenizer,
                             device=torch.device("cpu"), work_dir=tmp_path, quiet=True)
    return make


def _inputs(state):
    enc = state.tokenizer(["the film was good and warm", "dull", "a cold , boring and weak film overall"],
                          return_tensors="pt", padding=True)
    return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def _layers(model):
    return model.bert.encoder.layer if hasattr(model, "bert") else model.model.layers


@torch.no_grad()
def _logits_with_layers_bypassed(model, inputs, bypass: list[int]) -> torch.Tensor:
    """The unpruned model with layers `bypass` returning their input: what removing them must compute."""
    def identity(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

    handles = [_layers(model)[i].register_forward_hook(identity, with_kwargs=True) for i in bypass]
    try:
        return model(**inputs).logits
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_removed_layers_compute_as_bypassed_and_stock_transformers_reloads_them(deep_state, family, tmp_path):
    state = deep_state(family)
    inputs = _inputs(state)
    expected = _logits_with_layers_bypassed(state.model, inputs, [1, 2])
    details = run_pass(state, "depth_prune", remove=[1, 2])
    assert details["removed"] == [f"{state.arch.stacks[0].name}.1", f"{state.arch.stacks[0].name}.2"]
    assert details["layers_after"] == 2 and details["params_after"] < details["params_before"]
    assert set(details["block_influence"]) == {f"{state.arch.stacks[0].name}.{i}" for i in range(4)}
    with torch.no_grad():
        got = state.model(**inputs).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    state.model.save_pretrained(tmp_path / "saved", safe_serialization=True)
    stock = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "saved").eval()
    assert stock.config.num_hidden_layers == 2 and len(_layers(stock)) == 2
    with torch.no_grad():
        torch.testing.assert_close(stock(**inputs).logits, expected, atol=1e-5, rtol=1e-5)


def test_a_decoder_renumbers_its_cache_positions(deep_state):
    state = deep_state("llama")
    run_pass(state, "depth_prune", remove=[0, 2])
    assert [layer.self_attn.layer_idx for layer in state.model.model.layers] == [0, 1]
    with torch.no_grad():  # a cache sized by the new config: a stale layer_idx would index past it
        out = state.model.model(input_ids=torch.tensor([[5, 6, 7]]), use_cache=True)
    assert len(out.past_key_values) == 2


def test_the_least_influential_layer_goes_first(deep_state):
    state = deep_state("llama")
    layer = state.model.model.layers[2]
    for linear in (layer.self_attn.o_proj, layer.mlp.down_proj):  # pre-norm: the layer now returns its input
        torch.nn.init.zeros_(linear.weight)
    details = run_pass(state, "depth_prune", layers=1)
    assert details["block_influence"]["decoder.2"] < 1e-6 < min(v for k, v in details["block_influence"].items() if k != "decoder.2")
    assert details["removed"] == ["decoder.2"] and details["chosen_by"] == "lowest block influence"
    assert details["calibration"]["split"] == "train" and details["calibration"]["rows"] > 0


def test_earlier_structured_pruning_follows_its_layers(deep_state, tmp_path):
    from deftcompress.architecture.layout import layout_of
    from deftcompress.models.formats import load_model, save_model

    state = deep_state("bert")
    run_pass(state, "structured_prune", mlp_ratio=0.5, head_ratio=0.5, scope="global")
    widths = [layer.intermediate.dense.out_features for layer in state.model.bert.encoder.layer]
    run_pass(state, "depth_prune", remove=[1])
    layout = layout_of(state.model)
    assert sorted(layout["mlp"]) == ["encoder.0", "encoder.1", "encoder.2"]
    assert [layout["mlp"][f"encoder.{i}"]["kept"] for i in range(3)] == [widths[0], widths[2], widths[3]]
    inputs = _inputs(state)
    with torch.no_grad():
        expected = state.model(**inputs).logits
    save_model(state.model, tmp_path / "m", tokenizer=state.tokenizer)
    reloaded, _, _ = load_model(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(**inputs).logits, expected, atol=1e-5, rtol=1e-5)


def test_depth_prune_through_the_pipeline(deep_checkpoint, tiny_data, tmp_path):
    from deftcompress.pipeline.runner import run_recipe

    recipe = Recipe.build(name="dp", model=str(deep_checkpoint["bert"]), data_dir=str(tiny_data), max_eval_samples=8,
                          passes=[{"depth_prune": {"layers": 2}}, {"deft": {"method": "lora", "max_steps": 2,
                                                                            "batch_size": 4, "merge": True}}])
    report = run_recipe(recipe, output_dir=tmp_path / "run", quiet=True)
    details = report.steps[1].details
    assert details["layers_after"] == 2 and len(details["removed"]) == 2
    stock = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "model")
    assert stock.config.num_hidden_layers == 2


def test_bad_depth_plans_are_refused(deep_state, pipeline_state):
    with pytest.raises(RecipeError, match="remove must list distinct"):
        Recipe.build(model="minilm", passes=[{"depth_prune": {"remove": [1, 1]}}])
    with pytest.raises(RecipeError, match=r"passes\[1\]\.depth_prune: .*merge: true"):
        Recipe.build(model="minilm", passes=[{"deft": {"method": "lora"}}, {"depth_prune": {}}])
    with pytest.raises(RecipeError, match=r"put depth_prune before it"):
        Recipe.build(model="minilm", passes=[{"magnitude_prune": {}}, {"depth_prune": {}}])
    state = deep_state("bert")
    with pytest.raises(Exception, match="would remove every one of the model's 4 layers"):
        run_pass(state, "depth_prune", layers=4)
    with pytest.raises(Exception, match=r"has layers 0 to 3"):
        run_pass(state, "depth_prune", remove=[7])
    assert len(state.model.bert.encoder.layer) == 4  # refused before anything changed
    with pytest.raises(Exception, match="t5 layers cannot be removed"):
        run_pass(pipeline_state("t5_relu"), "depth_prune", layers=1)
