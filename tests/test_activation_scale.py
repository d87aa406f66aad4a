"""Activation scales: exact while attached, exact after folding, and they let DEFT reach exact zeros."""

import json

import pytest
import torch

from conftest import assert_measured_again_alike, build_tiny_model, resume_after_boom
from deftcompress import Recipe, run_recipe
from deftcompress.training.activation_scale import ActivationScales
from deftcompress.architecture import mlp_blocks


def _inputs(family):
    torch.manual_seed(1)
    return {"input_ids": torch.randint(5, 1000, (3, 9)), "attention_mask": torch.ones(3, 9, dtype=torch.long)}


@pytest.mark.parametrize("family, lora", [("bert", False), ("bert", True), ("llama", False), ("t5_gated", False)])
def test_scales_are_a_reparametrisation_and_fold_exactly(family, lora):
    model, _ = build_tiny_model(family)
    if lora:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["query", "value", "intermediate.dense"],
                                                           init_lora_weights=False))
    model.eval()
    inputs = _inputs(family)
    if family.startswith("t5"):
        inputs["decoder_input_ids"] = torch.zeros(3, 2, dtype=torch.long)
    with torch.no_grad():
        reference = model(**inputs).logits
        scales = ActivationScales(mlp_blocks(model))
        for rho in scales.rho:
            rho.uniform_(0.0, 1.0)  # s in [1, e]
        scales.attach()
        # ReLU-like models (T5 here is gated-GELU) change with s, so only compare where the identity must hold
        with_hooks = model(**inputs).logits
        stats = scales.fold(model)
        folded = model(**inputs).logits
    assert stats["neurons"] == sum(b.down.in_features for b in mlp_blocks(model))
    torch.testing.assert_close(folded, with_hooks, rtol=1e-4, atol=1e-5)
    # the scales really changed the function (GELU/SiLU are not scale-equivariant), so the test can fail
    assert not torch.allclose(with_hooks, reference, atol=1e-6)


@pytest.mark.parametrize("masked", [False, True])
def test_scale_only_density_loss_is_the_preact_term_with_gradient_to_the_scales_only(masked):
    """The fused path equals sigmoid((z - theta)/T) on z.detach() * s/s.detach(): same value, same scale gradient."""
    from deftcompress.training.density_loss import DensityLoss
    from deftcompress.training.options import DensityOptions

    model, _ = build_tiny_model("bert")
    blocks = mlp_blocks(model)
    scales = ActivationScales(blocks)
    with torch.no_grad():
        for rho in scales.rho:
            rho.uniform_(0.0, 3.0)
    scales.attach()
    inputs = _inputs("bert")
    mask = torch.ones(3, 9)
    if masked:
        mask[0, 5:] = 0
        mask[2, 2:] = 0
    settings = DensityOptions(preact_temperature=0.7, density_target=None, density_ramp_ratio=0.0).density_loss_settings("masked")
    loss = DensityLoss(blocks, settings)
    loss.scale_only = scales.scale_of
    seen = []
    hooks = [b.act.register_forward_hook(lambda m, i, o: seen.append(i[0])) for b in blocks]
    with loss:
        loss.begin_step({"encoder": mask}, step=0, total_steps=1)
        model(**inputs)
        fused, _ = loss.end_step()
    for h in hooks:
        h.remove()
    fused.backward()
    fused_grads = [r.grad.clone() for r in scales.rho]
    assert blocks[0].up.weight.grad is None  # the density gradient reached no weight
    for r in scales.rho:
        r.grad = None
    reference = 0.0
    for i, (b, z) in enumerate(zip(blocks, seen)):
        s = scales.scale_of(b)
        routed = z.detach() * (s / s.detach())
        per_position = torch.sigmoid((routed - loss.thresholds[i]) / 0.7).mean(-1)
        reference = reference + (per_position * mask).sum() / mask.sum() / len(blocks)
    reference.backward()
    torch.testing.assert_close(fused.detach(), reference.detach())
    for got, want in zip(fused_grads, (r.grad for r in scales.rho)):
        assert want.abs().sum() > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_deft_with_scales_cuts_density_and_saves_a_plain_checkpoint(tiny_checkpoint, tiny_data, tmp_path, method):
    """QLoRA too: its 4-bit weights cannot hold the scales, so they stay beside the activation (fold: module)
    while training and evaluating on the 4-bit base; the saved float model takes them into its weights."""
    from deftcompress.models.loading import load_model_and_tokenizer
    from deftcompress.measurement.evaluation import evaluate
    from deftcompress.data.tasks import get_task, load_examples

    deft = {"method": method, "r": 4, "density_loss": "preact", "density_target": 0.3, "density_ramp_ratio": 0.3,
            "activation_scale_min": 1000.0, "max_steps": 10, "batch_size": 16, "learning_rate": 5e-3}
    recipe = Recipe.build(name="scales", model=str(tiny_checkpoint("bert")), data_dir=str(tiny_data), eval_batch_size=8,
                          passes=[{"deft": deft}])
    out = tmp_path / "run"
    report = run_recipe(recipe, output_dir=out, quiet=True)
    base, final = report.steps
    details = final.details
    # tiny random models have tiny pre-activations: a floor of 1000 makes the mechanism visible in a few steps
    assert details["activation_scales"]["median"] >= 1000.0
    assert details["activation_scales"]["fold"] == {"lora": "weights", "qlora": "module"}[method]
    assert final.density["encoder"] < base.density["encoder"] - 0.2
    assert (out / "passes" / "01_deft" / "adapter" / "activation_scales.safetensors").is_file()
    # the saved model is a plain checkpoint that reproduces the final measurement
    model, tok, arch = load_model_and_tokenizer(str(out / "model"), get_task("glue/sst2"))
    again = evaluate(model, tok, get_task("glue/sst2"), load_examples(get_task("glue/sst2"), "validation", tiny_data), arch,
                     progress=False)
    assert again.task_score == final.task_score
    # LoRA's final model is the folded one itself. QLoRA's final measurement ran on the 4-bit base with the scales as
    # a module; the saved float model has them folded into dequantized weights: equal up to rounding, so an activation
    # that sits at the exact-zero point can land on either side (one of ~40,000 flipped in a CI run: 3e-5)
    tolerance = {"lora": 1e-6, "qlora": 1e-4}[method]
    assert again.density.encoder == pytest.approx(final.density["encoder"], abs=tolerance)
    assert not any("activation_scales" in k for k in json.loads((out / "model" / "config.json").read_text()))


