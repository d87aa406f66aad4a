"""Tasks: GLUE and SQuAD v1.1, their data (local files or the hub) and their metrics.

Local layout (``$DEFTCOMPRESS_DATA_DIR`` or the recipe's ``data_dir``):
``glue/<task>/{train,dev}.tsv`` in the GLUE distribution's TSV layout (``dev_matched.tsv`` for
MNLI) and ``squad/{train,dev}-v1.1.json``. With no local folder the hub datasets
``nyu-mll/glue`` and ``rajpurkar/squad`` are used. Without a SQuAD train file, the dev file is
split by article (every 5th article is held out for evaluation) so that no context is shared.

Every example is normalised to a dict: ``text_a``, ``text_b`` (or None), ``label`` (int, float or
the answer text) and, for SQuAD, ``answers`` (all reference answers) and ``id``. ``squad/contexts`` is
language modelling on SQuAD's Wikipedia paragraphs (each once, split by article as above).
"""

from __future__ import annotations

import csv
import json
import os
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from deftcompress.errors import DataError, RecipeError

csv.field_size_limit(sys.maxsize)


@dataclass(frozen=True)
class TaskSpec:
    name: str  # recipe value, e.g. "glue/sst2"
    kind: Literal["classification", "regression", "qa", "language_modeling"]
    metric: str  # the headline metric
    num_labels: int
    tsv_fields: tuple[str, ...] = ()  # header names of text_a, text_b in the GLUE TSV
    tsv_label: str | None = None
    tsv_label_index: int | None = None  # for header-less files (CoLA)
    tsv_text_index: tuple[int, ...] = ()
    hub_fields: tuple[str, ...] = ()
    dev_file: str = "dev.tsv"
    hub_validation: str = "validation"
    label_names: tuple[str, ...] = ()  # TSV label strings (MNLI) and T5 target words
    t5_prefix: str = ""
    t5_fields: tuple[str, ...] = ()  # how T5 names the two inputs
    source: Any = field(default=None, compare=False)  # tasks given by data: own_data.DataSource
    files: Literal["glue", "squad"] = "glue"  # which distribution's files hold the built-in task's rows

    @property
    def higher_is_better(self) -> bool:
        return self.metric != "perplexity"

    @property
    def glue_name(self) -> str:
        return self.name.split("/", 1)[1]


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec("glue/sst2", "classification", "accuracy", 2, ("sentence",), "label", hub_fields=("sentence",),
                 label_names=("negative", "positive"), t5_prefix="sst2", t5_fields=("sentence",)),
        TaskSpec("glue/mrpc", "classification", "f1", 2, ("#1 String", "#2 String"), "Quality",
                 hub_fields=("sentence1", "sentence2"), label_names=("not_equivalent", "equivalent"),
                 t5_prefix="mrpc", t5_fields=("sentence1", "sentence2")),
        TaskSpec("glue/cola", "classification", "matthews_correlation", 2, tsv_label_index=1, tsv_text_index=(3,),
                 hub_fields=("sentence",), label_names=("unacceptable", "acceptable"), t5_prefix="cola", t5_fields=("sentence",)),
        TaskSpec("glue/qnli", "classification", "accuracy", 2, ("question", "sentence"), "label",
                 hub_fields=("question", "sentence"), label_names=("entailment", "not_entailment"),
                 t5_prefix="qnli", t5_fields=("question", "sentence")),
        TaskSpec("glue/rte", "classification", "accuracy", 2, ("sentence1", "sentence2"), "label",
                 hub_fields=("sentence1", "sentence2"), label_names=("entailment", "not_entailment"),
                 t5_prefix="rte", t5_fields=("sentence1", "sentence2")),
        TaskSpec("glue/stsb", "regression", "pearson", 1, ("sentence1", "sentence2"), "score",
                 hub_fields=("sentence1", "sentence2"), t5_prefix="stsb", t5_fields=("sentence1", "sentence2")),
        TaskSpec("glue/mnli", "classification", "accuracy", 3, ("sentence1", "sentence2"), "gold_label",
                 hub_fields=("premise", "hypothesis"), dev_file="dev_matched.tsv", hub_validation="validation_matched",
                 label_names=("entailment", "neutral", "contradiction"), t5_prefix="mnli", t5_fields=("hypothesis", "premise")),
        TaskSpec("squad", "qa", "f1", 0, files="squad"),
        # Language modelling on real text: the Wikipedia paragraphs SQuAD's questions are about, each once, split by
        # article as SQuAD is (perplexity over real tokens; decoder-only models)
        TaskSpec("squad/contexts", "language_modeling", "perplexity", 0, files="squad"),
    )
}


