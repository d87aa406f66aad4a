"""Tasks given by data instead of a GLUE name: local files or a hub dataset, with a column mapping (torch-free).

    task:
      type: classification              # classification | regression
      train: data/train.csv             # a file or folder: .csv, .tsv, .json, .jsonl, .parquet
      validation: data/dev.csv
      text: [premise, hypothesis]       # one or two text columns
      label: label                      # label names (strings) or integers; floats for regression
      metric: accuracy                  # optional: accuracy | f1 | matthews_correlation | pearson | spearmanr

With `dataset: <hub id>` (and optionally `dataset_config`), `train` / `validation` name its splits.
Files are read with `datasets`; the columns and labels are checked when the recipe is validated,
before any model loads. Label names found in the data (sorted, or in the order `labels` gives)
become the saved model's `id2label`, so `transformers.pipeline()` answers with them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from deftcompress.core.config import option
from deftcompress.errors import DataError, RecipeError

FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
METRICS = {"classification": ("accuracy", "f1", "matthews_correlation"), "regression": ("pearson", "spearmanr"),
           "language_modeling": ("perplexity",)}


@dataclass
class DataTask:
    """A task given by data (see the module docstring)."""

    type: Literal["classification", "regression", "language_modeling"] = option(
        "classification", "classification | regression | language_modeling (decoder-only models: causal LM loss, "
                          "perplexity and density over real tokens)")
    train: str | None = option(None, "training data: a file or folder (csv, tsv, json, jsonl, parquet), or a split "
                                     "name of `dataset`; null = no training split (evaluation only)")
    validation: str = option("", "evaluation data, as `train`")
    text: str | list[str] = option("text", "the text column, or two columns for sentence pairs")
    label: str = option("label", "the label column")
    metric: str | None = option(None, "accuracy | f1 | matthews_correlation (classification), pearson | spearmanr "
                                      "(regression); null = accuracy / pearson")
    labels: list[str | int] | None = option(None, "label order (its id2label); null = the sorted labels found in the data")
    dataset: str | None = option(None, "a hub dataset id: train / validation are then its split names")
    dataset_config: str | None = option(None, "the hub dataset's configuration name")
    name: str | None = option(None, "the task's name in reports; null = from the validation file or dataset")

    def problem(self) -> str | None:
        columns = self.columns()
        if not 1 <= len(columns) <= 2 or not all(isinstance(c, str) and c for c in columns):
            return "text must name one or two columns"
        if self.type == "language_modeling" and len(columns) != 1:
            return "language_modeling reads one text column"
        if self.label in columns and self.type != "language_modeling":
            return f"label column {self.label!r} is also a text column"
        if not self.validation:
            return "validation is required (a file, folder or split name)"
        if self.metric is not None and self.metric not in METRICS[self.type]:
            return f"metric {self.metric!r} does not fit {self.type} (use {' or '.join(METRICS[self.type])})"
        if self.labels is not None and (self.type != "classification" or len(set(map(str, self.labels))) < 2):
            return "labels lists at least two distinct labels, for classification only"
        return None

    def columns(self) -> list[str]:
        return [self.text] if isinstance(self.text, str) else list(self.text)


@dataclass
class DataSource:
    """What a TaskSpec built from a DataTask reads: the config, and the label ids found when it was checked."""

    config: DataTask  # relative paths in it are relative to the current directory
    label_ids: dict[Any, int] = field(default_factory=dict)


def _files(spec: str, where: str) -> tuple[str, list[str]]:
    """(datasets builder, files) for a local file or folder."""
    path = Path(spec).expanduser()
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix.lower() in FORMATS and p.is_file())
        kinds = {FORMATS[p.suffix.lower()] for p in found}
        if not found:
            raise RecipeError(f"{where}: folder {path} holds no .csv, .tsv, .json, .jsonl or .parquet file")
        if len(kinds) > 1:
            raise RecipeError(f"{where}: folder {path} mixes file types ({', '.join(sorted(kinds))})")
        return kinds.pop(), [str(p) for p in found]
    if not path.is_file():
        raise RecipeError(f"{where}: {path} not found")
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise RecipeError(f"{where}: {path.name}: unknown data format (use .csv, .tsv, .json, .jsonl or .parquet)")
    return kind, [str(path)]


def _load(cfg: DataTask, split: str, where: str):
    """A `datasets.Dataset` of one split."""
    import datasets

    datasets.disable_progress_bars()
    spec = getattr(cfg, split)
    try:
        if cfg.dataset:
            from deftcompress.data.hub import check_hub_reachable

            check_hub_reachable(f"{where}.dataset: {cfg.dataset}")
            return datasets.load_dataset(cfg.dataset, cfg.dataset_config, split=spec)
        kind, files = _files(spec, f"{where}.{split}")
        kwargs = {"delimiter": "\t"} if files[0].lower().endswith(".tsv") else {}
        return datasets.load_dataset(kind, data_files={"data": files}, split="data", **kwargs)
    except (RecipeError, DataError):
        raise
    except Exception as exc:  # parse errors, network: one line
        what = cfg.dataset or spec
        raise DataError(f"{where}.{split}: cannot read {what} ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from None


def _check_columns(ds, cfg: DataTask, where: str) -> None:
    wanted = cfg.columns() + ([] if cfg.type == "language_modeling" else [cfg.label])
    missing = [c for c in wanted if c not in ds.column_names]
    if missing:
        raise RecipeError(f"{where}: no column {', '.join(map(repr, missing))} (columns: {', '.join(ds.column_names)})")


def describe(cfg: DataTask, where: str) -> tuple[str, int, tuple[str, ...], dict[Any, int]]:
    """Read both splits' labels: (name, number of labels, label names, label -> id). Raises one-line errors."""
    labels_seen: list[Any] = []
    for split in ("validation", "train"):
        if getattr(cfg, split) is None:
            continue
        ds = _load(cfg, split, where)
        if len(ds) == 0:
            raise RecipeError(f"{where}.{split}: no rows")
        _check_columns(ds, cfg, f"{where}.{split}")
        if cfg.type != "language_modeling":
            labels_seen += ds[cfg.label]
    name = cfg.name or ("data:" + (cfg.dataset or Path(cfg.validation).name))
    if cfg.type == "language_modeling":
        return name, 0, (), {}
    if cfg.type == "regression":
        for value in labels_seen:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise RecipeError(f"{where}.label: regression needs numeric labels, found {value!r}")
        return name, 1, (), {}
    if any(v is None for v in labels_seen):
        raise RecipeError(f"{where}.label: some rows have no label")
    odd = next((v for v in labels_seen if isinstance(v, bool) or not isinstance(v, (str, int, float))), None)
    if odd is not None:
        raise RecipeError(f"{where}.label: classification labels are names or integers, found "
                          f"{type(odd).__name__} {str(odd)[:60]}")
    found = sorted(set(labels_seen), key=lambda v: (isinstance(v, str), v if isinstance(v, str) else float(v)))
    if any(isinstance(v, float) and not float(v).is_integer() for v in found):
        raise RecipeError(f"{where}.label: classification labels are names or integers, found {found[:3]}; "
                          "use type: regression for numeric targets")
    order = list(cfg.labels) if cfg.labels is not None else found
    unknown = [v for v in found if v not in order and str(v) not in map(str, order)]
    if unknown:
        raise RecipeError(f"{where}.labels: the data holds labels {unknown[:3]} that labels does not list")
    if len(order) < 2:
        raise RecipeError(f"{where}.label: classification needs at least two labels, found {order}")
    ids = {}
    for i, v in enumerate(order):
        ids[v] = i
        ids[str(v)] = i
    return name, len(order), tuple(str(v) for v in order), ids


