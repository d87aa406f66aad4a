"""The accuracy budget (`max_score_drop`): the search by hand, then wired into `deft` and `ada_deft`."""

import json
from types import SimpleNamespace

import pytest

from deftcompress import Recipe, run_recipe
from deftcompress.errors import RecipeError

CANDIDATES = [0.2, 0.3, 0.38, 0.5, 0.7]


def _context(tmp_path, task="glue/sst2"):
    import torch

    from deftcompress.data.tasks import get_task
    from deftcompress.training.context import TrainingContext

    return TrainingContext(model=None, tokenizer=None, task=get_task(task), arch=None, device=torch.device("cpu"),
                           seed=0, quiet=True, constraints=[], train_examples=lambda n=None: [],
                           eval_examples=lambda: [], eval_settings=None, density_mode="masked", max_seq_length=64,
                           trust_pickle=False, pass_name="deft", pass_dir=tmp_path, run_dir=tmp_path, model_ref="m",
                           earlier_passes=())


def _search(scores: dict, reference=0.90, trained_reference=True):
    """A search whose 'models' are their settings; `scores` maps a setting to its held-out score."""
    from deftcompress.training.score_budget import BudgetSearch

    def train(_ctx, value):
        return SimpleNamespace(model=value, details={})

    def train_reference(_ctx):
        return SimpleNamespace(model="reference", details={"reference": True})

    search = BudgetSearch("density_target", list(CANDIDATES), train, train_reference if trained_reference else None)
    table = {**scores, "reference": reference}
    return search, lambda model: (table[model], model / 2 if isinstance(model, float) else 1.0)


def test_the_search_bisects_to_the_most_compressed_setting_within_the_budget(tmp_path):
    from deftcompress.training.score_budget import search_within_budget

    search, score = _search({0.2: 0.85, 0.3: 0.88, 0.38: 0.895, 0.5: 0.90, 0.7: 0.90})
    chosen, section = search_within_budget(_context(tmp_path), 1.0, search, held_out=[{}] * 10, score=score)
    assert chosen.model == 0.38 and section["within_budget"] is True
    assert [t["value"] for t in section["tried"]] == [0.38, 0.2, 0.3]  # the middle, then the more compressed half
    assert [t["within_budget"] for t in section["tried"]] == [True, False, False]
    assert [t["drop_points"] for t in section["tried"]] == [0.5, 5.0, 2.0]
    assert section["reference"]["held_out_score"] == 0.9 and section["reference"]["kind"] == "trained here"
    assert section["chosen"] == "density_target 0.38" and section["held_out_rows"] == 10


def test_nothing_within_the_budget_hands_on_the_reference_and_says_so(tmp_path):
    from deftcompress.training.score_budget import budget_message, search_within_budget

    search, score = _search({v: 0.80 for v in CANDIDATES})
    chosen, section = search_within_budget(_context(tmp_path), 1.0, search, held_out=[{}], score=score)
    assert chosen.model == "reference" and section["within_budget"] is False
    assert [t["value"] for t in section["tried"]] == [0.38, 0.5, 0.7]  # bisected towards the less compressed end
    message = budget_message(section, "deft")
    assert message.startswith("deft: no setting stays within max_score_drop 1 points") and "\n" not in message
    assert "handing on the reference" in message and message.endswith("a larger max_score_drop may find one)")
    assert budget_message({**section, "within_budget": True}, "deft") is None


def test_points_follow_the_metric():
    from deftcompress.data.tasks import get_task
    from deftcompress.training.score_budget import score_drop_points

    assert score_drop_points(get_task("glue/sst2"), 0.90, 0.885) == pytest.approx(1.5)
    assert score_drop_points(get_task("squad"), 80.0, 78.5) == pytest.approx(1.5)  # SQuAD F1 is a percentage
    assert score_drop_points(get_task("squad/contexts"), 20.0, 21.0) == pytest.approx(5.0)  # perplexity: +5%


