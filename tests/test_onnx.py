"""ONNX export and onnxruntime: round trips on tiny models of each family, density outputs, parity, ort_int8."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from deftcompress.core.config import parse_config
from deftcompress.pipeline.recipe import Recipe
from deftcompress.core.registry import get_pass
from deftcompress.errors import RecipeError
from deftcompress.pipeline.runner import run_recipe


def _run_pass(state, name, **config):
    cls = get_pass(name, "test")
    state.step_index += 1
    return cls(parse_config(cls.Config, config, "test")).run(state)


@pytest.mark.parametrize("family", ["bert", "roberta", "llama"])
def test_classifier_round_trip_with_density_outputs(tiny_checkpoint, tiny_data, tmp_path, family, one_thread):
    recipe = Recipe.build(name="x", model=str(tiny_checkpoint(family)), data_dir=str(tiny_data), eval_batch_size=8,
                          passes=[{"magnitude_prune": {"sparsity": 0.3}}, {"onnx_export": {"density_outputs": True}}])
    report = run_recipe(recipe, output_dir=tmp_path / "run", quiet=True)
    pruned, exported = report.steps[1], report.steps[2]
    parity = exported.details["parity"]
    assert parity["max_abs_logit_diff"] <= 1e-4 and parity["same_predictions"] == parity["rows"] == 24
    assert parity["nonzero_torch"] == parity["nonzero_onnxruntime"] and parity["max_density_diff"] == 0  # random weights
    # the step after the export is measured in onnxruntime: same score, and the graph's density equals the meter's
    assert exported.task_score == pruned.task_score and exported.details["runtime"].startswith("onnxruntime")
    stack = "decoder" if family == "llama" else "encoder"
    assert exported.density[stack] == pytest.approx(pruned.density[stack], abs=1e-12)
    assert [l["density"] for l in exported.density["per_layer"]] == \
        pytest.approx([l["density"] for l in pruned.density["per_layer"]], abs=1e-12)
    assert "Erf" in exported.details["activation_ops"] or family == "llama"  # exact GELU, not a tanh approximation

    # the folder loads in plain onnxruntime (no deftcompress) with any batch and sequence length
    folder = tmp_path / "run" / report.final["onnx"]["folder"]
    code = textwrap.dedent(f"""
        import sys, numpy as np, onnxruntime as ort
        s = ort.InferenceSession({str(folder / "model.onnx")!r}, providers=["CPUExecutionProvider"])
        for batch, length in ((1, 5), (3, 17)):
            ids = np.random.randint(1000, 2000, size=(batch, length)).astype(np.int64)
            feed = {{"input_ids": ids, "attention_mask": np.ones_like(ids)}}
            if "token_type_ids" in [i.name for i in s.get_inputs()]:
                feed["token_type_ids"] = np.zeros_like(ids)
            logits, nonzero, positions, density = s.run(None, feed)
            assert logits.shape[0] == batch and positions.tolist() == [batch * length] * len(positions), positions
        assert "deftcompress" not in sys.modules
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-1500:]

    # and in optimum's ORTModelForSequenceClassification
    from optimum.onnxruntime import ORTModelForSequenceClassification
    from transformers import AutoTokenizer

    ort_model = ORTModelForSequenceClassification.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    out = ort_model(**tokenizer(["a fine film", "a dull film indeed"], return_tensors="pt", padding=True))
    assert out.logits.shape == (2, 2)


def test_t5_exports_encoder_and_decoder_graphs(tiny_checkpoint, tiny_data, tmp_path, one_thread):
    recipe = Recipe.build(name="t5", model=str(tiny_checkpoint("t5_relu")), data_dir=str(tiny_data), eval_batch_size=8,
                          max_eval_samples=8, passes=[{"onnx_export": {}}])
    report = run_recipe(recipe, output_dir=tmp_path / "run", quiet=True)
    step = report.steps[1]
    assert {"encoder_model.onnx", "decoder_model.onnx"} <= set(step.details["files"])
    assert step.details["parity"]["max_abs_logit_diff"] <= 1e-4 and "Relu" in step.details["activation_ops"]
    assert step.task_score == report.steps[0].task_score and step.metrics == report.steps[0].metrics

    from optimum.onnxruntime import ORTModelForSeq2SeqLM

    folder = tmp_path / "run" / report.final["onnx"]["folder"]
    generated = ORTModelForSeq2SeqLM.from_pretrained(folder).generate(input_ids=torch.tensor([[100, 200, 1]]),
                                                                      max_new_tokens=3)
    assert generated.shape[0] == 1


