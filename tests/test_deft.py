"""The `deft` pass: density loss values, which parameters train, every method on every family,
save / reload of adapters and final models, config validation, bitsandbytes helpers, 2 processes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from deftcompress import Recipe, RecipeError, run_recipe
from deftcompress.architecture import MLPBlock, mlp_blocks
from deftcompress.training.density_loss import DensityLoss, DensityLossSettings, density_loss_value, exact_zero_point
from deftcompress.core.protocol import Pass
from deftcompress.core.registry import register_pass, unregister_pass
from deftcompress.training.context import TrainingContext
from deftcompress.training.loop import TrainSettings, collate, encode_examples, train

METHODS = ("lora", "qlora", "ia3", "prompt", "prefix", "adapter")
FAMILIES = ("bert", "t5_relu", "llama")  # encoder, encoder-decoder, decoder-only
REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


def _ctx(state) -> TrainingContext:
    return TrainingContext.from_state(state, "test_train")


# ---- the loss against hand computation -------------------------------------------------------

def _block(stack: str, index: int, act: nn.Module | None = None) -> MLPBlock:
    ident = nn.Identity()
    return MLPBlock(stack=stack, index=index, layer_name=f"{stack}.{index}", layer=ident, block=ident,
                    act=act or nn.GELU(), up=ident, down=ident)


EPS = 1e-7
# batch 2 x 3 positions x 2 features; sequence 0 has 2 real tokens, sequence 1 has 1.
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])
ACT0 = [[[0.0, 1e-3], [2e-4, -5.0], [1.0, 1.0]],
        [[0.0, 0.0], [3.0, 3.0], [0.0, 3e-4]]]
ACT1 = [[[1e-4, 0.0], [0.0, 0.0], [0.0, 0.0]],
        [[5e-4, -2e-4], [0.0, 0.0], [1e-5, 0.0]]]


def _smooth_count(a: float, eps: float = EPS) -> float:
    return a * a / (a * a + eps)


def _hand_layer(values, mask=None) -> float:
    """Mean of a^2/(a^2+eps) over the counted positions and all features, with plain Python floats."""
    total, count = 0.0, 0
    for b, row in enumerate(values):
        for t, feats in enumerate(row):
            if mask is not None and not mask[b][t]:
                continue
            total += sum(_smooth_count(a) for a in feats)
            count += len(feats)
    return total / count


def _acts(blocks, values):
    return [(b, torch.tensor(v), torch.tensor(v)) for b, v in zip(blocks, values)]


def test_paper_loss_masked_vs_paper_mode_by_hand():
    blocks = [_block("encoder", 0), _block("encoder", 1)]
    masked = density_loss_value(_acts(blocks, [ACT0, ACT1]), DensityLossSettings(kind="paper", eps=EPS, mode="masked"),
                                {"encoder": MASK})
    paper = density_loss_value(_acts(blocks, [ACT0, ACT1]), DensityLossSettings(kind="paper", eps=EPS, mode="paper"),
                               {"encoder": MASK})
    mask = MASK.tolist()
    expected_masked = (_hand_layer(ACT0, mask) + _hand_layer(ACT1, mask)) / 2  # mean over layers
    expected_paper = (_hand_layer(ACT0) + _hand_layer(ACT1)) / 2  # padding positions counted too
    assert float(masked) == pytest.approx(expected_masked, rel=1e-5)
    assert float(paper) == pytest.approx(expected_paper, rel=1e-5)
    # the padding rows hold large values: counting them must raise the loss, and the numbers differ clearly
    assert expected_paper - expected_masked > 0.04
    # spot-check one hand value: layer 0 masked = (0 + 0.90909 + 0.28571 + 1 + 0 + 0) / 6
    assert _hand_layer(ACT0, mask) == pytest.approx((1e-6 / 1.1e-6 + 4e-8 / 1.4e-7 + 1.0) / 6, rel=1e-6)


def test_encoder_decoder_loss_is_encoder_term_plus_decoder_term():
    enc = [_block("encoder", 0), _block("encoder", 1)]
    dec = [_block("decoder", 0)]
    dec_mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    settings = DensityLossSettings(kind="paper", eps=EPS)
    value = density_loss_value(_acts(enc, [ACT0, ACT1]) + _acts(dec, [ACT1]), settings,
                               {"encoder": MASK, "decoder": dec_mask})
    mask = MASK.tolist()
    expected = (_hand_layer(ACT0, mask) + _hand_layer(ACT1, mask)) / 2 + _hand_layer(ACT1, dec_mask.tolist())
    assert float(value) == pytest.approx(expected, rel=1e-5)


def test_preact_and_hinge_losses_by_hand():
    block = _block("encoder", 0)
    pre = [[[-6.0, 0.0], [2.0, -5.5]]]
    mask = torch.tensor([[1, 0]])
    settings = DensityLossSettings(kind="preact", zero_point=-5.5, margin=0.5, temperature=2.0)
    value = density_loss_value([(block, torch.tensor(pre), torch.zeros(1, 2, 2))], settings, {"encoder": mask})
    theta = -5.5 - 0.5
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert float(value) == pytest.approx((sig((-6.0 - theta) / 2) + sig((0.0 - theta) / 2)) / 2, rel=1e-6)
    hinge = density_loss_value([(block, torch.tensor(pre), torch.zeros(1, 2, 2))],
                               DensityLossSettings(kind="hinge", zero_point=-5.5, hinge_cap=4.0), {"encoder": mask})
    assert float(hinge) == pytest.approx((0.0 + 4.0 / 4.0) / 2)  # -6 is under theta; 0 - (-5.5) = 5.5 capped at 4


def test_prompt_virtual_tokens_count_as_real_positions():
    block = _block("encoder", 0)
    act = torch.tensor([[[1.0], [1.0], [1.0], [9.0]]])  # 2 virtual tokens, 1 real token, 1 padding
    value = density_loss_value([(block, act, act)], DensityLossSettings(kind="paper", eps=1.0), {"encoder": torch.tensor([[1, 0]])})
    assert float(value) == pytest.approx(0.5)  # three positions with a=1: 1/(1+1)


def test_exact_zero_points():
    gelu_zero = exact_zero_point(nn.GELU())
    assert -5.6 < gelu_zero < -5.5
    assert float(nn.GELU()(torch.tensor(gelu_zero))) == 0.0
    assert float(nn.GELU()(torch.tensor(gelu_zero + 0.01))) != 0.0
    assert exact_zero_point(nn.ReLU()) == 0.0


def test_weight_schedule_and_eps_schedule():
    loss = DensityLoss([_block("encoder", 0, act=nn.Identity())],
                       DensityLossSettings(weight=2.0, warmup_ratio=0.2, ramp_ratio=0.4, eps=1e-7, eps_start=1e-3))
    assert [loss.ramp(s, 10) for s in (0, 1, 2, 4, 6, 9)] == pytest.approx([0, 0, 0, 0.5, 1, 1])
    assert loss.eps_at(2, 10) == pytest.approx(1e-3)  # eps decays only once the density phase starts
    assert loss.eps_at(10, 10) == pytest.approx(1e-7)
    assert loss.eps_at(6, 10) == pytest.approx(1e-5, rel=1e-6)  # halfway in log space
    block = loss.blocks[0]
    x = torch.ones(1, 1, 2, requires_grad=True)
    with loss:  # the loss hooks the block's activation module: an identity here, so it sees a = 1
        loss.begin_step({}, 1, 10)  # inside the warm-up: weight 0, nothing joins the graph
        block.act(x)
        term, raw = loss.end_step()
    assert term is None and raw == pytest.approx(1 / (1 + 1e-3))
    # the same value through the hook-free public function (step 0 of 1 is in the warm-up too: eps = eps_start)
    assert float(density_loss_value([(block, x, x)], loss.settings)) == pytest.approx(raw)


# ---- which parameters train ------------------------------------------------------------------

TRAINABLE_PATTERNS = {
    "lora": ("lora_A", "lora_B"), "qlora": ("lora_A", "lora_B"), "ia3": ("ia3_l",), "prompt": ("prompt_encoder",),
    "prefix": ("prompt_encoder",), "adapter": ("adapters.deft",),
}


def _wrap(state, method, **kw):
    from deftcompress.peft_methods.wrapping import PeftSettings, wrap_model

    return wrap_model(state.model, state.arch, state.task, PeftSettings(method=method, r=2, num_virtual_tokens=3,
                                                                        reduction_factor=4, **kw)).model


def _probe_batch(state, n=8):
    examples = state.examples("train", n)
    return collate(state.tokenizer, state.task, state.arch, encode_examples(state.tokenizer, state.task, state.arch, examples))


def _density_loss_on(model, state, batch, eps=0.1) -> float:
    loss = DensityLoss(mlp_blocks(model, state.arch), DensityLossSettings(kind="paper", eps=eps))
    model.eval()
    with loss, torch.no_grad():
        loss.begin_step(batch.token_masks, 0, 1)
        model(**batch.inputs)
        return loss.end_step()[1]


@pytest.mark.parametrize("method", METHODS)
def test_gradient_reaches_only_peft_parameters_and_head(pipeline_state, method):
    state = pipeline_state("bert")
    model = _wrap(state, method)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    head = {n for n in trainable if "classifier" in n}
    assert head, "the classification head must train"
    assert all(any(k in n for k in TRAINABLE_PATTERNS[method]) for n in trainable - head), sorted(trainable - head)
    batch = _probe_batch(state)
    loss = DensityLoss(mlp_blocks(model, state.arch), DensityLossSettings(kind="paper", eps=0.1, weight=1.0))
    model.train()
    with loss:
        loss.begin_step(batch.token_masks, 0, 1)
        task = model(**batch.inputs).loss
        term, _ = loss.end_step()
    (task + term).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad <= trainable
    assert with_grad - head, "no PEFT parameter received a gradient"
    # the density term alone reaches the PEFT parameters (the hooks are in the autograd graph)
    model.zero_grad()
    with loss:
        loss.begin_step(batch.token_masks, 0, 1)
        model(**batch.inputs)
        term, _ = loss.end_step()
    term.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n not in head)


def test_train_mlp_bias_makes_only_up_projection_biases_trainable(pipeline_state):
    from deftcompress.peft_methods.wrapping import enable_mlp_bias

    state = pipeline_state("bert")
    model = _wrap(state, "lora")
    biases = enable_mlp_bias(model, state.arch)
    assert [n for n, _ in biases] == [f"bert.encoder.layer.{i}.intermediate.dense.bias" for i in range(2)]
    extra = {n for n, p in model.named_parameters() if p.requires_grad and not any(k in n for k in ("lora_", "classifier"))}
    assert extra == {f"base_model.model.bert.encoder.layer.{i}.intermediate.dense.base_layer.bias" for i in range(2)}


def test_t5_and_llama_have_no_mlp_bias_to_train(pipeline_state):
    from deftcompress.errors import DeftcompressError
    from deftcompress.peft_methods.wrapping import enable_mlp_bias

    state = pipeline_state("t5_relu")
    with pytest.raises(DeftcompressError, match="no bias"):
        enable_mlp_bias(_wrap(state, "lora"), state.arch)


WEIGHT = 30.0  # density-dominated: the test is about the loss reaching the PEFT parameters


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_and_lowers_the_density_loss(pipeline_state, family, method):
    state = pipeline_state(family)
    model = _wrap(state, method)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad and p.dtype.is_floating_point}
    trainable_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    batch = _probe_batch(state)
    before = _density_loss_on(model, state, batch)
    loss = DensityLoss(mlp_blocks(model, state.arch), DensityLossSettings(kind="paper", eps=0.1, weight=WEIGHT))
    # prompt and prefix tuning need the large learning rates they are known for
    lr = 1e-1 if method in ("prompt", "prefix") else 1e-2
    settings = TrainSettings(max_steps=4, batch_size=8, learning_rate=lr, warmup_ratio=0.0, eval_every_epoch=False)
    with loss:
        result = train(_ctx(state), model, state.examples("train", 16), settings, extra_loss=loss)
    after = _density_loss_on(result.model, state, batch)
    assert result.steps == 4 and result.epochs[0].extra_loss is not None
    assert after < before, f"{family}/{method}: density loss {before:.5f} -> {after:.5f}"
    params = dict(result.model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in frozen_before.items()), "a frozen parameter moved"
    assert any(not torch.equal(params[n], v) for n, v in trainable_before.items())


def test_density_weight_zero_is_plain_peft_through_the_same_code(pipeline_state):
    """Weight 0: the loss is measured (logged) but adds nothing; the trajectory equals a run with no extra loss."""
    def run(extra: bool):
        state = pipeline_state("bert")
        torch.manual_seed(0)
        model = _wrap(state, "lora")
        loss = DensityLoss(mlp_blocks(model, state.arch), DensityLossSettings(weight=0.0)) if extra else None
        settings = TrainSettings(max_steps=3, batch_size=8, eval_every_epoch=False)
        if loss is None:
            return train(_ctx(state), model, state.examples("train", 16), settings)
        with loss:
            return train(_ctx(state), model, state.examples("train", 16), settings, extra_loss=loss)

    plain, zero = run(False), run(True)
    assert zero.epochs[0].extra_loss is not None and zero.epochs[0].train_loss == zero.epochs[0].task_loss
    for (n, a), (_, b) in zip(plain.model.named_parameters(), zero.model.named_parameters()):
        assert torch.equal(a, b), n


# ---- the pass in recipes: every method, save / reload ----------------------------------------

RECORDED: dict[str, torch.Tensor] = {}


def _fixed_batch(tokenizer, state_or_task, arch, examples):
    return collate(tokenizer, state_or_task, arch, encode_examples(tokenizer, state_or_task, arch, examples))


class RecordOutputs(Pass):
    """Test-only: remember the logits of the pipeline's in-memory model on fixed rows."""

    name = "test_record_outputs"
    changes_model = False

    def run(self, state):
        batch = _fixed_batch(state.tokenizer, state.task, state.arch, state.examples("validation", 4))
        state.model.eval()
        with torch.no_grad():
            RECORDED[state.recipe.name] = state.model(**batch.inputs).logits.detach().clone()
        return {"model_class": type(state.model).__name__}


