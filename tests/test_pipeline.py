"""End to end: recipe -> pipeline -> report.json / report.md / model on tiny models of each family."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deftcompress import Recipe, RecipeError, run_recipe
from deftcompress.core.config import PassConfig
from deftcompress.core.registry import Pass, _REGISTRY, register_pass
from deftcompress.reporting.report import Report

REQUIRED_STEP_KEYS = {"pass", "task_metric", "task_score", "density", "params", "nonzero_params", "size_bytes", "seconds",
                      "latency_ms_per_example"}


def run(tiny_checkpoint, tiny_data, tmp_path, family="bert", task="glue/sst2", passes=("evaluate",), **kw):
    recipe = Recipe.build(name=f"t_{family}", model=str(tiny_checkpoint(family)), task=task, data_dir=str(tiny_data),
                          passes=list(passes), eval_batch_size=8, **kw)
    out = tmp_path / f"run_{family}"
    return run_recipe(recipe, output_dir=out, quiet=True), out


def test_bert_run_writes_contract_outputs(tiny_checkpoint, tiny_data, tmp_path):
    report, out = run(tiny_checkpoint, tiny_data, tmp_path)
    data = json.loads((out / "report.json").read_text())
    assert [s["pass"] for s in data["steps"]] == ["baseline", "evaluate"]
    for step in data["steps"] + [data["final"]]:
        assert REQUIRED_STEP_KEYS <= set(step)
        assert set(step["density"]) >= {"encoder", "decoder", "per_layer", "mode"}
        assert step["density"]["decoder"] is None and step["density"]["mode"] == "masked"
        assert len(step["density"]["per_layer"]) == 2
        assert step["task_metric"] == "accuracy"
    assert data["final"]["saved_model_bytes"] > 0
    # the evaluate step reused the baseline measurement (model unchanged): same numbers, nothing re-run
    assert data["steps"][1]["density"] == data["steps"][0]["density"]
    assert "reused" in data["steps"][1]["details"]["evaluation"]
    assert (out / "report.md").read_text().startswith("# t_bert")
    assert (out / "recipe.resolved.yaml").is_file() and (out / "density.png").is_file()
    # model saved with safetensors and reloads to the same weights
    weights = load_file(out / "model" / "model.safetensors")
    from transformers import AutoModelForSequenceClassification
    reloaded = AutoModelForSequenceClassification.from_pretrained(out / "model")
    assert torch.equal(reloaded.classifier.weight, weights["classifier.weight"])
    # parameter counts are real: the tiny BERT has no zero weights except what init put there
    params = sum(p.numel() for p in reloaded.parameters())
    assert data["final"]["params"] == params and data["final"]["nonzero_params"] <= params
    assert not list(tmp_path.glob(".run_bert.tmp-*"))


def test_density_matches_a_manual_count(tiny_checkpoint, tiny_data, tmp_path):
    """The pipeline's masked density equals an independent count with plain hooks on the real tokens."""
    from deftcompress.models.loading import load_model_and_tokenizer
    from deftcompress.data.tasks import get_task, load_examples

    report, _ = run(tiny_checkpoint, tiny_data, tmp_path, max_eval_samples=10)
    model, tok, _ = load_model_and_tokenizer(str(tiny_checkpoint("bert")), get_task("glue/sst2"))
    model.eval()
    nonzero = total = 0
    for ex in load_examples(get_task("glue/sst2"), "validation", tiny_data, max_samples=10):
        acts = []
        hooks = [layer.intermediate.intermediate_act_fn.register_forward_hook(lambda m, i, o: acts.append(o))
                 for layer in model.bert.encoder.layer]
        with torch.no_grad():
            model(**tok(ex["text_a"], return_tensors="pt"))  # one sentence: no padding at all
        for h in hooks:
            h.remove()
        nonzero += sum(int((a != 0).sum()) for a in acts)
        total += sum(a.numel() for a in acts)
    assert report.steps[0].density["encoder"] == pytest.approx(nonzero / total)


def test_paper_mode_counts_padding(tiny_checkpoint, tiny_data, tmp_path):
    masked, _ = run(tiny_checkpoint, tiny_data, tmp_path, passes=[{"evaluate": {"density_mode": "paper"}}], max_seq_length=32)
    base, paper = masked.steps
    assert paper.density["mode"] == "paper"
    n = base.eval_examples
    assert paper.density["counted_positions"]["encoder"] == n * 32
    assert base.density["counted_positions"]["encoder"] < n * 32
    assert paper.task_score == base.task_score  # padding must not change predictions


