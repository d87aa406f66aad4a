import math

import pytest

from deftcompress.errors import DataError
from deftcompress.data.metrics import binary_f1, compute_metrics, matthews, pearson, squad_metrics
from deftcompress.data.tasks import get_task, load_examples
from deftcompress.data.text_to_text import parse_t5_prediction, t5_source, t5_target


@pytest.mark.parametrize("name", ["glue/sst2", "glue/mrpc", "glue/stsb", "glue/cola", "glue/mnli", "squad"])
def test_local_layouts_load(tiny_data, name):
    task = get_task(name)
    ex = load_examples(task, "validation", tiny_data)
    assert ex and ex[0]["text_a"]
    if name in ("glue/mrpc", "glue/mnli", "glue/stsb", "squad"):
        assert ex[0]["text_b"]
    if name == "glue/mnli":
        assert {e["label"] for e in ex} == {0, 1, 2}
    if name == "glue/stsb":
        assert isinstance(ex[0]["label"], float)


def test_squad_without_train_file_splits_by_article(tiny_data):
    task = get_task("squad")
    train = load_examples(task, "train", tiny_data)
    dev = load_examples(task, "validation", tiny_data)
    train_articles = {e["id"].split("-")[0] for e in train}
    dev_articles = {e["id"].split("-")[0] for e in dev}
    assert dev_articles == {"4", "9"} and not (train_articles & dev_articles)
    assert len(train) + len(dev) == 40


def test_real_sst2_dev_reads_all_rows():
    from conftest import SHARED_DATA

    if not (SHARED_DATA / "glue" / "sst2" / "dev.tsv").is_file():
        pytest.skip("shared data not present")
    ex = load_examples(get_task("glue/sst2"), "validation", SHARED_DATA)
    assert len(ex) == 872 and sum(e["label"] for e in ex) == 444
    mrpc = load_examples(get_task("glue/mrpc"), "validation", SHARED_DATA)
    assert len(mrpc) == 408 and sum(e["label"] for e in mrpc) == 279


def test_bad_rows_name_file_and_line(tmp_path):
    (tmp_path / "glue" / "sst2").mkdir(parents=True)
    (tmp_path / "glue" / "sst2" / "dev.tsv").write_text("sentence\tlabel\ngood\t1\nbad\tseven\n")
    with pytest.raises(DataError, match=r"dev.tsv:3: bad label 'seven'"):
        load_examples(get_task("glue/sst2"), "validation", tmp_path)


def test_train_subset_is_seeded(tiny_data):
    task = get_task("glue/sst2")
    a = load_examples(task, "train", tiny_data, max_samples=10, seed=1)
    b = load_examples(task, "train", tiny_data, max_samples=10, seed=1)
    c = load_examples(task, "train", tiny_data, max_samples=10, seed=2)
    assert a == b and a != c


def test_metrics_against_hand_values():
    assert binary_f1([1, 1, 0, 0], [1, 0, 1, 0]) == pytest.approx(0.5)  # tp1 fp1 fn1
    # tp=2 tn=1 fp=1 fn=0 -> (2*1-1*0)/sqrt(3*2*2*1)
    assert matthews([1, 1, 1, 0], [1, 1, 0, 0]) == pytest.approx(2 / math.sqrt(12))
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    m = squad_metrics(["The cat", "a dog ran"], [["cat"], ["dog", "the dog sat"]])
    assert m["exact_match"] == pytest.approx(50.0)
    # second: best F1 of "dog ran" vs "dog" (p=1/2, r=1 -> 2/3) and vs "dog sat" (1/2)
    assert m["f1"] == pytest.approx(100 * (1 + 2 / 3) / 2)
    mrpc = compute_metrics(get_task("glue/mrpc"), [1, 0], [{"label": 1}, {"label": 1}])
    assert mrpc == {"accuracy": 0.5, "f1": pytest.approx(2 / 3)}


def test_t5_text_formats():
    sst2 = get_task("glue/sst2")
    ex = {"text_a": "nice", "text_b": None, "label": 1}
    assert t5_source(sst2, ex) == "sst2 sentence: nice" and t5_target(sst2, ex) == "positive"
    assert parse_t5_prediction(sst2, " positive ") == 1 and parse_t5_prediction(sst2, "maybe") == -1
    stsb = get_task("glue/stsb")
    assert t5_target(stsb, {"label": 3.77}) == "3.8"


def test_squad_contexts_is_language_modelling_on_each_paragraph_once_split_by_article(tiny_data, tiny_checkpoint,
                                                                                         tmp_path):
    from deftcompress.data.tasks import get_task, read_split
    from deftcompress.pipeline.recipe import Recipe
    from deftcompress.pipeline.runner import run_recipe

    task = get_task("squad/contexts")
    assert task.kind == "language_modeling" and task.metric == "perplexity" and not task.higher_is_better
    train, validation = (read_split(task, split, str(tiny_data)) for split in ("train", "validation"))
    assert len(train) == 16 and len(validation) == 4  # 10 articles of 2 paragraphs: every 5th article held out
    assert all(r["text_b"] is None and r["label"] is None for r in train + validation)
    assert not {r["text_a"] for r in train} & {r["text_a"] for r in validation}  # no paragraph in both
    assert len({r["text_a"] for r in train}) == len(train)  # each paragraph once, however many questions
    recipe = Recipe.build(name="lm", model=str(tiny_checkpoint("llama")), task="squad/contexts", data_dir=str(tiny_data),
                          passes=[{"activation_threshold": {"density_target": 0.5}}])
    report = run_recipe(recipe, output_dir=tmp_path / "run", quiet=True)
    assert report.steps[0].task_metric == "perplexity" and report.steps[0].eval_examples == 4
    assert report.steps[1].density["decoder"] < 0.7 < report.steps[0].density["decoder"]