def get_task(name: Any, where: str = "task") -> TaskSpec:
    """The task a recipe's `task:` names: a GLUE name or squad, or a mapping that gives it by data (`own_data`)."""
    if not isinstance(name, str):
        return task_from_data(name, where)
    if name not in TASKS:
        raise RecipeError(f"{where}: unknown task {name[:60]!r} (known: {', '.join(TASKS)}), or a mapping "
                          "{type: classification, train: ..., validation: ..., text: ..., label: ...}")
    return TASKS[name]


_DATA_TASKS: dict[str, TaskSpec] = {}


def task_from_data(config: Any, where: str = "task") -> TaskSpec:
    """A TaskSpec for a task given by data (read and checked once per process and configuration)."""
    import dataclasses

    from deftcompress.core.config import parse_config
    from deftcompress.data.own_data import METRICS, DataSource, DataTask, describe

    cfg = config if isinstance(config, DataTask) else parse_config(DataTask, config, where)
    key = repr(dataclasses.asdict(cfg)) + os.getcwd()
    if key not in _DATA_TASKS:
        name, num_labels, label_names, ids = describe(cfg, where)
        columns = tuple(cfg.columns())
        _DATA_TASKS[key] = TaskSpec(name=name, kind=cfg.type, metric=cfg.metric or METRICS[cfg.type][0],
                                    num_labels=num_labels, label_names=label_names, t5_prefix=cfg.type,
                                    t5_fields=columns, source=DataSource(config=cfg, label_ids=ids))
    return _DATA_TASKS[key]


Split = Literal["train", "validation"]


def data_root(data_dir: str | os.PathLike | None) -> Path | None:
    root = data_dir or os.environ.get("DEFTCOMPRESS_DATA_DIR")
    return Path(root).expanduser() if root else None