@pytest.fixture(scope="module", autouse=True)
def record_outputs_pass():
    """`test_record_outputs` exists while this module's tests run, and is removed afterwards."""
    register_pass(RecordOutputs)
    yield RecordOutputs
    unregister_pass(RecordOutputs.name)


def _logits(model, tokenizer, task, arch, examples):
    batch = _fixed_batch(tokenizer, task, arch, examples)
    model.eval()
    with torch.no_grad():
        return model(**batch.inputs).logits


def _run_deft(tiny_checkpoint, tiny_data, tmp_path, family, name, **deft):
    deft = {"max_steps": 2, "batch_size": 8, "max_train_samples": 16, "r": 2, "num_virtual_tokens": 3,
            "reduction_factor": 4, "learning_rate": 1e-2, "density_eps": 0.1, **deft}
    recipe = Recipe.build(name=name, model=str(tiny_checkpoint(family)), task="glue/sst2", data_dir=str(tiny_data),
                          max_eval_samples=4, eval_batch_size=8, passes=[{"deft": deft}, "test_record_outputs"])
    out = tmp_path / name
    return run_recipe(recipe, output_dir=out, quiet=True), out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_recipe_saves_adapter_and_reloadable_model(tiny_checkpoint, tiny_data, tmp_path, family, method):
    from transformers import AutoTokenizer

    from deftcompress.quantization.bnb import quantize_linear_layers
    from deftcompress.models.loading import load_model_and_tokenizer
    from deftcompress.models.formats import load_model
    from deftcompress.peft_methods.saving import load_adapter_into
    from deftcompress.data.tasks import get_task, load_examples

    name = f"{family}_{method}"
    report, out = _run_deft(tiny_checkpoint, tiny_data, tmp_path, family, name, method=method)
    data = json.loads((out / "report.json").read_text())
    assert [s["pass"] for s in data["steps"]] == ["baseline", "deft", "test_record_outputs"]
    d = data["steps"][1]["details"]
    assert d["method"] == method and d["steps"] == 2 and d["trainable_params"] > 0 and d["chosen_epoch"] == 1
    assert d["epochs"][0]["density_loss"] is not None and d["seconds_per_step"] > 0
    density = data["steps"][1]["density"]  # decoder-only models report under "decoder"
    assert (density["encoder"] is not None, density["decoder"] is not None) == (family != "llama", family != "bert")
    adapter_dir = out / d["adapter_dir"]
    library_files = {"adapter": "adapter.safetensors"}.get(method, "adapter_model.safetensors")
    from safetensors import safe_open

    extras = [f for f in ("activation_scales.safetensors", "mlp_bias.safetensors") if (adapter_dir / f).is_file()
              and list(safe_open(str(adapter_dir / f), "pt").keys())]
    # with extras the adapter is wrong on the untouched base: its library config is kept under deftcompress's name
    config_name = "deftcompress_adapter_config.json" if extras else "adapter_config.json"
    assert (adapter_dir / library_files).is_file() and (adapter_dir / config_name).is_file()
    assert [p.name for p in adapter_dir.glob("*adapter_config.json")] == [config_name]
    assert not list(adapter_dir.rglob("*.bin")) and not list(out.rglob("*.pt"))

    task = get_task("glue/sst2")
    examples = load_examples(task, "validation", tiny_data, 4)
    trained = RECORDED[name]
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    manifest = json.loads((out / "model" / "deftcompress_model.json").read_text())
    reloaded, _, arch = load_model(out / "model")
    exact = manifest["format"] == "base_adapter"
    merged = method in ("lora", "qlora", "ia3")
    assert manifest["format"] == ("plain" if merged else "base_adapter")
    assert manifest.get("merged_adapter") == ({"qlora": "lora"}.get(method, method) if merged else None)
    torch.testing.assert_close(_logits(reloaded, tokenizer, task, arch, examples), trained,
                               atol=1e-6 if exact else 1e-4, rtol=0 if exact else 1e-4)
    # the adapter folder alone (library format) on a fresh copy of the original checkpoint
    base, _, _ = load_model_and_tokenizer(str(tiny_checkpoint(family)), task)
    if method == "qlora":
        quantize_linear_layers(base, bits=4)
    attached = load_adapter_into(base, adapter_dir, d["library"])
    torch.testing.assert_close(_logits(attached, tokenizer, task, arch, examples), trained, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ("lora", "adapter"))
