"""Task metrics: accuracy, F1, Matthews correlation, Pearson, SQuAD exact match and F1 (torch-free)."""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from typing import Any

from deftcompress.data.tasks import TaskSpec


def compute_metrics(task: TaskSpec, predictions: list[Any], examples: list[dict[str, Any]]) -> dict[str, float]:
    if task.kind == "qa":
        return squad_metrics(predictions, [ex["answers"] for ex in examples])
    labels = [ex["label"] for ex in examples]
    if task.kind == "regression":
        preds = [0.0 if (isinstance(p, float) and math.isnan(p)) else float(p) for p in predictions]
        return {"pearson": pearson(preds, labels), "spearmanr": pearson(_ranks(preds), _ranks(labels))}
    metrics = {"accuracy": sum(int(p == y) for p, y in zip(predictions, labels)) / max(len(labels), 1)}
    if task.metric == "f1" or task.name == "glue/mrpc":
        metrics["f1"] = binary_f1(predictions, labels) if task.num_labels == 2 else macro_f1(predictions, labels, task.num_labels)
    if task.metric == "matthews_correlation" or task.name == "glue/cola":
        metrics["matthews_correlation"] = matthews(predictions, labels)
    return metrics


def _ranks(values: list[float]) -> list[float]:
    """Average ranks (ties share their mean rank), for Spearman's correlation."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def macro_f1(preds: list[int], labels: list[int], num_labels: int) -> float:
    scores = []
    for c in range(num_labels):
        tp = sum(1 for p, y in zip(preds, labels) if p == c and y == c)
        fp = sum(1 for p, y in zip(preds, labels) if p == c and y != c)
        fn = sum(1 for p, y in zip(preds, labels) if p != c and y == c)
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / num_labels


def pearson(x: list[float], y: list[float]) -> float:
    n = len(x)
    if n < 2:
        return 0.0
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else 0.0


def binary_f1(preds: list[int], labels: list[int]) -> float:
    tp = sum(1 for p, y in zip(preds, labels) if p == 1 and y == 1)
    fp = sum(1 for p, y in zip(preds, labels) if p == 1 and y != 1)
    fn = sum(1 for p, y in zip(preds, labels) if p != 1 and y == 1)
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def matthews(preds: list[int], labels: list[int]) -> float:
    tp = sum(1 for p, y in zip(preds, labels) if p == 1 and y == 1)
    tn = sum(1 for p, y in zip(preds, labels) if p == 0 and y == 0)
    fp = sum(1 for p, y in zip(preds, labels) if p == 1 and y == 0)
    fn = sum(1 for p, y in zip(preds, labels) if p != 1 and y == 1)
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denom if denom else 0.0


def _normalize_answer(s: str) -> str:
    # The official SQuAD v1.1 normalisation: lower case, no punctuation, no articles, single spaces.
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _f1(prediction: str, truth: str) -> float:
    p, t = _normalize_answer(prediction).split(), _normalize_answer(truth).split()
    common = Counter(p) & Counter(t)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(t)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(predictions: list[str], answers: list[list[str]]) -> dict[str, float]:
    n = max(len(predictions), 1)
    em = sum(max((float(_normalize_answer(p) == _normalize_answer(a)) for a in golds), default=0.0)
             for p, golds in zip(predictions, answers))
    f1 = sum(max((_f1(p, a) for a in golds), default=0.0) for p, golds in zip(predictions, answers))
    return {"exact_match": 100.0 * em / n, "f1": 100.0 * f1 / n}