def test_the_paired_bootstrap_sees_how_many_rows_a_drop_rests_on():
    from deftcompress.data.tasks import get_task
    from deftcompress.training.score_budget import paired_bootstrap

    task = get_task("glue/sst2")
    rows = [{"label": 1}] * 100
    reference = [1] * 100
    assert paired_bootstrap(task, rows, reference, list(reference), 0.9, seed=0) == (0.0, 0.0)  # same answers
    one_wrong = [0] + [1] * 99  # a drop of 1 point resting on one row
    se, bound = paired_bootstrap(task, rows, reference, one_wrong, 0.9, seed=0)
    assert 0.8 < se < 1.2 and bound >= 1.0  # sqrt(0.01 * 0.99 / 100) = 0.99 points
    ten_wrong = [0] * 10 + [1] * 90
    assert paired_bootstrap(task, rows, reference, ten_wrong, 0.9, seed=0)[0] > se  # more rows apart, wider


def test_the_paired_bootstrap_scores_text_answers_with_squads_metric():
    from deftcompress.data.tasks import get_task
    from deftcompress.training.score_budget import paired_bootstrap

    rows = [{"answers": [f"answer {i}"]} for i in range(40)]
    reference = [f"answer {i}" for i in range(40)]
    worse = ["wrong"] * 4 + reference[4:]  # 10% of answers lost: F1 10 points lower
    se, bound = paired_bootstrap(get_task("squad"), rows, reference, worse, 0.9, seed=0)
    assert 2 < se < 8 and bound > 10 - 2 * se  # sqrt(0.1 * 0.9 / 40) = 4.7 points; SQuAD F1 is a percentage


def test_with_a_confidence_a_drop_the_rows_cannot_resolve_does_not_pass(tmp_path):
    """0.3 falls 0.5 points on 200 rows: within by its measured drop, not by its 0.9 bound; 0.38 falls nothing."""
    from deftcompress.training.score_budget import BudgetSearch, search_within_budget

    rows = [{"label": 1}] * 200
    answers = {"reference": [1] * 200, 0.3: [0] + [1] * 199, 0.38: [1] * 200}

    def score(model):
        got = answers[model]
        return sum(got) / 200, 0.5, got

    def search():
        return BudgetSearch("density_target", [0.3, 0.38], lambda _c, v: SimpleNamespace(model=v, details={}),
                            lambda _c: SimpleNamespace(model="reference", details={}))

    chosen, section = search_within_budget(_context(tmp_path), 0.6, search(), rows, score=score)
    assert chosen.model == 0.3 and section["tried"][0]["drop_points"] == pytest.approx(0.5)
    assert section["tried"][0]["drop_se"] > 0.2 and "drop_bound" not in section["tried"][0]
    chosen, section = search_within_budget(_context(tmp_path), 0.6, search(), rows, score=score, confidence=0.9)
    assert section["tried"][0]["drop_bound"] > 0.6 and section["tried"][0]["within_budget"] is False
    assert chosen.model == 0.38 and section["confidence"] == 0.9


def _recipe(tiny_checkpoint, tiny_data, name, pass_name="deft", **options):
    options = {"method": "lora", "r": 2, "max_steps": 3, "batch_size": 8, "max_train_samples": 40,
               "learning_rate": 1e-2, "save_steps": None, **options}
    return Recipe.build(name=name, model=str(tiny_checkpoint("bert")), task="glue/sst2", data_dir=str(tiny_data),
                        max_eval_samples=8, eval_batch_size=8, passes=[{pass_name: options}])