def test_trained_mlp_biases_are_saved_with_the_adapter(tiny_checkpoint, tiny_data, tmp_path, method):
    from safetensors.torch import load_file

    from deftcompress.architecture import spec_for
    from deftcompress.models.loading import load_model_and_tokenizer
    from deftcompress.models.formats import load_model
    from deftcompress.peft_methods.saving import load_adapter_into
    from deftcompress.data.tasks import get_task, load_examples

    name = f"bias_{method}"
    report, out = _run_deft(tiny_checkpoint, tiny_data, tmp_path, "bert", name, method=method, train_mlp_bias=True,
                            mlp_bias_lr=0.05)
    details = report.steps[1].details
    adapter_dir = out / details["adapter_dir"]
    biases = load_file(str(adapter_dir / "mlp_bias.safetensors"))
    assert sorted(biases) == [f"bert.encoder.layer.{i}.intermediate.dense.bias" for i in range(2)]
    task = get_task("glue/sst2")
    base, tokenizer, arch = load_model_and_tokenizer(str(tiny_checkpoint("bert")), task)
    assert not torch.equal(base.get_parameter("bert.encoder.layer.0.intermediate.dense.bias"),
                           biases["bert.encoder.layer.0.intermediate.dense.bias"]), "the biases did not train"
    examples = load_examples(task, "validation", tiny_data, 4)
    attached = load_adapter_into(base, adapter_dir, details["library"])
    torch.testing.assert_close(_logits(attached, tokenizer, task, arch, examples), RECORDED[name], atol=1e-6, rtol=0)
    reloaded, _, _ = load_model(out / "model")
    torch.testing.assert_close(_logits(reloaded, tokenizer, task, spec_for(reloaded), examples), RECORDED[name],
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ("lora", "ia3", "qlora"))
def test_merge_hands_a_plain_model_to_the_next_pass(tiny_checkpoint, tiny_data, tmp_path, method):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from deftcompress.architecture import spec_for
    from deftcompress.data.tasks import get_task, load_examples

    name = f"merge_{method}"
    report, out = _run_deft(tiny_checkpoint, tiny_data, tmp_path, "roberta", name, merge=True)
    assert report.steps[2].details["model_class"] == "RobertaForSequenceClassification"
    assert report.steps[1].details["merged"] is True
    # the final folder is a plain checkpoint: transformers alone reloads it
    reloaded = AutoModelForSequenceClassification.from_pretrained(out / "model")
    task = get_task("glue/sst2")
    logits = _logits(reloaded, AutoTokenizer.from_pretrained(out / "model"), task, spec_for(reloaded),
                     load_examples(task, "validation", tiny_data, 4))
    # qlora: the pipeline's merged model is 4-bit again (peft re-quantizes), the saved one is its float value
    torch.testing.assert_close(logits, RECORDED[name], atol=1e-4 if method != "qlora" else 2e-2, rtol=1e-3)