@pytest.mark.parametrize("family", ["t5_relu", "t5_gated"])
def test_t5_reports_encoder_and_decoder_density(tiny_checkpoint, tiny_data, tmp_path, family):
    report, _ = run(tiny_checkpoint, tiny_data, tmp_path, family=family, task="squad", max_eval_samples=6)
    step = report.steps[-1]
    assert step.task_metric == "f1" and "exact_match" in step.metrics
    d = step.density
    assert 0 < d["encoder"] <= 1 and 0 < d["decoder"] <= 1
    assert {l["stack"] for l in d["per_layer"]} == {"encoder", "decoder"}
    if family == "t5_relu":  # ReLU of random pre-activations: about half are exact zeros
        assert 0.2 < d["encoder"] < 0.8


def test_t5_glue_text_to_text(tiny_checkpoint, tiny_data, tmp_path):
    report, _ = run(tiny_checkpoint, tiny_data, tmp_path, family="t5_relu", task="glue/sst2", max_eval_samples=6)
    assert report.steps[-1].task_metric == "accuracy" and report.steps[-1].density["decoder"] is not None


def test_llama_classifies_glue(tiny_checkpoint, tiny_data, tmp_path):
    report, _ = run(tiny_checkpoint, tiny_data, tmp_path, family="llama", task="glue/mrpc")
    step = report.steps[-1]
    assert step.task_metric == "f1" and step.density["encoder"] is None and step.density["decoder"] > 0.9


def test_roberta_regression(tiny_checkpoint, tiny_data, tmp_path):
    report, _ = run(tiny_checkpoint, tiny_data, tmp_path, family="roberta", task="glue/stsb")
    assert report.steps[-1].task_metric == "pearson"


class _BoomConfig(PassConfig):
    pass


def test_failed_run_keeps_the_old_outputs(tiny_checkpoint, tiny_data, tmp_path):
    @register_pass
    class Boom(Pass):
        name = "test_boom"

        def run(self, state):
            (state.work_dir / "partial.txt").write_text("half")
            raise RuntimeError("boom")

    try:
        _, out = run(tiny_checkpoint, tiny_data, tmp_path)
        before = (out / "report.json").read_text()
        with pytest.raises(RuntimeError, match="boom"):
            run(tiny_checkpoint, tiny_data, tmp_path, passes=["test_boom"])
        assert (out / "report.json").read_text() == before
        assert not (out / "partial.txt").exists()
        assert [p.name for p in tmp_path.iterdir()] == ["run_bert"]
    finally:
        _REGISTRY.pop("test_boom", None)


def test_report_command_prints_table(tiny_checkpoint, tiny_data, tmp_path):
    from click.testing import CliRunner
    from deftcompress.cli import main

    _, out = run(tiny_checkpoint, tiny_data, tmp_path)
    result = CliRunner().invoke(main, ["report", str(out)])
    assert result.exit_code == 0 and "baseline" in result.output and "encoder.1" in result.output
    assert Report.load(out).steps[0].pass_name == "baseline"


@pytest.mark.slow
def test_real_minilm_on_a_few_sst2_rows(tmp_path):
    from conftest import SHARED_DATA

    if not (SHARED_DATA / "glue" / "sst2").is_dir():
        pytest.skip("shared data not present")
    env = {**os.environ, "DEFTCOMPRESS_DATA_DIR": str(SHARED_DATA)}
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: real\nmodel: minilm\ntask: glue/sst2\nmax_eval_samples: 16\npasses:\n  - evaluate: {}\n")
    proc = subprocess.run(["deftcompress", "apply", str(recipe), "-o", str(tmp_path / "out"), "--quiet"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "encoder.5" in proc.stdout and "accuracy" in proc.stdout
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    final = data["final"]
    assert final["eval_examples"] == 16 and len(final["density"]["per_layer"]) == 6
    assert 22_000_000 < final["params"] < 23_000_000
    # GELU outputs of the pretrained model are almost never exactly zero
    assert 0.99 < final["density"]["encoder"] <= 1.0
    assert final["density"]["encoder_above_tau"] < final["density"]["encoder"]


@pytest.mark.slow
def test_example_script_runs(tmp_path):
    from conftest import SHARED_DATA

    if not (SHARED_DATA / "glue" / "sst2").is_dir():
        pytest.skip("shared data not present")
    script = Path(__file__).resolve().parents[1] / "examples" / "evaluate_minilm.py"
    proc = subprocess.run([sys.executable, str(script), "--rows", "8", "--output-dir", str(tmp_path / "ex")],
                          capture_output=True, text=True, env={**os.environ, "DEFTCOMPRESS_DATA_DIR": str(SHARED_DATA)})
    assert proc.returncode == 0, proc.stderr
    assert "density=" in proc.stdout and (tmp_path / "ex" / "report.json").is_file()
