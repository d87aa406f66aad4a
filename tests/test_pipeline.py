"""End to end: recipe -> pipeline -> report.json / report.md / model on tiny models of each family."""

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deftcompress import Recipe, run_recipe
from deftcompress.architecture import mlp_blocks
from deftcompress.core.config import PassConfig
from deftcompress.core.registry import Pass, register_pass, unregister_pass
from deftcompress.data.features import encode_inputs, pad_inputs, target_batch
from deftcompress.data.metrics import squad_metrics
from deftcompress.data.tasks import get_task, load_examples
from deftcompress.data.text_to_text import max_answer_tokens
from deftcompress.models.loading import load_model_and_tokenizer
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


# ---- independent checks: plain hooks and hand-computed metrics on the same rows ----------------------------

@contextmanager
def counting_activations(model, arch):
    """Plain forward hooks on every MLP activation module: {(stack, layer): [nonzero, values, positions]}."""
    counts: dict[tuple[str, int], list[int]] = {}

    def hook_for(key):
        def hook(module, inputs, output):
            c = counts.setdefault(key, [0, 0, 0])
            c[0] += int((output != 0).sum())
            c[1] += output.numel()
            c[2] += output.numel() // output.shape[-1]

        return hook

    handles = [b.act.register_forward_hook(hook_for((b.stack, b.index))) for b in mlp_blocks(model, arch)]
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


def one_row(tokenizer, task, arch, ex) -> dict[str, torch.Tensor]:
    """Model inputs of a single example: nothing to pad, so every position is a real token."""
    inputs = pad_inputs(tokenizer, encode_inputs(tokenizer, task, arch, [ex]))
    assert bool(inputs["attention_mask"].all())
    return inputs


def assert_density_matches_counts(density, counts, stacks, layers_per_stack=2, width=64):
    """The reported density equals the hook counts: per layer (the exact layers, in order), per stack, positions."""
    expected_layers = [(stack, i) for stack in stacks for i in range(layers_per_stack)]
    assert [(l["stack"], l["layer"]) for l in density["per_layer"]] == expected_layers
    assert sorted(counts) == sorted(expected_layers)
    for l in density["per_layer"]:
        nonzero, values, positions = counts[(l["stack"], l["layer"])]
        assert values == positions * width and l["width"] == width
        assert l["density"] == pytest.approx(nonzero / values), (l["stack"], l["layer"])
    for stack in ("encoder", "decoder"):
        if stack not in stacks:
            assert density[stack] is None
            continue
        layers = [c for (s, _), c in counts.items() if s == stack]
        assert density[stack] == pytest.approx(sum(c[0] for c in layers) / sum(c[1] for c in layers)), stack
        assert {c[2] for c in layers} == {density["counted_positions"][stack]}, stack  # every layer sees every token
    assert set(density["counted_positions"]) == set(stacks)


def t5_by_hand(model_ref, tiny_data, task_name, rows, max_target_length=32):
    """Hook counts over the real tokens (encoder: the source; decoder: the teacher-forced label tokens) and the
    greedy generations, one example at a time."""
    task = get_task(task_name)
    model, tok, arch = load_model_and_tokenizer(model_ref, task)
    model.eval()
    examples = load_examples(task, "validation", tiny_data, max_samples=rows)
    texts = []
    with counting_activations(model, arch) as counts:
        for ex in examples:
            inputs = one_row(tok, task, arch, ex)
            labels, decoder_mask = target_batch(tok, task, [ex], max_target_length=max_target_length)
            assert bool(decoder_mask.all()) and bool((labels != -100).all())
            with torch.no_grad():
                model(**inputs, labels=labels, decoder_attention_mask=decoder_mask)
    for ex in examples:  # generation is not counted (outside the hooks)
        inputs = one_row(tok, task, arch, ex)
        with torch.no_grad():
            generated = model.generate(**inputs, max_new_tokens=max_answer_tokens(tok, task, max_target_length))
        texts.append(tok.decode(generated[0], skip_special_tokens=True).strip())
    return examples, counts, texts, tok