def test_t5_gated_squad_text_to_text_with_paper_mode_training(tiny_checkpoint, tiny_data, tmp_path, monkeypatch):
    """SQuAD as text-to-text on a gated-GELU T5: encoder + decoder loss terms, padding counted (paper mode)."""
    from deftcompress.training import loop

    # Record what the loss sees: the pre-activation of every MLP activation in each training forward, and each batch.
    pre_acts: list[tuple[str, int, torch.Tensor]] = []
    batches, act_modules = [], []
    real_train, real_collate = loop.train, loop.collate

    def recording_train(state, model, *args, **kwargs):
        blocks = mlp_blocks(model, state.arch)
        act_modules.extend(b.act for b in blocks)
        def record(block):
            return lambda module, inputs, output: pre_acts.append((block.stack, block.index, inputs[0].detach().clone()))

        hooks = [b.act.register_forward_hook(record(b)) for b in blocks]
        try:
            return real_train(state, model, *args, **kwargs)
        finally:
            for h in hooks:
                h.remove()

    def recording_collate(*args, **kwargs):
        batches.append(real_collate(*args, **kwargs))
        return batches[-1]

    monkeypatch.setattr(loop, "train", recording_train)
    monkeypatch.setattr(loop, "collate", recording_collate)
    recipe = Recipe.build(name="t5_squad", model=str(tiny_checkpoint("t5_gated")), task="squad", data_dir=str(tiny_data),
                          max_eval_samples=4, eval_batch_size=8, max_seq_length=48,
                          passes=[{"deft": {"method": "lora", "max_steps": 2, "batch_size": 4, "max_train_samples": 8,
                                            "r": 2, "density_mode": "paper"}}])
    report = run_recipe(recipe, output_dir=tmp_path / "t5_squad", quiet=True)
    step = report.steps[1]
    assert step.task_metric == "f1" and step.density["encoder"] is not None and step.density["decoder"] is not None
    details = step.details
    assert details["steps"] == 2 and details["train_rows"] == 8 and details["epochs"][0]["steps"] == 2
    # the default loss (preact) with the activation's own exact-zero point: tanh-GELU is exactly 0 below about -5.158
    assert len(act_modules) == 4 and len({type(a) for a in act_modules}) == 1
    theta = exact_zero_point(act_modules[0])
    assert -5.2 < theta < -5.1
    loss_settings = details["density_loss"]
    assert loss_settings["loss"] == "preact" and loss_settings["mode"] == "paper"
    assert loss_settings["thresholds"] == [round(theta, 4)] and loss_settings["temperature"] == 1.0

    # paper mode pads every batch to max_seq_length (encoder) / max_target_length (decoder) and counts every position
    assert len(batches) == 2 and len(pre_acts) == 2 * 4  # 2 steps x (2 encoder + 2 decoder layers)
    for batch in batches:
        assert batch.inputs["input_ids"].shape == (4, 48) and batch.inputs["labels"].shape == (4, 32)
        assert int(batch.token_masks["encoder"].sum()) < 4 * 48  # there is padding to count
    for stack, _, pre in pre_acts:
        assert pre.shape == ((4, 48, 64) if stack == "encoder" else (4, 32, 64)), stack
    # the logged loss, by hand: per layer the mean of sigmoid(x - theta) over *every* position and feature, the mean
    # over each stack's layers, encoder + decoder; then the mean over the epoch's two steps
    def by_hand(masks_per_step=None) -> float:
        per_step = []
        for s in range(2):
            layers = pre_acts[4 * s:4 * s + 4]
            total = 0.0
            for stack in ("encoder", "decoder"):
                values = []
                for st, _, pre in layers:
                    if st != stack:
                        continue
                    per_position = torch.sigmoid(pre.double() - theta).mean(-1)
                    mask = None if masks_per_step is None else masks_per_step[s][stack].double()
                    values.append(per_position.mean() if mask is None else (per_position * mask).sum() / mask.sum())
                assert len(values) == 2
                total += float(sum(values) / 2)
            per_step.append(total)
        return sum(per_step) / 2

    paper = by_hand()
    assert details["epochs"][0]["density_loss"] == pytest.approx(paper, abs=2e-6)  # the log rounds to 6 decimals
    # counting only the real tokens gives another value (by ~2e-4 here), so the check above tells paper from masked
    masked = by_hand([b.token_masks for b in batches])
    assert abs(masked - paper) > 1e-5
    # each stack's term is a mean of sigmoids, at most 1; at init pre-activations sit far above theta, so close to 1
    assert 1.5 < details["epochs"][0]["density_loss"] <= 2.0