def load_examples(task: TaskSpec, split: Split, data_dir: str | os.PathLike | None = None,
                  max_samples: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """Examples of one split; `max_samples` takes a seeded random subset for train, the first rows for validation."""
    return take_examples(read_split(task, split, data_dir), split, max_samples, seed)


def read_split(task: TaskSpec, split: Split, data_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Every example of one split, read and checked."""
    if task.source is not None:  # a task given by data: its own files or hub dataset
        from deftcompress.data import own_data

        examples = own_data.read_split(task, split)
        if not examples:
            raise DataError(f"{task.name} {split}: no examples found")
        return examples
    root = data_root(data_dir)
    if task.files == "squad":
        examples = _squad_local(root, split) if root else _squad_hub(split)
        if task.kind == "language_modeling":
            examples = _contexts(examples)
    else:
        examples = _glue_local(task, root, split) if root else _glue_hub(task, split)
    if not examples:
        raise DataError(f"{task.name} {split}: no examples found")
    return examples


def take_examples(examples: list[dict[str, Any]], split: Split, max_samples: int | None, seed: int) -> list[dict[str, Any]]:
    """The rows a run uses: a seeded random subset of train, the first rows of validation (all if max_samples is None)."""
    if max_samples is None or max_samples >= len(examples):
        return examples
    if split == "train":
        return random.Random(seed).sample(examples, max_samples)
    return examples[:max_samples]


def _glue_local(task: TaskSpec, root: Path, split: Split) -> list[dict[str, Any]]:
    path = root / "glue" / task.glue_name / ("train.tsv" if split == "train" else task.dev_file)
    if not path.is_file():
        raise DataError(f"{path}: file not found (expected the GLUE TSV layout under {root}/glue/{task.glue_name}/)")
    # GLUE TSVs hold bare quotes (QUOTE_NONE) and MRPC starts with a BOM (utf-8-sig).
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    if not rows:
        raise DataError(f"{path}: empty file")
    out = []
    if task.tsv_label_index is not None:  # header-less (CoLA)
        for n, row in enumerate(rows, 1):
            try:
                texts = [row[i] for i in task.tsv_text_index]
                label = row[task.tsv_label_index]
            except IndexError:
                raise DataError(f"{path}:{n}: expected at least {max(task.tsv_text_index) + 1} tab-separated columns") from None
            out.append(_example(task, texts, label, f"{path}:{n}"))
        return out
    header = rows[0]
    wanted = list(task.tsv_fields) + [task.tsv_label]
    missing = [c for c in wanted if c not in header]
    if missing:
        raise DataError(f"{path}: header lacks column(s) {', '.join(missing)} (has: {', '.join(header)})")
    idx = [header.index(c) for c in wanted]
    for n, row in enumerate(rows[1:], 2):
        if len(row) < len(header):
            if not any(row):
                continue
            raise DataError(f"{path}:{n}: expected {len(header)} tab-separated columns, found {len(row)}")
        values = [row[i] for i in idx]
        out.append(_example(task, values[:-1], values[-1], f"{path}:{n}"))
    return out


def _example(task: TaskSpec, texts: list[str], raw_label: Any, where: str) -> dict[str, Any]:
    try:
        if task.kind == "regression":
            label: Any = float(raw_label)
        elif isinstance(raw_label, str) and raw_label in task.label_names and not raw_label.isdigit():
            label = task.label_names.index(raw_label)
        else:
            label = int(raw_label)
            if not 0 <= label < task.num_labels:
                raise ValueError
    except (TypeError, ValueError):
        raise DataError(f"{where}: bad label {raw_label!r} for {task.name}") from None
    return {"text_a": texts[0], "text_b": texts[1] if len(texts) > 1 else None, "label": label}


def _hub_dataset(*args: str, split: str):
    from deftcompress.data.hub import check_hub_reachable

    check_hub_reachable(f"{'/'.join(args)} [{split}]")
    try:
        import datasets

        return datasets.load_dataset(*args, split=split)
    except Exception as exc:  # network, missing dataset: one line for the user
        raise DataError(
            f"could not load {'/'.join(args)} [{split}] from the hub ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
            "set DEFTCOMPRESS_DATA_DIR or data_dir to a local copy"
        ) from None


def _glue_hub(task: TaskSpec, split: Split) -> list[dict[str, Any]]:
    ds = _hub_dataset("nyu-mll/glue", task.glue_name, split="train" if split == "train" else task.hub_validation)
    out = []
    for row in ds:
        texts = [row[f] for f in task.hub_fields]
        out.append({"text_a": texts[0], "text_b": texts[1] if len(texts) > 1 else None,
                    "label": float(row["label"]) if task.kind == "regression" else int(row["label"])})
    return out


def _squad_rows(articles: list[dict], where: str) -> list[dict[str, Any]]:
    out = []
    try:
        for article in articles:
            for para in article["paragraphs"]:
                for qa in para["qas"]:
                    answers = [a["text"] for a in qa["answers"]]
                    out.append({"id": qa["id"], "text_a": qa["question"], "text_b": para["context"],
                                "label": answers[0] if answers else "", "answers": answers})
    except (KeyError, TypeError) as exc:
        raise DataError(f"{where}: not SQuAD v1.1 JSON (missing {exc})") from None
    return out


def _contexts(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each paragraph of a SQuAD split once, in file order, as language-modelling text."""
    seen: dict[str, None] = {}
    for row in rows:
        seen.setdefault(row["text_b"], None)
    return [{"text_a": text, "text_b": None, "label": None} for text in seen]


def _squad_local(root: Path, split: Split) -> list[dict[str, Any]]:
    folder = root / "squad"
    train, dev = folder / "train-v1.1.json", folder / "dev-v1.1.json"
    if not dev.is_file():
        raise DataError(f"{dev}: file not found (expected SQuAD v1.1 JSON under {folder}/)")
    if split == "train" and train.is_file():
        return _squad_rows(_read_json(train)["data"], str(train))
    articles = _read_json(dev).get("data")
    if not isinstance(articles, list):
        raise DataError(f"{dev}: not SQuAD v1.1 JSON (no 'data' list)")
    if train.is_file():
        return _squad_rows(articles, str(dev))
    # No train file: hold out every 5th article for evaluation, train on the rest.
    chosen = [a for i, a in enumerate(articles) if (i % 5 == 4) == (split == "validation")]
    return _squad_rows(chosen, str(dev))


def _read_json(path: Path) -> dict:
    """A SQuAD file: a JSON object with a "data" list of articles."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise DataError(f"{path}: not SQuAD v1.1 JSON (expected an object with a 'data' list of articles, "
                        f"got {type(data).__name__})")
    return data


def _squad_hub(split: Split) -> list[dict[str, Any]]:
    ds = _hub_dataset("rajpurkar/squad", split=split)
    return [{"id": r["id"], "text_a": r["question"], "text_b": r["context"], "label": r["answers"]["text"][0],
             "answers": list(r["answers"]["text"])} for r in ds]