def read_split(task, split: str) -> list[dict[str, Any]]:
    """Every example of one split, normalised like the GLUE readers' (text_a, text_b, label)."""
    source: DataSource = task.source
    cfg = source.config
    where = f"task ({task.name})"
    if getattr(cfg, split) is None:
        raise DataError(f"{where}: no {split} data given (task.{split} is null)")
    ds = _load(cfg, split, "task")
    _check_columns(ds, cfg, f"task.{split}")
    columns = cfg.columns()
    out = []
    for n, row in enumerate(ds):
        if cfg.type == "language_modeling":
            text = "" if row[columns[0]] is None else str(row[columns[0]])
            if text.strip():  # blank lines carry no tokens to predict
                out.append({"text_a": text, "text_b": None, "label": None})
            continue
        raw = row[cfg.label]
        if cfg.type == "regression":
            label: Any = float(raw)
        else:
            if raw not in source.label_ids and str(raw) not in source.label_ids:
                raise DataError(f"task.{split}: row {n + 1}: label {raw!r} is not one of {list(task.label_names)}")
            label = source.label_ids.get(raw, source.label_ids.get(str(raw)))
        texts = ["" if row[c] is None else str(row[c]) for c in columns]
        out.append({"text_a": texts[0], "text_b": texts[1] if len(texts) > 1 else None, "label": label})
    return out
