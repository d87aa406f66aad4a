"""How a task is phrased for text-to-text models (T5) and how their generated answer is read back."""

from __future__ import annotations

import math
from typing import Any

from deftcompress.data.tasks import TaskSpec


def t5_source(task: TaskSpec, ex: dict[str, Any]) -> str:
    if task.kind == "qa":
        return f"question: {ex['text_a']} context: {ex['text_b']}"
    parts = [f"{task.t5_prefix}"]
    texts = [ex["text_a"], ex["text_b"]]
    if task.name == "glue/mnli":  # T5 orders MNLI as hypothesis, premise
        texts = texts[::-1]
    for field, text in zip(task.t5_fields, texts):
        parts.append(f"{field}: {text}")
    return " ".join(parts)


def t5_target(task: TaskSpec, ex: dict[str, Any]) -> str:
    if task.kind == "qa":
        return ex["label"]
    if task.kind == "regression":
        return f"{round(ex['label'] * 5) / 5:.1f}"
    return task.label_names[ex["label"]]


def parse_t5_prediction(task: TaskSpec, text: str) -> Any:
    """Generated text -> prediction in the label space (-1 / NaN when the model said something else)."""
    text = text.strip()
    if task.kind == "qa":
        return text
    if task.kind == "regression":
        try:
            return float(text)
        except ValueError:
            return math.nan
    return task.label_names.index(text) if text in task.label_names else -1


def answer_texts(task: TaskSpec) -> list[str] | None:
    """Every answer a classification or regression task accepts (None for free-form answers: QA)."""
    if task.kind == "qa":
        return None
    if task.kind == "regression":
        return [f"{i / 5:.1f}" for i in range(26)]  # t5_target rounds scores to steps of 0.2 on [0, 5]
    return list(task.label_names)


def max_answer_tokens(tokenizer, task: TaskSpec, free_form_limit: int) -> int:
    """How many tokens generation needs: the longest accepted answer (end token included), or the limit for QA."""
    texts = answer_texts(task)
    if not texts:
        return free_form_limit
    return max(len(tokenizer(t)["input_ids"]) for t in texts)