def test_roberta_prefix_tuning_classifies_the_sequence_output(tiny_checkpoint, tiny_data, tmp_path):
    """peft's prefix tuning hands RoBERTa's head the cache instead of the hidden states; the pass fixes that."""
    import peft
    from transformers import AutoTokenizer

    from deftcompress.data.tasks import get_task, load_examples
    from deftcompress.models.formats import load_model
    from deftcompress.models.loading import load_model_and_tokenizer

    report, out = _run_deft(tiny_checkpoint, tiny_data, tmp_path, "roberta", "roberta_prefix", method="prefix")
    details = report.steps[1].details
    assert any("pooler-less" in n for n in details["notes"])
    task = get_task("glue/sst2")
    examples = load_examples(task, "validation", tiny_data, 4)
    tokenizer = AutoTokenizer.from_pretrained(out / "model")

    # the reloaded model computes what the pipeline's in-memory model computed
    reloaded, _, arch = load_model(out / "model")
    assert json.loads((out / "model" / "deftcompress_model.json").read_text())["format"] == "base_adapter"
    base = reloaded.get_base_model()
    sequence, head_input = [], []
    hooks = [base.roberta.register_forward_hook(lambda m, args, output: sequence.append(output[0])),
             base.classifier.register_forward_pre_hook(lambda m, args: head_input.append(args[0]))]
    try:
        logits = _logits(reloaded, tokenizer, task, arch, examples)
    finally:
        for h in hooks:
            h.remove()
    assert logits.shape == (4, 2)
    torch.testing.assert_close(logits, RECORDED["roberta_prefix"], atol=1e-6, rtol=0)
    # ... and its head classifies the backbone's sequence output (it pools the first token itself)
    assert len(sequence) == 1 and len(head_input) == 1
    assert isinstance(head_input[0], torch.Tensor) and torch.equal(head_input[0], sequence[0])
    assert head_input[0].shape[:2] == _fixed_batch(tokenizer, task, arch, examples).inputs["input_ids"].shape

    # the control: the same peft prefix tuning without the pass's patch hands the head something else (the cache)
    plain_base, _, _ = load_model_and_tokenizer(str(tiny_checkpoint("roberta")), task)
    plain = peft.get_peft_model(plain_base, peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3))
    unpatched_input = []
    hook = plain_base.classifier.register_forward_pre_hook(lambda m, args: unpatched_input.append(args[0]))
    try:
        _logits(plain, tokenizer, task, arch, examples)
    except Exception:  # the head fails on a cache object; what matters is what it was given
        pass
    finally:
        hook.remove()
    assert len(unpatched_input) == 1 and not isinstance(unpatched_input[0], torch.Tensor), type(unpatched_input[0])


