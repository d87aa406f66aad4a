"""An accuracy budget for DEFT and ADA-DEFT: the most compression whose held-out score stays within it.

With `max_score_drop` set, `deft` and `ada_deft` do not train once. They

1. score a reference on held-out training rows: PEFT trained here first (the same method, budget, data
   order and seed, no density loss, no skipped blocks), or a finished model given by path;
2. search the compression setting, most compressed first, by bisection over the candidates: `deft`
   searches `budget_density_targets`, `ada_deft` searches `skip_blocks` from the recipe's down to 1.
   Each tried point is a whole training from the same incoming model, scored on the same held-out rows.
   The bisection assumes the score falls as compression rises (it reports every point it tried, so a
   user can see where that did not hold);
3. hand on the most compressed model within the budget, or the reference when none is (a trained
   reference; a reference given by path is only scored, so then the least compressed point tried).

Each drop comes with a paired bootstrap's standard error over the held-out rows (per-row scores: not for
perplexity); with `budget_confidence` (e.g. 0.9) a point is within only when that one-sided bound of its drop
is, so a point the rows cannot tell from the budget does not pass.

Nothing is chosen on the recipe's evaluation rows: the held-out rows are `validation_fraction` of the
training rows (0.1 when the recipe leaves it unset), or `budget_held_out_samples` rows of the training split
beyond the `max_train_samples` the trainings use (they keep all their rows; a 1-point budget needs enough
rows to resolve a point: with 128 rows, one row is 0.8 points), optionally only rows of at least
`budget_held_out_min_words` words, when the training split holds shorter pieces than the model will read (SST-2's
training rows are parse-tree phrases, median 7 words; its dev rows are whole sentences). Once the choice is made, the reference and the model
handed on are also scored on the evaluation rows, for the report only (`on_evaluation_rows`): that is the
drop a user will see on dev, which the held-out drop only estimates. Points: the task metric x 100 for metrics in
[0, 1] (accuracy, F1), the metric itself where it is already a percentage (SQuAD), and for perplexity
the percentage above the reference.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

from deftcompress.training.context import TrainingContext
from deftcompress.training.options import REFERENCE

DEFAULT_VALIDATION_FRACTION = 0.1  # held-out rows when the recipe sets none: the budget must not look at dev


def score_drop_points(task, reference: float, score: float) -> float:
    """How far `score` falls below `reference`, in points of the task's metric (see the module docstring)."""
    if not task.higher_is_better:  # perplexity: percent above the reference
        return 100.0 * (score - reference) / reference
    per_unit = 1.0 if task.kind == "qa" else 100.0  # SQuAD's metrics are percentages already
    return per_unit * (reference - score)


BOOTSTRAP_RESAMPLES = 200  # enough for a standard error and a 90th percentile to a tenth of a point


def paired_bootstrap(task, rows: list[dict], reference_predictions: list, predictions: list, confidence: float,
                     seed: int) -> tuple[float, float]:
    """(standard error of the drop in points, its `confidence` one-sided upper bound): both models scored on the same
    resamples of the held-out rows, so what they get right together does not count as noise."""
    import random
    import statistics

    from deftcompress.data.metrics import compute_metrics

    rng = random.Random(seed)
    n, drops = len(rows), []
    for _ in range(BOOTSTRAP_RESAMPLES):
        picked = [rng.randrange(n) for _ in range(n)]
        sample = [rows[i] for i in picked]
        ref = compute_metrics(task, [reference_predictions[i] for i in picked], sample)[task.metric]
        got = compute_metrics(task, [predictions[i] for i in picked], sample)[task.metric]
        drops.append(score_drop_points(task, ref, got))
    drops.sort()
    upper = drops[min(int(confidence * len(drops)), len(drops) - 1)]
    return statistics.stdev(drops), upper


@dataclass
class TriedPoint:
    """One training of the search: its setting, held-out score and density, and the verdict."""

    label: str  # e.g. "density_target 0.3"
    value: Any
    score: float
    density: float | None
    drop_points: float
    within: bool
    seconds: float
    drop_se: float | None = None  # the paired bootstrap's standard error of the drop (None: no per-row scores)
    drop_bound: float | None = None  # its one-sided bound at budget_confidence, when that decides

    def to_dict(self) -> dict[str, Any]:
        out = {"label": self.label, "value": self.value, "held_out_score": round(self.score, 6),
               "held_out_density": round(self.density, 6) if self.density is not None else None,
               "drop_points": round(self.drop_points, 3), "within_budget": self.within,
               "seconds": round(self.seconds, 1)}
        if self.drop_se is not None:
            out["drop_se"] = round(self.drop_se, 3)
        if self.drop_bound is not None:
            out["drop_bound"] = round(self.drop_bound, 3)
        return out


