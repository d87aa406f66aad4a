"""Recipes: a model, a task and an ordered list of passes, read from YAML or built in Python.

Everything is checked here, before any model loads: unknown keys, wrong types, unknown passes,
bad pass combinations, missing files. Errors name the file and the field path.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from deftcompress.core.config import EVAL_BATCH_SIZE, MAX_SEQ_LENGTH, option, out_of_range, parse_config, short
from deftcompress.errors import RecipeError, raise_all
from deftcompress.core.plan import plan_passes
from deftcompress.core.protocol import PlannedPass
from deftcompress.data.own_data import DataTask
from deftcompress.data.tasks import data_root, get_task

RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
MAX_RECIPE_BYTES = 1 << 20
MAX_ALIASES = 50  # anchors are fine for sharing options; a "billion laughs" is not
DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d{1,2})?")


class _RecipeLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (YAML would keep the last silently) and alias bombs."""

    def __init__(self, stream):
        super().__init__(stream)
        self._aliases = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                event = self.peek_event()
                raise yaml.MarkedYAMLError(problem=f"more than {MAX_ALIASES} aliases (*name): refusing to expand them",
                                           problem_mark=event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: construct_mapping reports it
                break
            if duplicate:
                raise yaml.MarkedYAMLError(problem=f"duplicate key {str(key)[:60]!r}", problem_mark=key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


@dataclass
class RecipeSettings:
    """Top-level recipe fields (the `passes` list is handled separately)."""

    ALSO_KNOWN: ClassVar[tuple[str, ...]] = ("passes", "sweep")  # top-level keys read outside these settings

    name: str = option("run", "run name; outputs go to runs/<name> unless -o/output_dir says otherwise")
    model: str = option("minilm", "alias (minilm = embedded all-MiniLM-L6-v2), local checkpoint folder, or hub id")
    task: str | DataTask = option(
        "glue/sst2", "glue/<sst2|mrpc|cola|qnli|rte|stsb|mnli>, squad, or your own data: a mapping {type: classification "
                     "| regression, train: <file or folder>, validation: ..., text: <column or [two columns]>, label: "
                     "<column>} (csv, tsv, json, jsonl, parquet; or dataset: <hub id> with split names)")
    seed: int = option(42, "seed for head initialisation, data sampling and training")
    max_eval_samples: int | None = option(None, "evaluate on the first N rows of the validation split (null: all)")
    data_dir: str | None = option(None, "local data folder (GLUE TSV / SQuAD JSON layout); default $DEFTCOMPRESS_DATA_DIR, else the hub")
    output_dir: str | None = option(None, "where outputs go (default runs/<name>)")
    density_mode: Literal["masked", "paper"] = option("masked", "masked: real tokens only; paper: padding counted, inputs padded to max_seq_length")
    density_tau: float = option(0.01, "also report the fraction of activations with |a| > tau")
    max_seq_length: int = option(128, "tokenizer truncation length (and padding length in paper mode)")
    eval_batch_size: int = option(64, "batch size of evaluation")
    latency_repeats: int = option(
        3, "after each step, time the model on a fixed workload (batch 1 on 8 rows, eval_batch_size on one batch, "
           "each padded to its longest row) this many times and report the median; 0 = off. Compare runs with "
           "`deftcompress compare`, which times them side by side")
    device: str = option("auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:N")

    def problem(self) -> str | None:
        if not 0 <= self.seed < 2**32:
            return f"seed must be in [0, 2**32), got {self.seed}"
        if not DEVICE.fullmatch(self.device):
            return f"device: {self.device[:40]!r} is not auto, cpu, mps, cuda or cuda:N"
        bounded = out_of_range("max_seq_length", self.max_seq_length, MAX_SEQ_LENGTH) or \
            out_of_range("eval_batch_size", self.eval_batch_size, EVAL_BATCH_SIZE)
        if bounded:
            return bounded
        if not RUN_NAME.fullmatch(self.name) or self.name in (".", ".."):
            return (f"name: {self.name[:60]!r} is not a plain run name (letters, digits, '.', '_', '-'; at most 100 "
                    "characters; no path separators): use output_dir or -o to choose a folder")
        if self.max_eval_samples is not None and self.max_eval_samples < 1:
            return "max_eval_samples must be >= 1 or null"
        if self.density_tau < 0:
            return "density_tau must be >= 0"
        if not 0 <= self.latency_repeats <= 100:
            return "latency_repeats must be in [0, 100]"
        return None


@dataclass
class Recipe:
    settings: RecipeSettings
    plan: list[PlannedPass] = field(default_factory=list)
    source: str = "<python>"
    trust_pickle: bool = False  # load a pickle-only checkpoint (`--trust-pickle`); never a recipe field
    sweep_values: dict[str, Any] = field(default_factory=dict)  # the point of a `sweep:` this recipe is
    sweep_source: str | None = None  # the file that declared the sweep
    sweep_name: str | None = None  # the sweep's own name (its runs are named after it and their values)

    def __getattr__(self, item: str) -> Any:  # recipe.task, recipe.seed, ... read the settings
        if item in ("settings", "plan", "source", "trust_pickle", "sweep_values", "sweep_source", "sweep_name"):
            raise AttributeError(item)
        return getattr(self.settings, item)

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Any, source: str = "<python>", trust_pickle: bool = False) -> "Recipe":
        if not isinstance(data, dict):
            raise RecipeError(f"{source}: expected a mapping with name, model, task, passes (got {type(data).__name__})")
        data = dict(data)
        passes = data.pop("passes", None)
        errors: list[RecipeError] = []  # the settings and every pass are checked, so one validation shows all
        settings: RecipeSettings | None = None
        try:
            settings = parse_config(RecipeSettings, data, f"{source}: recipe")  # "r.yaml: recipe.modle: ..."
            get_task(settings.task, f"{source}: task")
        except RecipeError as exc:
            errors.append(exc)
        items = []
        try:
            items = _pass_items(passes, source)
            plan = plan_passes(items)
        except RecipeError as exc:
            errors.append(exc)
        if settings is not None and not errors:
            task = get_task(settings.task)
            errors += [RecipeError(f"{p.where}: {problem}") for p in plan
                       if (problem := p.cls.task_problem(p.config, task))]
        raise_all(errors)
        recipe = cls(settings=settings, source=source, trust_pickle=trust_pickle)
        recipe.plan = plan
        recipe.check_files()
        return recipe

    @classmethod
    def from_file(cls, path: str | os.PathLike, trust_pickle: bool = False, data_dir: str | None = None) -> "Recipe":
        """One recipe; a file that declares a `sweep:` is refused (`all_from_file` expands it)."""
        recipes = cls.all_from_file(path, trust_pickle=trust_pickle, data_dir=data_dir)
        if len(recipes) != 1 or recipes[0].sweep_values:
            raise RecipeError(f"{path}: declares a sweep of {len(recipes)} runs; run it with `deftcompress compare {path}`")
        return recipes[0]

    @classmethod
    def all_from_file(cls, path: str | os.PathLike, trust_pickle: bool = False,
                      data_dir: str | None = None) -> list["Recipe"]:
        """The recipe of a file, or every recipe its `sweep:` expands to (each checked before any is returned).
        `data_dir` (the CLI's --data-dir) takes the place of the recipe's own, before anything is checked."""
        from deftcompress.core.sweep import expand_sweep

        data = _read_yaml(Path(path))

        def flag(d: Any) -> Any:  # the CLI's --data-dir wins over the recipe's data_dir, swept or not
            return {**d, "data_dir": str(data_dir)} if data_dir and isinstance(d, dict) else d

        data = flag(data)
        if isinstance(data, dict) and "name" not in data:
            data = {"name": re.sub(r"[^A-Za-z0-9._-]", "_", Path(path).stem).lstrip("._-")[:100] or "run", **data}
        if not isinstance(data, dict) or "sweep" not in data:
            return [cls._from_dict_guarded(data, str(path), trust_pickle)]
        recipes = []
        for point in expand_sweep(data, str(path), {f.name for f in dataclasses.fields(RecipeSettings)}):
            where = f"{path} [{', '.join(f'{k}={v}' for k, v in point.values.items())}]"
            recipe = cls._from_dict_guarded(flag(point.data), where, trust_pickle)
            recipe.sweep_values = dict(point.values)
            recipe.sweep_source = str(path)
            recipe.sweep_name = str(data["name"])
            recipes.append(recipe)
        return recipes

    @classmethod
    def _from_dict_guarded(cls, data: Any, source: str, trust_pickle: bool) -> "Recipe":
        try:
            return cls.from_dict(data, source=source, trust_pickle=trust_pickle)
        except RecursionError:
            raise RecipeError(f"{source}: a value is nested too deeply") from None

    @classmethod
    def build(cls, passes: list[Any] | None = None, **settings: Any) -> "Recipe":
        """Python API: ``Recipe.build(model="minilm", task="glue/sst2", passes=[{"evaluate": {}}])``."""
        return cls.from_dict({**settings, "passes": passes if passes is not None else [{"evaluate": {}}]})

    # -- checks ----------------------------------------------------------------------------------

    def check_files(self) -> None:
        from deftcompress.core.model_refs import resolve_model_ref

        resolve_model_ref(self.settings.model, f"{self.source}: model", trust_pickle=self.trust_pickle)
        if isinstance(self.settings.task, DataTask):  # its files were read and checked by get_task
            trainers = [p.where for p in self.plan if p.cls.needs_train_data(p.config)]
            if trainers and self.settings.task.train is None:
                raise RecipeError(f"{self.source}: task.train: null, but {trainers[0]} trains")
            return
        root = data_root(self.settings.data_dir)
        if root is None:
            return
        origin = "data_dir" if self.settings.data_dir else "DEFTCOMPRESS_DATA_DIR"
        if not root.is_dir():
            raise RecipeError(f"{self.source}: {origin}: folder {root} not found")
        task = get_task(self.settings.task)
        squad = task.files == "squad"
        needed = {f"task {task.name}": root / "squad" / "dev-v1.1.json" if squad else root / "glue" / task.glue_name / task.dev_file}
        trainers = [p.where for p in self.plan if p.cls.needs_train_data(p.config)]
        if trainers and not squad:  # SQuAD without a train file trains on part of the dev articles
            needed[trainers[0]] = root / "glue" / task.glue_name / "train.tsv"
        for user, path in needed.items():
            if not path.is_file():
                raise RecipeError(f"{self.source}: {origin}: {path} not found (needed by {user})")

    # -- output ----------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe: every default filled in."""
        out = dataclasses.asdict(self.settings)
        out["passes"] = [{p.name: dataclasses.asdict(p.config)} for p in self.plan]
        return out

    def passes_label(self) -> str:
        """The passes in a few characters each: `prune30 > deft(lora) > int8`."""
        return " > ".join(p.cls.label(p.config) for p in self.plan)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def output_dir(self, override: str | os.PathLike | None = None) -> Path:
        return Path(override or self.settings.output_dir or Path("runs") / self.settings.name)


def _pass_items(passes: Any, source: str) -> list[tuple[str, Any, str]]:
    """(name, raw config, where) for each entry of a recipe's `passes:` list, its shape checked."""
    if passes is None:
        raise RecipeError(f"{source}: passes: required (a list such as [{{evaluate: {{}}}}])")
    if not isinstance(passes, list):
        raise RecipeError(f"{source}: passes: expected a list of one-key mappings, got {short(passes)}")
    items = []
    for i, item in enumerate(passes):
        where = f"{source}: passes[{i}]"
        if isinstance(item, str):
            item = {item: {}}
        if not isinstance(item, dict) or len(item) != 1:
            raise RecipeError(f"{where}: expected a one-key mapping {{pass_name: {{options}}}}, got {short(item)}")
        (name, config), = item.items()
        if not isinstance(name, str):
            raise RecipeError(f"{where}: pass name must be a string, got {short(name)}")
        items.append((name, config, f"{where}.{name}"))
    return items


def load_recipe(path: str | os.PathLike) -> Recipe:
    return Recipe.from_file(path)


def _read_yaml(path: Path) -> Any:
    """A recipe file's YAML, read safely (size bound, duplicate keys and alias bombs refused)."""
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise RecipeError(f"{path}: {path.stat().st_size} bytes; a recipe is at most {MAX_RECIPE_BYTES} bytes")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_RecipeLoader)  # noqa: S506 (safe: a SafeLoader)
    except RecursionError:
        raise RecipeError(f"{path}: invalid YAML (nested too deeply)") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise RecipeError(f"{where}: invalid YAML ({exc.problem})") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: invalid YAML ({str(exc).splitlines()[0][:200]})") from None
    return data