def test_prompt_tuning_density_excludes_padding(tiny_checkpoint, tiny_data, tmp_path):
    """With virtual tokens prepended, masked density must still drop padding (and count the virtual tokens)."""
    report, _ = _run_deft(tiny_checkpoint, tiny_data, tmp_path, "t5_relu", "t5_prompt_density", method="prompt")
    masked = report.steps[1].density
    real_tokens = masked["counted_positions"]["encoder"]
    from deftcompress.data.tasks import get_task, load_examples
    from deftcompress.data.text_to_text import t5_source
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_checkpoint("t5_relu"))
    examples = load_examples(get_task("glue/sst2"), "validation", tiny_data, 4)
    expected = sum(len(tok(t5_source(get_task("glue/sst2"), ex), truncation=True, max_length=128)["input_ids"]) + 3
                   for ex in examples)
    assert real_tokens == expected


# ---- validation ------------------------------------------------------------------------------

@pytest.mark.parametrize("deft, message", [
    ({"method": "prompt", "merge": True}, "merge: true needs lora"),
    ({"method": "adapter", "merge": True}, "merge: true needs lora"),
    ({"method": "prefix", "target_modules": ["query"]}, "target_modules applies to"),
    ({"method": "lora", "density_eps_start": 1e-9}, "density_eps_start must be larger"),
    ({"method": "dora"}, "expected one of"),
    ({"method": "lora", "density_warmup_ratio": 0.7, "density_ramp_ratio": 0.5}, "must be <= 1"),
    ({"method": "lora", "mlp_bias_lr": 0.1}, "train_mlp_bias is false"),
    ({"method": "lora", "density_loss": "l1"}, "expected one of"),
    ({"method": "lora", "r": 0}, r"r must be in \[1, 4096\]"),
    ({"method": "lora", "learning_rte": 0.1}, "unknown option"),
])
def test_bad_configs_are_rejected_before_loading(tiny_checkpoint, tiny_data, deft, message):
    with pytest.raises(RecipeError, match=message) as info:
        Recipe.build(model=str(tiny_checkpoint("bert")), data_dir=str(tiny_data), passes=[{"deft": deft}])
    assert "\n" not in str(info.value) and "passes[0].deft" in str(info.value)