@dataclass
class BudgetSearch:
    """What a pass gives the search: how to train one point, and the candidates, most compressed first."""

    parameter: str  # the searched field, e.g. "density_target"
    candidates: list[Any]
    train: Callable[[TrainingContext, Any], Any]  # (context, value) -> DeftResult
    train_reference: Callable[[TrainingContext], Any] | None  # (context) -> DeftResult; None: reference by path
    reference_path: str | None = None
    tried: list[TriedPoint] = field(default_factory=list)


def search_within_budget(ctx: TrainingContext, max_score_drop: float, search: BudgetSearch,
                         held_out: list[dict], score: Callable | None = None,
                         report_score: Callable | None = None,
                         confidence: float | None = None) -> tuple[Any, dict[str, Any]]:
    """(the DeftResult to hand on, the report's `budget` section); see the module docstring. `score(model)` ->
    (held-out score, held-out density[, per-row predictions]): by default the task metric on `held_out`, with its
    predictions (then each drop gets a paired bootstrap's standard error, and with `confidence` its one-sided bound
    decides the verdict). `report_score(model)` -> the score on the recipe's evaluation rows, reported only: by
    default the task metric there when `score` is the default too (a search by hand with its own `score` reports
    none unless it passes one)."""
    import time

    def task_score_on(rows: list[dict], desc: str):
        from deftcompress.measurement.evaluation import evaluate

        return lambda model: evaluate(model, ctx.tokenizer, ctx.task, rows, ctx.arch, ctx.eval_settings,
                                      progress=not ctx.quiet, desc=desc)

    def held_out_score(model) -> tuple[float, float | None, list | None]:
        ev = task_score_on(held_out, "budget: held-out rows")(model)
        per_row = ev.predictions if ctx.task.kind != "language_modeling" else None  # perplexity: no per-row score
        return ev.task_score, (ev.density.overall() if ev.density else None), per_row

    if score is None:
        score = held_out_score
        if report_score is None:
            evaluation_rows = ctx.eval_examples()
            on_rows = task_score_on(evaluation_rows, "budget: evaluation rows (reported only)")
            report_score = lambda model: (on_rows(model).task_score, len(evaluation_rows))  # noqa: E731

    start = time.perf_counter()
    reference_result = None
    if search.train_reference is not None:
        reference_result = search.train_reference(_point_context(ctx, "reference"))
        ref_score, ref_density, ref_rows = _scored(score(reference_result.model))
        reference = {"kind": "trained here", "held_out_score": round(ref_score, 6),
                     "held_out_density": _round(ref_density), "seconds": round(time.perf_counter() - start, 1)}
        _write_point(ctx, "reference", reference)
    else:
        ref_score, ref_density, ref_rows = _scored(_score_reference_path(ctx, search.reference_path, score))
        reference = {"kind": "given", "path": search.reference_path, "held_out_score": round(ref_score, 6),
                     "held_out_density": _round(ref_density)}

    best_result, least_result = None, None  # only these are kept: a search may try several large models
    lo, hi, best, least = 0, len(search.candidates) - 1, None, None
    while lo <= hi:  # bisection for the first (most compressed) candidate within the budget
        mid = (lo + hi) // 2
        value = search.candidates[mid]
        began = time.perf_counter()
        result = search.train(_point_context(ctx, f"{search.parameter}_{value}"), value)
        s, d, rows = _scored(score(result.model))
        drop = score_drop_points(ctx.task, ref_score, s)
        se = bound = None
        if rows is not None and ref_rows is not None:
            se, bound = paired_bootstrap(ctx.task, held_out, ref_rows, rows, confidence or 0.5, ctx.seed)
            bound = bound if confidence else None
        within = (bound if bound is not None else drop) <= max_score_drop + 1e-9
        search.tried.append(TriedPoint(f"{search.parameter} {value}", value, s, d, drop, within,
                                       time.perf_counter() - began, se, bound))
        _write_point(ctx, f"{search.parameter}_{value}", search.tried[-1].to_dict())
        if within:  # more compressed than any earlier point within
            best, hi, best_result = mid, mid - 1, result
        else:
            lo = mid + 1
        if reference_result is None and (least is None or mid > least):  # the fallback of a reference by path
            least, least_result = mid, result

    if best is not None:
        chosen, chosen_label, within_budget = best_result, f"{search.parameter} {search.candidates[best]}", True
    elif reference_result is not None:
        chosen, chosen_label, within_budget = reference_result, "the reference (no tried point is within the budget)", False
    else:  # a reference by path is not this pass's model to hand on: the least compressed point tried
        chosen, within_budget = least_result, False
        chosen_label = f"{search.parameter} {search.candidates[least]} (the least compressed tried; none within)"
    section = {"max_score_drop": max_score_drop, "metric": ctx.task.metric, "held_out_rows": len(held_out),
               "reference": reference, "parameter": search.parameter, "candidates": list(search.candidates),
               "tried": [t.to_dict() for t in search.tried], "chosen": chosen_label, "within_budget": within_budget,
               "confidence": confidence}
    if report_score is not None:
        section["on_evaluation_rows"] = _scored_on_evaluation_rows(ctx, search, report_score, reference_result,
                                                                   chosen)
    section["seconds"] = round(time.perf_counter() - start, 1)
    return chosen, section