def _large_scales(model):
    """Scales like DEFT's: half the neurons at s = 1000, the rest at 1 (what folding into int8 weights cannot hold)."""
    scales = ActivationScales(mlp_blocks(model))
    with torch.no_grad():
        for rho in scales.rho:
            rho.zero_()
            rho[::2] = torch.log(torch.tensor(1000.0))
    return scales


def test_int8_keeps_predictions_when_1_over_s_stays_after_the_activation():
    """Folded into the weights, scales of 1000 wreck dynamic int8; kept after the activation, int8 tracks fp32."""
    import copy

    from deftcompress.quantization.torch_int8 import quantize_dynamic_
    from deftcompress.architecture.activation_scale import ScaledActivation

    base, _ = build_tiny_model("bert")
    base.eval()
    torch.manual_seed(0)
    inputs = {"input_ids": torch.randint(5, 1000, (16, 12)), "attention_mask": torch.ones(16, 12, dtype=torch.long)}
    errors = {}
    for separate in (False, True):
        model = copy.deepcopy(base)
        scales = _large_scales(model)
        scales.fold(model, "activation" if separate else "weights")
        assert any(isinstance(m, ScaledActivation) for m in model.modules()) == separate
        with torch.no_grad():  # the encoder's output: what the MLPs feed (the random head would blur it)
            fp32 = model(**inputs, output_hidden_states=True).hidden_states[-1]
            names = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear and "classifier" not in n]
            int8 = quantize_dynamic_(model, names, per_channel=True)(**inputs, output_hidden_states=True).hidden_states[-1]
        errors[separate] = float((int8 - fp32).abs().max() / fp32.abs().max())
    # measured: about 0.0004 kept apart against 0.02 folded (relative to the largest hidden value)
    assert errors[True] < 0.005 and errors[True] * 10 < errors[False], errors


def test_deft_with_separate_scales_saves_reloads_and_quantizes(tiny_checkpoint, tiny_data, tmp_path):
    from deftcompress.models.formats import load_model
    from deftcompress.architecture.activation_scale import ScaledActivation

    recipe = Recipe.build(name="sep", model=str(tiny_checkpoint("bert")), data_dir=str(tiny_data), max_eval_samples=8,
                          passes=[{"deft": {"max_steps": 3, "batch_size": 8, "max_train_samples": 24, "merge": True,
                                            "activation_scale_fold": "activation"}},
                                  {"quantize": {"backend": "torch_int8"}}])
    report = run_recipe(recipe, output_dir=tmp_path / "run", quiet=True)
    assert report.steps[1].details["activation_scales"]["fold"] == "activation"
    assert report.steps[2].details["weights"].startswith("int8, per output channel")
    assert report.final["saved_model_format"] == "torch_int8"
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert config["deftcompress_activation_scales"]["layers"] == ["encoder.0", "encoder.1"]
    reloaded, tokenizer, _ = load_model(tmp_path / "run" / "model")
    assert sum(isinstance(m, ScaledActivation) for m in reloaded.modules()) == 2
    again = run_recipe(Recipe.build(name="again", model=str(tmp_path / "run" / "model"), data_dir=str(tiny_data),
                                    max_eval_samples=8, passes=[{"evaluate": {}}]), output_dir=tmp_path / "again",
                       quiet=True)
    assert again.steps[0].task_score == report.steps[2].task_score
    assert again.steps[0].density == report.steps[2].density


def test_qlora_scales_survive_the_saved_state_a_resumed_run_starts_from(tiny_checkpoint, tiny_data, tmp_path,
                                                                        fails_once):
    """The state after a QLoRA-DEFT pass (4-bit base + act(s x)/s + adapter) reloads to the same numbers."""
    deft = {"method": "qlora", "r": 4, "density_target": 0.3, "density_ramp_ratio": 0.3, "activation_scale_min": 1000.0,
            "max_steps": 4, "batch_size": 16, "learning_rate": 5e-3}
    recipe = Recipe.build(name="q", model=str(tiny_checkpoint("bert")), data_dir=str(tiny_data), eval_batch_size=8,
                          passes=[{"deft": deft}, "test_fails_once",
                                  {"evaluate": {"density_tau": 0.02}}])  # another tau: measured again, not reused
    report = resume_after_boom(recipe, tmp_path / "out", fails_once, at=2)
    trained, evaluated = report.steps[1], report.steps[3]
    assert trained.details["activation_scales"]["fold"] == "module"
    assert_measured_again_alike(trained, evaluated)
    assert trained.density["encoder"] < report.steps[0].density["encoder"] - 0.2  # the scales are really there
