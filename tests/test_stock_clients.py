"""Every model folder a run saves, opened by stock transformers: the same logits as deftcompress's own load,
or a loud error that names deftcompress. Never a model that quietly computes something else."""

from __future__ import annotations

import json

import pytest
import torch

from deftcompress import Recipe, run_recipe

TRAIN = {"method": "lora", "r": 2, "max_steps": 2, "batch_size": 8, "max_train_samples": 16, "merge": True}
CASES = {
    "deft_fold_weights": [{"deft": TRAIN}],
    "deft_fold_activation": [{"deft": {**TRAIN, "activation_scale_fold": "activation"}}],
    "structured_prune": [{"structured_prune": {"mlp_ratio": 0.5, "round_to": 8}}],
    "torch_int8": [{"deft": {**TRAIN, "activation_scale_fold": "activation"}}, {"quantize": {"backend": "torch_int8"}}],
    "shifted_relu": [{"relufy": {"activation": "shifted_relu", "threshold": 0.1}}],
    "plain_relu": [{"relufy": {"activation": "relu"}}],
}
STOCK_LOADS = {"deft_fold_weights", "plain_relu"}


def _logits(model, inputs):
    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor(inputs), attention_mask=torch.ones(len(inputs), len(inputs[0]),
                                                                                dtype=torch.long)).logits


@pytest.mark.parametrize("case", sorted(CASES))
def test_stock_transformers_reproduces_or_refuses(tiny_checkpoint, tiny_data, tmp_path, one_thread, case):
    from transformers import AutoModelForSequenceClassification

    from deftcompress.models.formats import load_model

    recipe = Recipe.build(name=case, model=str(tiny_checkpoint("bert")), data_dir=str(tiny_data), max_eval_samples=8,
                          eval_batch_size=8, latency_repeats=0, passes=CASES[case])
    out = tmp_path / "run"
    run_recipe(recipe, output_dir=out, quiet=True)
    model_dir = out / "model"
    manifest = json.loads((model_dir / "deftcompress_model.json").read_text())
    torch.manual_seed(1)
    inputs = torch.randint(5, 1000, (3, 9)).tolist()
    ours, _, _ = load_model(model_dir)
    if case in STOCK_LOADS:
        stock = AutoModelForSequenceClassification.from_pretrained(model_dir)
        torch.testing.assert_close(_logits(stock, inputs), _logits(ours, inputs), atol=1e-4, rtol=1e-4)
        assert manifest.get("stock_loading") != "refused"
    else:
        with pytest.raises((ValueError, KeyError, OSError)) as refused:
            AutoModelForSequenceClassification.from_pretrained(model_dir)
        assert "deftcompress" in str(refused.value)
        assert manifest["stock_loading"] == "refused" and "deftcompress.load_model" in manifest["load"]
        assert "deftcompress" in (model_dir / "README.md").read_text()
    torch.testing.assert_close(_logits(load_model(model_dir)[0], inputs), _logits(ours, inputs))  # reloads alike