def test_deft_with_a_budget_trains_a_reference_and_reports_every_point(tiny_checkpoint, tiny_data, tmp_path, one_thread):
    recipe = _recipe(tiny_checkpoint, tiny_data, "budget", max_score_drop=100.0, budget_density_targets=[0.6, 0.3])
    report = run_recipe(recipe, output_dir=tmp_path / "budget", quiet=True)
    details = report.steps[1].details
    budget = details["budget"]
    assert details["within_budget"] is True and budget["within_budget"] is True
    assert budget["candidates"] == [0.3, 0.6] and [t["value"] for t in budget["tried"]] == [0.3]
    assert budget["reference"]["kind"] == "trained here" and budget["held_out_rows"] == 4  # 0.1 of 40 rows
    assert details["density_loss"]["target"] == 0.3  # the handed-on model is the chosen point's
    assert budget["tried"][0]["drop_se"] >= 0  # the held-out predictions were bootstrapped
    on_dev = budget["on_evaluation_rows"]  # scored after the choice, for the report only
    assert on_dev["rows"] == 8 and on_dev["chosen_score"] == pytest.approx(report.steps[1].task_score, abs=1e-6)
    assert on_dev["drop_points"] == pytest.approx(100 * (on_dev["reference_score"] - on_dev["chosen_score"]), abs=1e-3)
    outcome = report.final["budget_outcome"]  # the last step against the reference, on the same rows
    assert outcome["final_step"] == 1 and outcome["within_budget"] is True
    assert outcome["drop_points"] == pytest.approx(on_dev["drop_points"], abs=1e-3)
    for folder in ("reference", "density_target_0.3"):
        assert (tmp_path / "budget" / "passes" / "01_deft" / "budget" / folder / "adapter").is_dir()
    point = json.loads((tmp_path / "budget" / "passes" / "01_deft" / "budget" / "density_target_0.3" / "point.json")
                       .read_text())  # written as soon as the point was scored
    assert point == budget["tried"][0]
    assert json.loads((tmp_path / "budget" / "passes" / "01_deft" / "budget" / "reference" / "point.json")
                      .read_text()) == budget["reference"]
    saved = json.loads((tmp_path / "budget" / "report.json").read_text())
    assert saved["steps"][1]["details"]["within_budget"] is True
    assert "Accuracy budget" in (tmp_path / "budget" / "report.md").read_text()


def test_outside_the_budget_with_a_given_reference(tiny_checkpoint, tiny_data, tmp_path, one_thread, monkeypatch,
                                                   capsys):
    """A reference given by path is scored, not trained; when no point is within, the least compressed one tried is
    handed on, report.json says within_budget: false and one warning line says so."""
    from deftcompress.training import score_budget

    monkeypatch.setattr(score_budget, "score_drop_points", lambda task, reference, score: 50.0)
    recipe = _recipe(tiny_checkpoint, tiny_data, "outside", max_score_drop=1.0, budget_density_targets=[0.3, 0.6],
                     budget_reference=str(tiny_checkpoint("bert")))
    report = run_recipe(recipe, output_dir=tmp_path / "outside", quiet=True)
    details = report.steps[1].details
    assert details["within_budget"] is False and details["budget"]["reference"]["kind"] == "given"
    assert [t["value"] for t in details["budget"]["tried"]] == [0.3, 0.6]
    assert details["budget"]["chosen"].startswith("density_target 0.6 (the least compressed tried")
    assert not (tmp_path / "outside" / "passes" / "01_deft" / "budget" / "reference").exists()
    assert details["budget"]["on_evaluation_rows"]["rows"] == 8  # the given reference is loaded again for it
    markdown = (tmp_path / "outside" / "report.md").read_text()
    assert "On the 8 evaluation rows (reported only)" in markdown
    assert "(**the search: outside the budget**)" in markdown  # the verdict is the search's, not the dev drop's
    assert "(the search: outside the budget)" in report.text_table()
    warnings = [line for line in capsys.readouterr().err.splitlines() if "max_score_drop" in line]
    assert len(warnings) == 2 and "no setting stays within max_score_drop 1 points" in warnings[0]
    assert "ends +50.00 points from step 1's reference on the 8 evaluation rows" in warnings[1]  # the end, too
    assert "BEYOND max_score_drop 1" in warnings[1] and report.final["budget_outcome"]["within_budget"] is False
    assert "**Accuracy budget**: budget outcome" in (tmp_path / "outside" / "report.md").read_text()