def test_second_peft_pass_needs_the_first_merged(tiny_checkpoint, tiny_data):
    with pytest.raises(RecipeError, match="set merge: true there"):
        Recipe.build(model=str(tiny_checkpoint("bert")), data_dir=str(tiny_data),
                     passes=[{"deft": {"method": "prefix"}}, {"deft": {"method": "lora"}}])
    Recipe.build(model=str(tiny_checkpoint("bert")), data_dir=str(tiny_data),
                 passes=[{"deft": {"method": "lora", "merge": True}}, {"deft": {"method": "lora"}}])


def test_shipped_recipes_validate_and_passes_lists_deft():
    names = ("peft_lora_sst2.yaml", "deft_lora_sst2.yaml", "deft_adapter_sst2.yaml", "deft_prefix_sst2.yaml",
             "deft_qlora_sst2.yaml", "deft_t5_squad.yaml", "relufy_then_deft.yaml")
    recipes = [str(REPO / "recipes" / n) for n in names]
    env = {**os.environ, "DEFTCOMPRESS_DATA_DIR": os.environ.get("DEFTCOMPRESS_DATA_DIR", str(REPO.parent / "shared" / "data"))}
    # the T5 recipe names a hub model: validation resolves hub ids without downloading
    done = subprocess.run([sys.executable, "-m", "deftcompress.cli", "validate", *recipes], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    listed = subprocess.run([sys.executable, "-m", "deftcompress.cli", "passes"], capture_output=True, text=True)
    assert "deft:" in listed.stdout and "density_weight" in listed.stdout and "0 = plain PEFT" in listed.stdout


# ---- bitsandbytes helpers --------------------------------------------------------------------

@pytest.mark.parametrize("bits", (4, 8))
def test_quantize_linear_layers_in_place_and_back(pipeline_state, bits):
    from deftcompress.quantization.bnb import dequantize_linear_layers, is_bnb_linear, quantize_linear_layers

    state = pipeline_state("bert")
    batch = _probe_batch(state, 4)
    model = state.model.eval()
    with torch.no_grad():
        ref = model(**batch.inputs).logits
    summary = quantize_linear_layers(model, bits=bits)
    assert summary.skipped == ["bert.pooler.dense", "classifier"] or set(summary.skipped) == {"bert.pooler.dense", "classifier"}
    assert is_bnb_linear(model.bert.encoder.layer[0].intermediate.dense) and type(model.classifier) is nn.Linear
    assert summary.weight_bytes_after < summary.weight_bytes_before / (3 if bits == 4 else 2)
    with torch.no_grad():
        quant = model(**batch.inputs).logits
    torch.testing.assert_close(quant, ref, atol=5e-3, rtol=0.05)
    assert dequantize_linear_layers(model) == len(summary.converted)
    with torch.no_grad():
        back = model(**batch.inputs).logits
    torch.testing.assert_close(back, quant, atol=1e-5, rtol=1e-4)  # the float layers compute what the quantized did


def test_t5_keeps_wo_in_float_and_peft_wrapped_models_are_refused(pipeline_state):
    from deftcompress.quantization.bnb import QuantizationError, quantize_linear_layers

    state = pipeline_state("t5_gated")
    summary = quantize_linear_layers(state.model, bits=4)
    assert any(n.endswith("DenseReluDense.wo") for n in summary.skipped) and "lm_head" in summary.skipped
    bert = pipeline_state("bert")
    with pytest.raises(QuantizationError, match="before wrapping"):
        quantize_linear_layers(_wrap(bert, "lora"), bits=4)


# ---- several processes -----------------------------------------------------------------------

@pytest.mark.slow
def test_two_process_run_writes_one_report(tiny_checkpoint, tiny_data, tmp_path):
    recipe = tmp_path / "ddp.yaml"
    recipe.write_text(json.dumps({
        "name": "ddp", "model": str(tiny_checkpoint("bert")), "task": "glue/sst2", "data_dir": str(tiny_data),
        "max_eval_samples": 4, "eval_batch_size": 8,
        "passes": [{"deft": {"method": "lora", "max_steps": 3, "batch_size": 4, "max_train_samples": 16, "r": 2}}],
    }))  # JSON is YAML
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "deftcompress.cli", "apply", str(recipe), "-o", str(out), "--quiet"],
                          capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    details = report["steps"][1]["details"]
    assert details["world_size"] == 2 and details["steps"] == 3
    assert report["environment"]["world_size"] == 2
    assert done.stdout.count("per-layer density") == 1  # one table, from rank 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp.yaml", "out"]  # no temporary folders left behind
    assert (out / details["adapter_dir"] / "adapter_model.safetensors").is_file()


