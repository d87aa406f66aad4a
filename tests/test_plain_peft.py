"""A DEFT adapter reloads with plain peft (no deftcompress import) onto the original checkpoint, to the run's logits."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from deftcompress import Recipe, run_recipe

# Run in a fresh interpreter: what a user without deftcompress would type.
PLAIN = textwrap.dedent("""
    import json, sys
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    checkpoint, adapter, inputs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    base = AutoModelForSequenceClassification.from_pretrained(checkpoint, num_labels=2)
    model = PeftModel.from_pretrained(base, adapter).eval()
    with torch.no_grad():
        out = model(input_ids=torch.tensor(inputs), attention_mask=torch.ones(len(inputs), len(inputs[0]), dtype=torch.long),
                    output_hidden_states=True)
    assert not any(m.startswith("deftcompress") for m in sys.modules)
    print(json.dumps([out.logits.tolist(), out.hidden_states[-1].tolist()]))
""")


def _plain_outputs(checkpoint, adapter, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, last hidden states) from plain peft in a fresh interpreter."""
    proc = subprocess.run([sys.executable, "-c", PLAIN, str(checkpoint), str(adapter), json.dumps(inputs)],
                          capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    logits, hidden = json.loads(proc.stdout.strip().splitlines()[-1])
    return torch.tensor(logits), torch.tensor(hidden)


@pytest.mark.parametrize("method, extra", [
    ("lora", {}),
    ("lora", {"target_mlp_up": True, "train_mlp_bias": True, "mlp_bias_lr": 0.05}),  # LoRA on a layer that travels whole
    ("prompt", {}),
    ("lora", {"activation_scale": False}),  # base untouched: the library adapter is already plain
])
def test_plain_peft_reproduces_the_run(tiny_checkpoint, tiny_data, tmp_path, method, extra):
    from deftcompress.models.formats import load_model

    deft = {"method": method, "r": 2, "num_virtual_tokens": 3, "activation_scale_min": 1000.0, "density_target": 0.3,
            "density_ramp_ratio": 0.3, "max_steps": 4, "batch_size": 8, "max_train_samples": 32, "learning_rate": 1e-2,
            **extra}
    checkpoint = tiny_checkpoint("bert")
    recipe = Recipe.build(name="plain", model=str(checkpoint), data_dir=str(tiny_data), max_eval_samples=8,
                          eval_batch_size=8, passes=[{"deft": deft}])
    out = tmp_path / "run"
    report = run_recipe(recipe, output_dir=out, quiet=True)
    plain = report.steps[1].details["plain_peft"]
    assert plain["loads_onto"].startswith("the recipe's model")
    torch.manual_seed(3)
    inputs = torch.randint(5, 1000, (4, 11)).tolist()
    model, _, _ = load_model(out / "model")
    with torch.no_grad():
        ran = model(input_ids=torch.tensor(inputs), attention_mask=torch.ones(4, 11, dtype=torch.long),
                    output_hidden_states=True)
    logits, hidden = _plain_outputs(checkpoint, out / plain["dir"], inputs)
    torch.testing.assert_close(logits, ran.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(hidden, ran.hidden_states[-1], atol=1e-4, rtol=1e-4)
    folder = out / plain["dir"]
    for text in ((out / "report.md").read_text(), (out / "model" / "README.md").read_text()):
        assert f'PeftModel.from_pretrained(base, "{plain["dir"]}")' in text
    assert plain["bytes"] == sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    library_adapter = out / report.steps[1].details["adapter_dir"]
    if extra.get("activation_scale") is False:
        assert folder == library_adapter  # nothing changed in the base: the adapter itself is plain
        return
    assert plain["modules_to_save"] == 4  # up and down of both tiny layers
    # the library adapter alone would not reproduce the run (it needs the scales first): plain peft refuses it
    # loudly instead of computing something else, and its README says what to load
    proc = subprocess.run([sys.executable, "-c", PLAIN, str(checkpoint), str(library_adapter), json.dumps(inputs)],
                          capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert proc.returncode != 0 and "adapter_config.json" in proc.stderr
    assert "adapter_plain_peft" in (library_adapter / "README.md").read_text()


def test_no_plain_form_where_peft_cannot_hold_it(tiny_checkpoint, tiny_data, tmp_path):
    """QLoRA's scales sit beside 4-bit activations: the report says why, and model/ is a stock checkpoint."""
    recipe = Recipe.build(name="q", model=str(tiny_checkpoint("bert")), data_dir=str(tiny_data), max_eval_samples=8,
                          passes=[{"deft": {"method": "qlora", "r": 2, "max_steps": 2, "batch_size": 8,
                                            "max_train_samples": 16}}])
    report = run_recipe(recipe, output_dir=tmp_path / "run", quiet=True)
    plain = report.steps[1].details["plain_peft"]
    assert plain["dir"] is None and "4-bit" in plain["why_not"]
    assert "with plain peft: not possible" in (tmp_path / "run" / "report.md").read_text()
    assert not (tmp_path / "run" / "passes" / "01_deft" / "adapter_plain_peft").exists()