def test_the_budget_can_judge_on_training_rows_no_training_uses(tiny_checkpoint, tiny_data, tmp_path, one_thread):
    """budget_held_out_samples: that many training-split rows beyond max_train_samples; the trainings keep all theirs."""
    recipe = _recipe(tiny_checkpoint, tiny_data, "beyond", max_score_drop=100.0, budget_density_targets=[0.3],
                     budget_held_out_samples=20)  # 64 training rows, 40 trained on: 24 to draw from
    report = run_recipe(recipe, output_dir=tmp_path / "beyond", quiet=True)
    details = report.steps[1].details
    assert details["budget"]["held_out_rows"] == 20 and "beyond the 40" in details["budget"]["held_out_source"]
    assert details["train_rows"] == 40 and details["held_out_rows"] == 0  # nothing held out of the trainings


def test_rows_beyond_the_training_rows_are_disjoint_from_them_and_refused_when_too_few(tmp_path):
    from deftcompress.errors import DataError
    from deftcompress.training.score_budget import held_out_rows

    split = [{"sentence": f"row {i}", "label": i % 2} for i in range(50)]
    ctx = _context(tmp_path)
    ctx.train_examples = lambda n=None: split if n is None else split[::2][:n]  # a subset of the read rows
    config = SimpleNamespace(budget_held_out_samples=20, max_train_samples=25, validation_fraction=None,
                             budget_held_out_min_words=None)
    rows, source = held_out_rows(ctx, config)
    assert len(rows) == 20 and not {id(r) for r in rows} & {id(r) for r in split[::2]}
    assert rows == held_out_rows(ctx, config)[0]  # seeded
    with pytest.raises(DataError, match="26 rows asked, but the training split has only 25 beyond the 25"):
        held_out_rows(ctx, SimpleNamespace(budget_held_out_samples=26, max_train_samples=25, validation_fraction=None,
                                           budget_held_out_min_words=None))


def test_the_budget_can_judge_only_on_rows_as_long_as_the_deployments(tmp_path):
    """budget_held_out_min_words: phrases are left out of the draw, both texts of a pair count."""
    from deftcompress.errors import DataError
    from deftcompress.training.score_budget import held_out_rows

    split = [{"text_a": " ".join(["w"] * (1 + i % 12)), "text_b": None, "label": 0} for i in range(60)]
    split += [{"text_a": "a b", "text_b": "c d e f g h i j", "label": 1}]  # a pair of 2 + 8 words
    ctx = _context(tmp_path)
    ctx.train_examples = lambda n=None: split if n is None else split[:n]
    config = SimpleNamespace(budget_held_out_samples=10, max_train_samples=12, validation_fraction=None,
                             budget_held_out_min_words=10)
    rows, source = held_out_rows(ctx, config)
    long_enough = [r for r in split[12:] if len(r["text_a"].split()) + len((r["text_b"] or "").split()) >= 10]
    assert len(long_enough) == 13 and split[-1] in long_enough  # 4 of each 12 lengths in rows 12..59, and the pair
    assert {id(r) for r in rows} <= {id(r) for r in long_enough} and len(rows) == 10
    assert source == "training-split rows of at least 10 words beyond the 12 the training uses"
    with pytest.raises(DataError, match="14 rows asked, but the training split has only 13 of at least 10 words"):
        held_out_rows(ctx, SimpleNamespace(**{**vars(config), "budget_held_out_samples": 14}))


def test_ada_deft_searches_skipped_blocks(tiny_checkpoint, tiny_data, tmp_path, one_thread):
    recipe = _recipe(tiny_checkpoint, tiny_data, "ada", pass_name="ada_deft", skip_blocks=1, max_score_drop=100.0,
                     measure_speed=False)
    report = run_recipe(recipe, output_dir=tmp_path / "ada", quiet=True)
    details = report.steps[1].details
    assert details["budget"]["parameter"] == "skip_blocks" and details["budget"]["candidates"] == [1]
    assert details["within_budget"] is True and len(details["blocks"]["skipped"]) == 1