def test_lora_plus_trains_b_faster_than_a(tiny_checkpoint, tiny_data, tmp_path, one_thread):
    """LoRA+ (lora_plus_ratio): B's learning rate is the ratio times A's. Adam's first steps move each weight by
    about its learning rate, so B (which starts at zero) ends far larger; A moves as without LoRA+."""
    from safetensors.torch import load_file

    from deftcompress import Recipe, run_recipe

    def norms(name, **extra):
        recipe = Recipe.build(name=name, model=str(tiny_checkpoint("bert")), task="glue/sst2", data_dir=str(tiny_data),
                              max_eval_samples=8, passes=[{"deft": {"method": "lora", "r": 2, "max_steps": 3,
                                                                    "batch_size": 8, "max_train_samples": 24,
                                                                    "density_weight": 0.0, "save_steps": None,
                                                                    "warmup_ratio": 0.0, **extra}}])
        run_recipe(recipe, output_dir=tmp_path / name, quiet=True)
        weights = load_file(str(tmp_path / name / "passes" / "01_deft" / "adapter" / "adapter_model.safetensors"))
        a = sum(float(w.norm()) for k, w in weights.items() if "lora_A" in k)
        b = sum(float(w.norm()) for k, w in weights.items() if "lora_B" in k)
        return a, b

    a_plain, b_plain = norms("plain")
    a_plus, b_plus = norms("plus", lora_plus_ratio=16.0)
    assert b_plus > 8 * b_plain
    assert a_plus == pytest.approx(a_plain, rel=0.2)


def test_lora_plus_is_for_lora(tiny_checkpoint, tiny_data):
    from deftcompress import Recipe
    from deftcompress.errors import RecipeError

    with pytest.raises(RecipeError, match="lora_plus_ratio applies to lora and qlora"):
        Recipe.build(model=str(tiny_checkpoint("bert")), data_dir=str(tiny_data),
                     passes=[{"deft": {"method": "adapter", "lora_plus_ratio": 16}}])