@pytest.mark.parametrize("family", ["t5_relu", "t5_gated"])
def test_t5_reports_encoder_and_decoder_density(tiny_checkpoint, tiny_data, tmp_path, family):
    report, _ = run(tiny_checkpoint, tiny_data, tmp_path, family=family, task="squad", max_eval_samples=6)
    step = report.steps[-1]
    assert step.task_metric == "f1" and set(step.metrics) == {"f1", "exact_match"} and step.eval_examples == 6
    d = step.density
    examples, counts, texts, tok = t5_by_hand(str(tiny_checkpoint(family)), tiny_data, "squad", 6)
    # encoder over the source tokens, decoder over the teacher-forced answer tokens, each stack on its own
    assert_density_matches_counts(d, counts, ("encoder", "decoder"))
    assert d["counted_positions"]["decoder"] == sum(len(tok(ex["label"])["input_ids"]) for ex in examples)
    if family == "t5_relu":  # ReLU of random pre-activations: about half are exact zeros
        assert 0.2 < d["encoder"] < 0.8 and 0.2 < d["decoder"] < 0.8
    else:  # gated GELU (tanh) is exactly zero only far in the tail: nearly every value counts
        assert d["encoder"] > 0.99 and d["decoder"] > 0.99
    # the score is the SQuAD metric of the model's own greedy answers
    expected = squad_metrics(texts, [ex["answers"] for ex in examples])
    assert step.metrics == pytest.approx(expected) and step.task_score == pytest.approx(expected["f1"])


def test_t5_glue_text_to_text(tiny_checkpoint, tiny_data, tmp_path):
    report, _ = run(tiny_checkpoint, tiny_data, tmp_path, family="t5_relu", task="glue/sst2", max_eval_samples=6)
    step = report.steps[-1]
    assert step.task_metric == "accuracy" and step.eval_examples == 6
    examples, counts, texts, tok = t5_by_hand(str(tiny_checkpoint("t5_relu")), tiny_data, "glue/sst2", 6)
    assert_density_matches_counts(step.density, counts, ("encoder", "decoder"))
    # the decoder counts the label word's tokens: "positive" / "negative" and the end token
    words = get_task("glue/sst2").label_names
    assert step.density["counted_positions"]["decoder"] == sum(len(tok(words[ex["label"]])["input_ids"]) for ex in examples)
    # accuracy: the generated word equals the label's word (anything else is wrong)
    correct = sum(text == words[ex["label"]] for text, ex in zip(texts, examples))
    assert step.task_score == pytest.approx(correct / len(examples)) and step.metrics == {"accuracy": step.task_score}


def _llama_with_a_row_dependent_head(tiny_checkpoint, tiny_data, folder: Path) -> Path:
    """The tiny llama's random head predicts class 0 for every MRPC row, so F1 is 0 whatever the pipeline computes.

    Replace the head by one that scores a direction of the pooled hidden states orthogonal to their mean: its
    logit difference sums to zero over the rows, so both classes are predicted and F1 tells right from wrong.
    """
    task = get_task("glue/mrpc")
    model, tok, arch = load_model_and_tokenizer(str(tiny_checkpoint("llama")), task)
    model.eval()
    pooled = []
    for ex in load_examples(task, "validation", tiny_data):
        inputs = one_row(tok, task, arch, ex)
        with torch.no_grad():
            hidden = model.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
        pooled.append(hidden[0, -1])  # no padding: the head reads the last token
    h = torch.stack(pooled)
    mean = h.mean(0)
    direction = torch.linalg.svd(h - mean, full_matrices=False).Vh[0]
    direction = direction - (direction @ mean) / (mean @ mean) * mean
    with torch.no_grad():
        model.score.weight.copy_(torch.stack([-direction, direction]))
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def test_llama_classifies_glue(tiny_checkpoint, tiny_data, tmp_path):
    ref = _llama_with_a_row_dependent_head(tiny_checkpoint, tiny_data, tmp_path / "llama_ckpt")
    recipe = Recipe.build(name="t_llama", model=str(ref), task="glue/mrpc", data_dir=str(tiny_data), passes=["evaluate"],
                          eval_batch_size=8)
    report = run_recipe(recipe, output_dir=tmp_path / "run_llama", quiet=True)
    step = report.steps[-1]
    assert step.task_metric == "f1" and step.eval_examples == 24

    task = get_task("glue/mrpc")
    model, tok, arch = load_model_and_tokenizer(str(ref), task)
    model.eval()
    examples = load_examples(task, "validation", tiny_data)
    preds = []
    with counting_activations(model, arch) as counts:
        for ex in examples:
            with torch.no_grad():
                preds.append(int(model(**one_row(tok, task, arch, ex)).logits[0].argmax()))
    labels = [ex["label"] for ex in examples]
    assert set(preds) == {0, 1} and set(labels) == {0, 1}  # otherwise the score below could not go wrong
    tp = sum(p == 1 and y == 1 for p, y in zip(preds, labels))
    fp = sum(p == 1 and y == 0 for p, y in zip(preds, labels))
    fn = sum(p == 0 and y == 1 for p, y in zip(preds, labels))
    assert tp > 0
    assert step.task_score == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert step.metrics["accuracy"] == pytest.approx(sum(p == y for p, y in zip(preds, labels)) / len(labels))
    # decoder-only: one stack, reported as "decoder"; SiLU is exactly zero only at 0, so the density is about 1
    assert_density_matches_counts(step.density, counts, ("decoder",))
    assert step.density["decoder"] > 0.9


