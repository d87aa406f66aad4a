"""deploy/: the graph a run measured last, with a card that describes it and load lines that reproduce its score."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from deftcompress.pipeline.recipe import Recipe
from deftcompress.pipeline.runner import run_recipe


@pytest.fixture(scope="module")
def int8_run(tiny_checkpoint, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("deploy") / "run"
    recipe = Recipe.build(name="to_ship", model=str(tiny_checkpoint("bert")), data_dir=str(tiny_data), eval_batch_size=8,
                          passes=[{"onnx_export": {}}, {"quantize": {"backend": "ort_int8"}},
                                  {"evaluate": {"runtime": "onnxruntime", "threads": 1}}])
    return out, run_recipe(recipe, output_dir=out, quiet=True)


def test_the_run_ships_the_graph_it_measured_last(int8_run):
    out, report = int8_run
    deploy = report.final["deploy"]
    graph_step = report.steps[3]  # evaluate measured the int8 graph again (one thread: other settings than quantize's)
    assert deploy["folder"] == "deploy" and deploy["runtime"] == "onnxruntime" and deploy["quantized"] == "ort_int8"
    assert deploy["score"] == graph_step.task_score and deploy["step"] == 3
    folder = out / "deploy"
    assert {"model.onnx", "config.json", "README.md", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    assert (folder / "model.onnx").read_bytes() == (out / report.final["onnx"]["folder"] / "model.onnx").read_bytes()
    assert deploy["graph_bytes"] == (folder / "model.onnx").stat().st_size == graph_step.size_bytes
    recorded = json.loads((out / "progress.json").read_text())["files"]
    assert "deploy/model.onnx" in recorded and "deploy/README.md" in recorded  # verified on resume like every file
    assert report.deploy_line() in (out / "report.md").read_text()


def test_each_card_describes_its_own_folder(int8_run):
    out, report = int8_run
    torch_step, graph_step = report.steps[0], report.steps[3]  # every later step measured a graph in onnxruntime
    assert all(str(s.details.get("runtime", "")).startswith("onnxruntime") for s in report.steps[1:])
    deploy_card = (out / "deploy" / "README.md").read_text()
    model_card = (out / "model" / "README.md").read_text()
    assert f"{graph_step.task_score:.4f} (onnxruntime, {graph_step.eval_examples} evaluation rows" in deploy_card
    assert f"{graph_step.size_bytes / 1e6:.1f} MB" in deploy_card and "library_name: onnxruntime" in deploy_card
    assert f"| {torch_step.task_score:.4f} |" in model_card and "Measured in PyTorch after step 0" in model_card


def test_the_cards_load_lines_reproduce_the_reported_score_without_deftcompress(int8_run, tiny_data):
    out, report = int8_run
    card = (out / "deploy" / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    from deftcompress.data.tasks import get_task, read_split

    rows = read_split(get_task("glue/sst2"), "validation", str(tiny_data))
    check = snippet + (
        "\nimport json, sys\n"
        f"rows = json.loads({json.dumps(json.dumps([[r['text_a'], r['label']] for r in rows]))})\n"
        "batch = tokenizer([r[0] for r in rows], return_tensors='np', padding=True)\n"
        "logits = session.run(['logits'], {k: v for k, v in batch.items() if k in names})[0]\n"
        "assert not any(m.startswith('deftcompress') for m in sys.modules), 'the card imports deftcompress'\n"
        "print(sum(int(p == r[1]) for p, r in zip(logits.argmax(-1), rows)) / len(rows))\n")
    done = subprocess.run([sys.executable, "-c", check], cwd=out, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.strip().splitlines()[-1]) == pytest.approx(report.final["deploy"]["score"], abs=1e-9)


def test_optimum_loads_the_deploy_folder(int8_run):
    import numpy as np
    import onnxruntime as ort
    from optimum.onnxruntime import ORTModelForSequenceClassification
    from transformers import AutoTokenizer

    out, _ = int8_run
    tokenizer = AutoTokenizer.from_pretrained(out / "deploy")
    model = ORTModelForSequenceClassification.from_pretrained(out / "deploy")
    batch = tokenizer(["the film was warm", "dull and cold"], return_tensors="pt", padding=True)
    session = ort.InferenceSession(str(out / "deploy" / "model.onnx"))
    names = {i.name for i in session.get_inputs()}
    direct = session.run(["logits"], {k: v.numpy() for k, v in batch.items() if k in names})[0]
    np.testing.assert_allclose(model(**batch).logits.numpy(), direct, atol=1e-6)


def test_a_run_ending_in_pytorch_ships_model(tiny_checkpoint, tiny_data, tmp_path):
    recipe = Recipe.build(name="plain", model=str(tiny_checkpoint("bert")), data_dir=str(tiny_data), max_eval_samples=8,
                          passes=[{"onnx_export": {}}, {"evaluate": {"runtime": "torch"}}])  # measured last in PyTorch
    report = run_recipe(recipe, output_dir=tmp_path / "run", quiet=True)
    assert report.final["deploy"]["folder"] == "model" and report.final["deploy"]["runtime"] == "torch"
    assert not (tmp_path / "run" / "deploy").exists()
    assert report.deploy_line(str(tmp_path / "run")).startswith(f"deploy: {tmp_path / 'run'}/model/ (the PyTorch model")


def test_the_cli_names_the_folder_to_ship_last(tiny_checkpoint, tiny_data, tmp_path):
    from click.testing import CliRunner

    from deftcompress.cli import main

    path = tmp_path / "r.yaml"
    path.write_text(f"name: cli_ship\nmodel: {tiny_checkpoint('bert')}\ndata_dir: {tiny_data}\nmax_eval_samples: 8\n"
                    "passes:\n  - onnx_export: {}\n  - quantize: {backend: ort_int8}\n")
    result = CliRunner().invoke(main, ["apply", str(path), "-o", str(tmp_path / "run"), "--quiet"])
    assert result.exit_code == 0, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith(f"deploy: {tmp_path / 'run'}/deploy/ (onnxruntime int8 graph")


def test_an_evaluate_only_run_of_a_base_checkpoint_ships_nothing(tiny_checkpoint, tiny_data, tmp_path):
    import transformers

    classifier = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_checkpoint("bert"))
    classifier.bert.save_pretrained(tmp_path / "base")  # the encoder alone: the task head will be new
    transformers.AutoTokenizer.from_pretrained(tiny_checkpoint("bert")).save_pretrained(tmp_path / "base")
    recipe = Recipe.build(name="just_eval", model=str(tmp_path / "base"), data_dir=str(tiny_data),
                          max_eval_samples=8, passes=[{"evaluate": {}}])
    report = run_recipe(recipe, output_dir=tmp_path / "run", quiet=True)
    assert report.final["deploy"]["folder"] is None and "initialised anew" in report.final["deploy"]["why"]
    assert report.deploy_line().startswith("deploy: nothing to ship (no pass changed the model")
    assert "**Not a model to ship**" in (tmp_path / "run" / "model" / "README.md").read_text()
    assert not (tmp_path / "run" / "deploy").exists()
