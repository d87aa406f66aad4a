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
from typing import Any, Literal

import yaml

from deftcompress.core.config import option, parse_config
from deftcompress.errors import RecipeError
from deftcompress.core.plan import plan_passes
from deftcompress.core.protocol import PlannedPass
from deftcompress.data.tasks import data_root, get_task

RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


@dataclass
class RecipeSettings:
    """Top-level recipe fields (the `passes` list is handled separately)."""

    name: str = option("run", "run name; outputs go to runs/<name> unless -o/output_dir says otherwise")
    model: str = option("minilm", "alias (minilm = embedded all-MiniLM-L6-v2), local checkpoint folder, or hub id")
    task: str = option("glue/sst2", "glue/<sst2|mrpc|cola|qnli|rte|stsb|mnli> or squad")
    seed: int = option(42, "seed for head initialisation, data sampling and training")
    max_eval_samples: int | None = option(None, "evaluate on the first N rows of the validation split (null: all)")
    data_dir: str | None = option(None, "local data folder (GLUE TSV / SQuAD JSON layout); default $DEFTCOMPRESS_DATA_DIR, else the hub")
    output_dir: str | None = option(None, "where outputs go (default runs/<name>)")
    density_mode: Literal["masked", "paper"] = option("masked", "masked: real tokens only; paper: padding counted, inputs padded to max_seq_length")
    density_tau: float = option(0.01, "also report the fraction of activations with |a| > tau")
    max_seq_length: int = option(128, "tokenizer truncation length (and padding length in paper mode)")
    eval_batch_size: int = option(64, "batch size of evaluation")
    device: str = option("auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:N")

    def check(self) -> str | None:
        if not RUN_NAME.fullmatch(self.name) or self.name in (".", ".."):
            return (f"name: {self.name!r} is not a plain run name (letters, digits, '.', '_', '-'; at most 100 "
                    "characters; no path separators): use output_dir or -o to choose a folder")
        if self.max_eval_samples is not None and self.max_eval_samples < 1:
            return "max_eval_samples must be >= 1 or null"
        if self.max_seq_length < 8:
            return "max_seq_length must be >= 8"
        if self.eval_batch_size < 1:
            return "eval_batch_size must be >= 1"
        if self.density_tau < 0:
            return "density_tau must be >= 0"
        return None


@dataclass
class Recipe:
    settings: RecipeSettings
    plan: list[PlannedPass] = field(default_factory=list)
    source: str = "<python>"

    def __getattr__(self, item: str) -> Any:  # recipe.task, recipe.seed, ... read the settings
        if item in ("settings", "plan", "source"):
            raise AttributeError(item)
        return getattr(self.settings, item)

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Any, source: str = "<python>") -> "Recipe":
        if not isinstance(data, dict):
            raise RecipeError(f"{source}: expected a mapping with name, model, task, passes (got {type(data).__name__})")
        data = dict(data)
        passes = data.pop("passes", None)
        settings: RecipeSettings = parse_config(RecipeSettings, data, source)
        get_task(settings.task, f"{source}: task")
        if passes is None:
            raise RecipeError(f"{source}: passes: required (a list such as [{{evaluate: {{}}}}])")
        if not isinstance(passes, list):
            raise RecipeError(f"{source}: passes: expected a list of one-key mappings, got {passes!r}")
        items = []
        for i, item in enumerate(passes):
            where = f"{source}: passes[{i}]"
            if isinstance(item, str):
                item = {item: {}}
            if not isinstance(item, dict) or len(item) != 1:
                raise RecipeError(f"{where}: expected a one-key mapping {{pass_name: {{options}}}}, got {item!r}")
            (name, config), = item.items()
            if not isinstance(name, str):
                raise RecipeError(f"{where}: pass name must be a string, got {name!r}")
            items.append((name, config, f"{where}.{name}"))
        recipe = cls(settings=settings, source=source)
        recipe.plan = plan_passes(items)
        recipe.check_files()
        return recipe

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Recipe":
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"{path}: recipe file not found")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
            raise RecipeError(f"{where}: invalid YAML ({exc.problem})") from None
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise RecipeError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
        if isinstance(data, dict) and "name" not in data:
            data = {"name": re.sub(r"[^A-Za-z0-9._-]", "_", path.stem).lstrip("._-")[:100] or "run", **data}
        return cls.from_dict(data, source=str(path))

    @classmethod
    def build(cls, passes: list[Any] | None = None, **settings: Any) -> "Recipe":
        """Python API: ``Recipe.build(model="minilm", task="glue/sst2", passes=[{"evaluate": {}}])``."""
        return cls.from_dict({**settings, "passes": passes if passes is not None else [{"evaluate": {}}]})

    # -- checks ----------------------------------------------------------------------------------

    def check_files(self) -> None:
        from deftcompress.core.model_refs import resolve_model_ref

        resolve_model_ref(self.settings.model, f"{self.source}: model")
        root = data_root(self.settings.data_dir)
        if root is not None:
            origin = "data_dir" if self.settings.data_dir else "DEFTCOMPRESS_DATA_DIR"
            if not root.is_dir():
                raise RecipeError(f"{self.source}: {origin}: folder {root} not found")
            task = get_task(self.settings.task)
            if task.kind == "qa":
                needed = root / "squad" / "dev-v1.1.json"
            else:
                needed = root / "glue" / task.glue_name / task.dev_file
            if not needed.is_file():
                raise RecipeError(f"{self.source}: {origin}: {needed} not found (needed by task {task.name})")

    # -- output ----------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe: every default filled in."""
        out = dataclasses.asdict(self.settings)
        out["passes"] = [{p.name: dataclasses.asdict(p.config)} for p in self.plan]
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def output_dir(self, override: str | os.PathLike | None = None) -> Path:
        return Path(override or self.settings.output_dir or Path("runs") / self.settings.name)


def load_recipe(path: str | os.PathLike) -> Recipe:
    return Recipe.from_file(path)