def _write_point(ctx: TrainingContext, name: str, point: dict[str, Any]) -> None:
    """point.json beside the point's adapter as soon as it is scored: a long search shows what it has tried so far
    (and what an interrupted one had) before the pass's report exists."""
    import json

    from deftcompress.core.files import write_atomic

    write_atomic(_point_folder(ctx, name) / "point.json", json.dumps(point, indent=1) + "\n")


def _scored(result: tuple) -> tuple[float, float | None, list | None]:
    """(score, density, per-row predictions or None) from a score function's answer (a search by hand gives two)."""
    return (*result, None) if len(result) == 2 else result


def _scored_on_evaluation_rows(ctx, search: BudgetSearch, report_score: Callable, reference_result,
                               chosen) -> dict[str, Any]:
    """The reference and the handed-on model on the recipe's evaluation rows, after the choice: reported only."""
    if reference_result is not None:
        ref_model = reference_result.model
    else:  # a reference by path was scored and released; load it once more
        from deftcompress.training.distillation import load_teacher

        ref_model = load_teacher(ctx, search.reference_path, where="budget_reference")
    ref_score, rows = report_score(ref_model)
    del ref_model
    chosen_score = ref_score if chosen is reference_result else report_score(chosen.model)[0]
    return {"rows": rows, "reference_score": round(ref_score, 6), "chosen_score": round(chosen_score, 6),
            "drop_points": round(score_drop_points(ctx.task, ref_score, chosen_score), 3),
            "note": "reported only: nothing is chosen on these rows"}


def budget_outcome(steps: list, task) -> dict[str, Any] | None:
    """How the run's last step ends against the first accuracy budget's reference on the evaluation rows (reported,
    never chosen on): the budget is judged on held-out training rows at its own step, so later steps (int8, ONNX) and
    the difference between those rows and the evaluation rows can take the end beyond it. None without a budget
    scored there, or when the last step was scored on other rows."""
    step = next((s for s in steps if ((s.details or {}).get("budget") or {}).get("on_evaluation_rows")), None)
    if step is None:
        return None
    budget, last = step.details["budget"], steps[-1]
    on_rows = budget["on_evaluation_rows"]
    if last.eval_examples != on_rows["rows"]:
        return None
    drop = score_drop_points(task, on_rows["reference_score"], last.task_score)
    return {"budget_step": step.index, "max_score_drop": budget["max_score_drop"], "rows": on_rows["rows"],
            "reference_score": on_rows["reference_score"], "final_step": last.index,
            "final_score": round(last.task_score, 6), "drop_points": round(drop, 3),
            "within_budget": drop <= budget["max_score_drop"] + 1e-9}


def budget_message(section: dict[str, Any], where: str) -> str | None:
    """The one line a pass that ends outside its budget prints (None when it is within)."""
    if section["within_budget"]:
        return None
    best = min(section["tried"], key=lambda t: t["drop_points"], default=None)
    closest = f"; the closest tried point, {best['label']}, fell {best['drop_points']:.2f}" if best else ""
    return (f"{where}: no setting stays within max_score_drop {section['max_score_drop']:g} points of the "
            f"reference on held-out rows{closest}; handing on {section['chosen']} (a longer training, "
            "distill_from: reference or a larger max_score_drop may find one)")


def _point_folder(ctx: TrainingContext, name: str):
    """Where one training of the search keeps its adapter and point.json."""
    return ctx.pass_dir / "budget" / name.replace(" ", "_")


def _point_context(ctx: TrainingContext, name: str) -> TrainingContext:
    """A context for one training of the search: a fresh copy of the incoming model, its own folder, and no step
    checkpoints (a search resumes at the pass's boundary: the store holds one training's state)."""
    folder = _point_folder(ctx, name)
    folder.mkdir(parents=True, exist_ok=True)
    return dataclasses.replace(ctx, model=copy.deepcopy(ctx.model), pass_dir=folder, step_checkpoints=None,
                               pass_name=f"{ctx.pass_name} [{name}]")  # the progress bar says which training


