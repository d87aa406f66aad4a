"""Tasks given by data: CSV / JSON Lines / Parquet files with a column mapping, checked before any model loads."""

from __future__ import annotations

import json
import random

import pytest
import yaml
from click.testing import CliRunner

from deftcompress import Recipe, RecipeError
from deftcompress.cli import main
from deftcompress.data.tasks import get_task, read_split

WORDS = {"good": ["great", "lovely", "fine", "superb"], "bad": ["awful", "dull", "poor", "grim"]}


def _rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.choice(["pos", "neg"])
        words = WORDS["good" if label == "pos" else "bad"]
        out.append({"review": f"a {rng.choice(words)} film", "other": "x", "sentiment": label,
                    "premise": f"the film was {rng.choice(words)}", "hypothesis": "it was good",
                    "entails": int(label == "pos"), "score": 4.0 if label == "pos" else 1.0})
    return out


def _write_csv(path, rows, columns):
    lines = [",".join(columns)] + [",".join(str(r[c]) for c in columns) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def own_data(tmp_path):
    folder = tmp_path / "mydata"
    folder.mkdir()
    _write_csv(folder / "train.csv", _rows(32, 0), ["review", "other", "sentiment", "score"])
    _write_csv(folder / "dev.csv", _rows(12, 1), ["review", "other", "sentiment", "score"])
    for name, rows in (("train.jsonl", _rows(32, 2)), ("dev.jsonl", _rows(12, 3))):
        (folder / name).write_text("".join(json.dumps({k: r[k] for k in ("premise", "hypothesis", "entails")}) + "\n"
                                           for r in rows))
    return folder


def _recipe(tmp_path, checkpoint, task: dict, passes=None) -> dict:
    return {"name": "mine", "model": str(checkpoint), "task": task, "max_eval_samples": 8, "eval_batch_size": 4,
            "passes": passes or [{"deft": {"max_steps": 2, "batch_size": 8, "r": 2, "merge": True}}]}


def test_a_csv_classification_task_runs_and_pipeline_answers_with_its_label_names(tmp_path, own_data, tiny_checkpoint,
                                                                                  one_thread):
    from transformers import pipeline

    from deftcompress import run_recipe

    task = {"type": "classification", "train": str(own_data / "train.csv"), "validation": str(own_data / "dev.csv"),
            "text": "review", "label": "sentiment"}
    recipe = Recipe.from_dict(_recipe(tmp_path, tiny_checkpoint("bert"), task))
    spec = get_task(recipe.settings.task)
    assert (spec.name, spec.kind, spec.metric, spec.label_names) == ("data:dev.csv", "classification", "accuracy",
                                                                    ("neg", "pos"))
    examples = read_split(spec, "validation")
    assert len(examples) == 12 and examples[0]["text_b"] is None and {e["label"] for e in examples} <= {0, 1}
    report = run_recipe(recipe, output_dir=tmp_path / "out", quiet=True)
    assert report.task == "data:dev.csv" and report.steps[-1].eval_examples == 8
    config = json.loads((tmp_path / "out" / "model" / "config.json").read_text())
    assert config["id2label"] == {"0": "neg", "1": "pos"} and config["label2id"] == {"neg": 0, "pos": 1}
    classify = pipeline("text-classification", model=str(tmp_path / "out" / "model"), device="cpu")
    assert classify("a lovely film")[0]["label"] in ("neg", "pos")


def test_a_sentence_pair_task_from_json_lines_and_a_regression_task(tmp_path, own_data, tiny_checkpoint, one_thread):
    from deftcompress import run_recipe

    pair = {"type": "classification", "train": str(own_data / "train.jsonl"), "validation": str(own_data / "dev.jsonl"),
            "text": ["premise", "hypothesis"], "label": "entails", "metric": "f1"}
    spec = get_task(pair)
    assert spec.label_names == ("0", "1") and spec.metric == "f1"
    assert read_split(spec, "train")[0]["text_b"] == "it was good"
    report = run_recipe(Recipe.from_dict(_recipe(tmp_path, tiny_checkpoint("bert"), pair)), output_dir=tmp_path / "pair",
                        quiet=True)
    assert report.steps[-1].task_metric == "f1" and "accuracy" in report.steps[-1].metrics

    regression = {"type": "regression", "train": str(own_data / "train.csv"), "validation": str(own_data / "dev.csv"),
                  "text": "review", "label": "score", "metric": "spearmanr"}
    report = run_recipe(Recipe.from_dict(_recipe(tmp_path, tiny_checkpoint("bert"), regression)),
                        output_dir=tmp_path / "reg", quiet=True)
    assert report.steps[-1].task_metric == "spearmanr" and "pearson" in report.steps[-1].metrics


@pytest.mark.parametrize("change, message", [
    ({"label": "stars"}, "task.validation: no column 'stars' (columns: review, other, sentiment, score)"),
    ({"text": ["review", "missing"]}, "no column 'missing'"),
    ({"validation": "nowhere.csv"}, "task.validation: nowhere.csv not found"),
    ({"validation": "notes.txt"}, "unknown data format"),
    ({"type": "regression"}, "task.label: regression needs numeric labels, found"),
    ({"labels": ["pos", "meh"]}, "the data holds labels ['neg'] that labels does not list"),
    ({"metric": "pearson"}, "metric 'pearson' does not fit classification"),
    ({"text": []}, "text must name one or two columns"),
    ({"colour": "red"}, "task.colour: unknown option"),
])
def test_bad_data_tasks_are_one_line_errors_before_any_model_loads(tmp_path, own_data, change, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("hello\n")
    task = {"type": "classification", "train": str(own_data / "train.csv"), "validation": str(own_data / "dev.csv"),
            "text": "review", "label": "sentiment", **change}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model": "minilm", "task": task, "passes": [{"deft": {}}]}))
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    with pytest.raises(RecipeError):
        Recipe.from_file(path)


def test_evaluation_only_needs_no_train_split_but_training_does(tmp_path, own_data):
    task = {"validation": str(own_data / "dev.csv"), "text": "review", "label": "sentiment"}
    Recipe.from_dict({"model": "minilm", "task": task, "passes": [{"evaluate": {}}]})
    with pytest.raises(RecipeError, match="task.train: null, but .*deft trains"):
        Recipe.from_dict({"model": "minilm", "task": task, "passes": [{"deft": {}}]})


def test_without_local_data_or_hub_the_run_fails_in_seconds_with_one_line(tmp_path, tiny_checkpoint, monkeypatch):
    import time

    monkeypatch.delenv("DEFTCOMPRESS_DATA_DIR", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model": str(tiny_checkpoint("bert")), "task": "glue/sst2",
                                    "passes": [{"evaluate": {}}]}))
    start = time.perf_counter()
    result = CliRunner().invoke(main, ["apply", str(path), "-o", str(tmp_path / "out"), "-q"])
    assert time.perf_counter() - start < 30
    assert result.exit_code != 0 and "no local data (set DEFTCOMPRESS_DATA_DIR" in result.output
    assert "cannot be reached" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_a_language_modelling_task_on_a_text_file_with_a_decoder(tmp_path, tiny_checkpoint, one_thread):
    import math

    from transformers import AutoModelForCausalLM

    from deftcompress import run_recipe

    rng = random.Random(0)
    words = ["the", "film", "was", "good", "bad", "a", "story", "of", "long", "days"]
    for name, n in (("train.jsonl", 40), ("dev.jsonl", 10)):
        (tmp_path / name).write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(12))}) + "\n"
                                             for _ in range(n)))
    task = {"type": "language_modeling", "train": str(tmp_path / "train.jsonl"),
            "validation": str(tmp_path / "dev.jsonl"), "text": "text"}
    recipe = Recipe.from_dict(_recipe(tmp_path, tiny_checkpoint("llama"), task,
                                      [{"deft": {"max_steps": 3, "batch_size": 8, "r": 2, "merge": True,
                                                 "learning_rate": 1e-2}}]))
    report = run_recipe(recipe, output_dir=tmp_path / "lm", quiet=True)
    base, trained = report.steps[0], report.steps[-1]
    assert base.task_metric == "perplexity" and math.isfinite(base.task_score) and base.task_score > 1
    assert trained.task_score < base.task_score  # the causal LM loss trained
    assert trained.density["decoder"] is not None and trained.metrics["tokens"] > 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "lm" / "model")  # plain transformers loads it
    assert type(model).__name__ == "LlamaForCausalLM"
    with pytest.raises(RecipeError, match="language modelling needs a decoder-only model"):
        run_recipe(Recipe.from_dict(_recipe(tmp_path, tiny_checkpoint("bert"), task, [{"evaluate": {}}])),
                   output_dir=tmp_path / "bert_lm", quiet=True)