def test_roberta_regression(tiny_checkpoint, tiny_data, tmp_path):
    report, out = run(tiny_checkpoint, tiny_data, tmp_path, family="roberta", task="glue/stsb")
    step = report.steps[-1]
    assert step.task_metric == "pearson" and set(step.metrics) == {"pearson", "spearmanr"} and step.eval_examples == 24
    # the saved model holds the regression head the run initialised (the checkpoint's head has 2 outputs)
    task = get_task("glue/stsb")
    model, tok, arch = load_model_and_tokenizer(str(out / "model"), task)
    assert model.config.num_labels == 1
    model.eval()
    examples = load_examples(task, "validation", tiny_data)
    outputs = []
    with counting_activations(model, arch) as counts:
        for ex in examples:
            with torch.no_grad():
                outputs.append(float(model(**one_row(tok, task, arch, ex)).logits[0, 0]))
    x = torch.tensor(outputs, dtype=torch.float64)
    y = torch.tensor([float(ex["label"]) for ex in examples], dtype=torch.float64)
    assert float(x.std()) > 0 and float(y.std()) > 0
    expected = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()).norm() * (y - y.mean()).norm()))
    # the random head's outputs spread over only ~1e-4, so batched vs one-row float noise moves pearson by ~1e-5
    assert step.task_score == pytest.approx(expected, abs=1e-3)
    assert abs(expected) > 0.05  # a score of 0 (e.g. constant predictions) would not pass by luck
    assert_density_matches_counts(step.density, counts, ("encoder",))


class _BoomConfig(PassConfig):
    pass


def test_a_failed_run_never_touches_another_run_and_keeps_its_finished_steps(tiny_checkpoint, tiny_data, tmp_path):
    @register_pass
    class Boom(Pass):
        name = "test_boom"

        def run(self, state):
            (state.pass_dir(self.name) / "partial.txt").write_text("half")
            raise RuntimeError("boom")

    from deftcompress.pipeline.run_folder import RunFolderError

    try:
        _, out = run(tiny_checkpoint, tiny_data, tmp_path)
        before = (out / "report.json").read_text()
        with pytest.raises(RunFolderError, match="another recipe"):  # the same folder: refused before anything runs
            run(tiny_checkpoint, tiny_data, tmp_path, passes=["evaluate", "test_boom"])
        assert (out / "report.json").read_text() == before
        recipe = Recipe.build(name="boom", model=str(tiny_checkpoint("bert")), data_dir=str(tiny_data),
                              passes=["evaluate", "test_boom"], eval_batch_size=8)
        with pytest.raises(RuntimeError, match="boom"):
            run_recipe(recipe, output_dir=tmp_path / "other", quiet=True)
        assert (out / "report.json").read_text() == before
        failed = json.loads((tmp_path / "other" / "report.json").read_text())
        assert failed["status"] == "failed" and [s["pass"] for s in failed["steps"]] == ["baseline", "evaluate"]
        # the failed pass's half-written folder is cleared when the run resumes, and the run fails again the same way
        assert (tmp_path / "other" / "passes" / "02_test_boom" / "partial.txt").is_file()
        with pytest.raises(RuntimeError, match="boom"):
            run_recipe(recipe, output_dir=tmp_path / "other", quiet=True)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "run_bert"]
    finally:
        unregister_pass("test_boom")


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