@pytest.mark.parametrize("pass_name, options, message", [
    ("deft", {"max_score_drop": -1}, r"max_score_drop must be in \[0, 100\] points"),
    ("deft", {"budget_reference": "x"}, "budget_reference is set but max_score_drop is not"),
    ("deft", {"distill_from": "reference"}, "distill_from: reference learns from the budget's reference"),
    ("deft", {"budget_held_out_samples": 100}, "budget_held_out_samples is set but max_score_drop is not"),
    ("deft", {"max_score_drop": 1, "budget_held_out_samples": 100, "max_train_samples": None},
     "budget_held_out_samples draws rows the training does not use: set max_train_samples"),
    ("ada_deft", {"max_score_drop": 1, "skip_blocks": 1, "budget_held_out_samples": 0},
     "budget_held_out_samples must be >= 1"),
    ("deft", {"max_score_drop": 1, "budget_held_out_min_words": 10},
     "budget_held_out_min_words chooses among budget_held_out_samples' rows"),
    ("deft", {"max_score_drop": 1, "budget_held_out_samples": 100, "max_train_samples": 10,
              "budget_held_out_min_words": 0}, "budget_held_out_min_words must be >= 1"),
    ("deft", {"budget_confidence": 0.9}, "budget_confidence is set but max_score_drop is not"),
    ("deft", {"max_score_drop": 1, "budget_confidence": 1.0}, r"budget_confidence must be in \[0.5, 1\)"),
    ("deft", {"max_score_drop": 1, "density_weight": 0}, "density_weight must be > 0"),
    ("deft", {"max_score_drop": 1, "budget_density_targets": [0.3, 1.2]}, r"densities in \(0, 1\)"),
    ("deft", {"max_score_drop": 1, "budget_reference": "/nonexistent/ref"}, "budget_reference: checkpoint folder"),
    ("ada_deft", {"max_score_drop": 1, "skip_fraction": 0.5}, "set skip_blocks >= 1"),
])
def test_bad_budgets_are_one_line_errors(tiny_checkpoint, tiny_data, pass_name, options, message):
    with pytest.raises(RecipeError, match=message) as info:
        Recipe.build(model=str(tiny_checkpoint("bert")), data_dir=str(tiny_data),
                     passes=[{pass_name: {"method": "lora", **options}}])
    assert "\n" not in str(info.value)


def test_a_relufy_chain_searches_within_its_budget(tiny_checkpoint, tiny_data, tmp_path, one_thread):
    """relufy then deft with a budget: the reference and every point train from the relufied model, and the handed-on
    model keeps ReLU (a reference by path, e.g. a plain LoRA run, bounds the whole chain's drop instead)."""
    options = {"method": "lora", "r": 2, "max_steps": 3, "batch_size": 8, "max_train_samples": 40,
               "learning_rate": 1e-2, "save_steps": None, "max_score_drop": 100.0, "budget_density_targets": [0.3],
               "target_mlp_up": True, "train_mlp_bias": True}
    recipe = Recipe.build(name="relu", model=str(tiny_checkpoint("bert")), task="glue/sst2", data_dir=str(tiny_data),
                          max_eval_samples=8, eval_batch_size=8,
                          passes=[{"relufy": {"activation": "relu"}}, {"deft": options}])
    report = run_recipe(recipe, output_dir=tmp_path / "relu", quiet=True)
    details = report.steps[2].details
    assert details["within_budget"] is True and [t["value"] for t in details["budget"]["tried"]] == [0.3]
    assert details["budget"]["reference"]["kind"] == "trained here"
    assert json.loads((tmp_path / "relu" / "model" / "config.json").read_text())["hidden_act"] == "relu"


def test_budget_confidence_on_perplexity_is_a_one_line_error(tiny_checkpoint, tiny_data):
    with pytest.raises(RecipeError, match="budget_confidence bootstraps per-row scores; task squad/contexts") as info:
        Recipe.build(model=str(tiny_checkpoint("llama")), task="squad/contexts", data_dir=str(tiny_data),
                     passes=[{"deft": {"method": "lora", "max_score_drop": 5, "budget_confidence": 0.9}}])
    assert "\n" not in str(info.value)