def _score_reference_path(ctx: TrainingContext, path: str, score) -> tuple:
    from deftcompress.training.distillation import load_teacher

    # the teacher's checks: the same task's labels, the same tokenizer
    return score(load_teacher(ctx, path, where="budget_reference"))


def held_out_rows(ctx: TrainingContext, c) -> tuple[list[dict], str]:
    """(the rows the budget is judged on, where they come from): `budget_held_out_samples` rows of the training split
    that no training of the search uses, or else the split `run_deft` trains around (`hold_out` of its rows)."""
    import random

    from deftcompress.errors import DataError
    from deftcompress.training.deft_run import hold_out

    if c.budget_held_out_samples is None:
        rows = hold_out(ctx.train_examples(c.max_train_samples), c.validation_fraction, ctx.seed)[1]
        return rows, f"validation_fraction {c.validation_fraction:g} of the training rows"
    used = {id(row) for row in ctx.train_examples(c.max_train_samples)}  # rows are shared objects of the read split
    unused = [row for row in ctx.train_examples(None) if id(row) not in used]
    longer = ""
    if c.budget_held_out_min_words:
        unused = [row for row in unused if _word_count(row) >= c.budget_held_out_min_words]
        longer = f" of at least {c.budget_held_out_min_words} words"
    if len(unused) < c.budget_held_out_samples:
        raise DataError(f"budget_held_out_samples: {c.budget_held_out_samples} rows asked, but the training split has "
                        f"only {len(unused)}{longer} beyond the {c.max_train_samples} the training uses")
    rows = random.Random(ctx.seed + 11).sample(unused, c.budget_held_out_samples)
    return rows, f"training-split rows{longer} beyond the {c.max_train_samples} the training uses"


def _word_count(row: dict) -> int:
    """Whitespace-separated words of a row's input texts (both of a pair)."""
    return sum(len(text.split()) for text in (row["text_a"], row.get("text_b")) if text)


def with_held_out_rows(c):
    """The pass's config with the held-out fraction the budget needs (the recipe's, or the default); none is needed
    when the budget has rows of its own (`budget_held_out_samples`): then the trainings keep all their rows."""
    if c.validation_fraction or c.budget_held_out_samples is not None:
        return c
    return dataclasses.replace(c, validation_fraction=DEFAULT_VALIDATION_FRACTION)


def _round(value: float | None) -> float | None:
    return round(value, 6) if value is not None else None


# ---- the searches of `deft` and `ada_deft` --------------------------------------------------------


def run_deft_within_budget(ctx: TrainingContext, c, ada: bool = False):
    """`deft` (density targets) or `ada_deft` (skipped blocks) under `c.max_score_drop`: a DeftResult whose details
    carry the search (`budget`) and `within_budget`."""
    from deftcompress.training.deft_run import run_deft
    from deftcompress.training.distillation import frozen, load_teacher

    c = with_held_out_rows(c)
    held_out, held_out_source = held_out_rows(ctx, c)
    teaches = c.distill_from == REFERENCE
    plain = dataclasses.replace(c, density_weight=0.0, train_mlp_bias=False, mlp_bias_lr=None,
                                distill_from=None if teaches else c.distill_from, distill_features=0.0)
    point_config = dataclasses.replace(c, distill_from=None) if teaches else c
    teacher: list = []  # filled once the reference exists

    def train_reference(point_ctx):
        result = run_deft(point_ctx, plain)  # PEFT: no density loss, no gates, the same data order and seed
        if teaches:
            teacher.append(frozen(copy.deepcopy(result.model)))
        return result

    if c.budget_reference is not None and teaches:
        teacher.append(load_teacher(ctx, c.budget_reference, where="distill_from: reference"))
    if ada:
        candidates = list(range(c.skip_blocks, 0, -1))
        search = BudgetSearch(
            "skip_blocks", candidates,
            lambda pc, v: run_deft(pc, point_config, dataclasses.replace(c.gate_settings(), skip_blocks=v), c.gate_lr,
                                   teacher=teacher[0] if teacher else None),
            None if c.budget_reference else train_reference, c.budget_reference)
    else:
        candidates = sorted(c.budget_density_targets)
        search = BudgetSearch(
            "density_target", candidates,
            lambda pc, v: run_deft(pc, dataclasses.replace(point_config, density_target=v),
                                   teacher=teacher[0] if teacher else None),
            None if c.budget_reference else train_reference, c.budget_reference)
    chosen, section = search_within_budget(ctx, c.max_score_drop, search, held_out, confidence=c.budget_confidence)
    section["held_out_source"] = held_out_source
    chosen.details["budget"] = section
    chosen.details["within_budget"] = section["within_budget"]
    message = budget_message(section, ctx.pass_name)
    if message:
        chosen.details.setdefault("warnings", []).append(message)
    return chosen