def test_density_outputs_for_text_to_text_are_refused_clearly(pipeline_state):
    from deftcompress.export.onnx import ExportError

    with pytest.raises(ExportError, match="density_outputs is available for classifiers only, not text to text"):
        _run_pass(pipeline_state("t5_relu"), "onnx_export", density_outputs=True)


def test_a_corrupted_weight_fails_the_parity_check(pipeline_state, one_thread):
    import onnx
    from onnx import numpy_helper

    from deftcompress.passes.onnx_export import OnnxExportConfig, ParityError, parity_check

    state = pipeline_state("bert")
    _run_pass(state, "onnx_export", check=False)
    path = f"{state.onnx.folder}/model.onnx"
    model = onnx.load(path)
    target = max(model.graph.initializer, key=lambda t: np.prod(t.dims))  # the largest weight: the embeddings
    weights = numpy_helper.to_array(target).copy()
    weights *= 1.5  # a planted corruption
    target.CopyFrom(numpy_helper.from_array(weights, target.name))
    onnx.save(model, path)
    with pytest.raises(ParityError, match="does not match the PyTorch model.*largest logit difference"):
        parity_check(state, state.onnx, OnnxExportConfig())


def test_ort_int8_quantizes_the_graph_and_keeps_predictions_close(tiny_checkpoint, tiny_data, tmp_path, one_thread):
    recipe = Recipe.build(name="q", model=str(tiny_checkpoint("bert")), data_dir=str(tiny_data), eval_batch_size=8,
                          passes=[{"onnx_export": {"density_outputs": True}}, {"quantize": {"backend": "ort_int8"}}])
    report = run_recipe(recipe, output_dir=tmp_path / "run", quiet=True)
    fp32, int8 = report.steps[1], report.steps[2]
    assert int8.details["backend"] == "ort_int8" and int8.details["size_ratio"] < 0.5
    assert int8.size_bytes < 0.5 * fp32.size_bytes and report.final["onnx"]["quantized"] == "ort_int8"
    assert int8.details["runtime"].startswith("onnxruntime (int8")
    assert abs(int8.task_score - fp32.task_score) <= 2 / 24  # tiny random model: at most two of 24 rows flip
    assert int8.density["encoder"] is not None


@pytest.mark.parametrize("passes, message", [
    ([{"evaluate": {"runtime": "onnxruntime"}}], "runtime: onnxruntime evaluates an exported graph"),
    ([{"quantize": {}}, {"onnx_export": {}}], "cannot export after .*torch_int8"),
    ([{"deft": {}}, {"onnx_export": {}}], "set merge: true there"),
    ([{"onnx_export": {}}, {"onnx_export": {}}], "already exported"),
    ([{"onnx_export": {"opset": 9}}], r"opset must be in \[14, 21\]"),
])
def test_bad_export_plans_are_refused_before_loading(passes, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.build(model="minilm", passes=passes)


def test_the_export_survives_a_resume(pipeline_state, tmp_path):
    state = pipeline_state("bert")
    _run_pass(state, "onnx_export", density_outputs=True)
    state.save(tmp_path / "state")
    fresh = pipeline_state("bert")
    fresh.work_dir = state.work_dir
    fresh.restore(tmp_path / "state")
    assert fresh.onnx == state.onnx and fresh.onnx.density_outputs
    saved = json.loads((tmp_path / "state" / "state.json").read_text())
    assert not saved["onnx"]["folder"].startswith("/")  # relative to the run folder


def test_structurally_pruned_neurons_are_gone_from_the_graph(pipeline_state, one_thread):
    import onnx
    from onnx import numpy_helper

    state = pipeline_state("bert")
    _run_pass(state, "structured_prune", mlp_ratio=0.5, round_to=1)
    _run_pass(state, "onnx_export", density_outputs=True)
    graph = onnx.load(f"{state.onnx.folder}/model.onnx").graph
    shapes = sorted(tuple(numpy_helper.to_array(t).shape) for t in graph.initializer if len(t.dims) == 2)
    assert (32, 32) in shapes and (32, 64) not in shapes and (64, 32) not in shapes  # MLP 64 -> 32 neurons
    assert state.onnx.widths == [32, 32]
