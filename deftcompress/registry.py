"""The `Pass` protocol and the registry of passes.

A pass is a class with a `name`, a `Config` dataclass (its documented options) and a `run` method
that changes `state.model` and returns what it really did. Passes never import each other: a pass
that binds later ones (a pruning mask that training must keep) leaves a `Constraint` in
`state.constraints`, and later passes honour every constraint there.

Passes register with `@register_pass`. Built-in passes live in `deftcompress.passes`; other packages
can add theirs through the `deftcompress.passes` entry-point group.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from .config import PassConfig, describe_fields, parse_config
from .errors import RecipeError

if TYPE_CHECKING:
    from .pipeline import PipelineState


@dataclass
class PlannedPass:
    """A pass as written in a recipe: its name, its validated config and its class."""

    name: str
    config: Any
    cls: type["Pass"]
    where: str  # location for error messages, e.g. "recipe.yaml: passes[1].deft"


class Pass:
    """Base class of every pass.

    Class attributes:
      name          the key used in recipes
      Config        dataclass of options (subclass of PassConfig; each field has a help text)
      trains        True if the pass updates weights by gradient descent (later constraints matter)
      changes_model False for passes that only measure (the pipeline then reuses the last evaluation)
    """

    name: ClassVar[str]
    Config: ClassVar[type] = PassConfig
    trains: ClassVar[bool] = False
    changes_model: ClassVar[bool] = True
    summary: ClassVar[str] = ""

    def __init__(self, config: Any):
        self.config = config

    @classmethod
    def check_plan(cls, plan: list[PlannedPass], position: int, recipe: Any) -> None:
        """Reject bad combinations before any model loads (raise RecipeError naming plan[position].where)."""

    def eval_settings(self, base: Any) -> Any:
        """Evaluation settings for the measurement after this pass (default: the recipe's)."""
        return base

    def run(self, state: "PipelineState") -> dict[str, Any]:
        """Apply the pass to `state.model` (replace it if needed); return details for the report."""
        raise NotImplementedError


class Constraint:
    """A promise a pass leaves for later passes (e.g. 'these weights stay zero').

    Training passes call `bind` once the trainable model is built, `enforce` after every optimizer
    step, and `release` when they hand the model on.
    """

    name: ClassVar[str] = "constraint"

    def bind(self, model) -> None:  # noqa: D401 - optional hook
        pass

    def enforce(self, model) -> None:
        pass

    def release(self, model) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}


_REGISTRY: dict[str, type[Pass]] = {}
_LOADED = False


def register_pass(cls: type[Pass]) -> type[Pass]:
    if not getattr(cls, "name", None):
        raise TypeError(f"{cls.__name__} needs a `name`")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise TypeError(f"two passes are named {cls.name!r}: {_REGISTRY[cls.name].__module__} and {cls.__module__}")
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtin_passes() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    importlib.import_module("deftcompress.passes")
    for ep in importlib.metadata.entry_points(group="deftcompress.passes"):
        ep.load()


def get_pass(name: str, where: str) -> type[Pass]:
    _load_builtin_passes()
    if name not in _REGISTRY:
        raise RecipeError(f"{where}: unknown pass {name!r} (known: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name]


def all_passes() -> dict[str, type[Pass]]:
    _load_builtin_passes()
    return dict(sorted(_REGISTRY.items()))


def plan_passes(items: list[tuple[str, Any, str]], recipe: Any = None) -> list[PlannedPass]:
    """Validate (name, raw config, where) triples into a plan, including cross-pass checks."""
    plan = []
    for name, raw, where in items:
        cls = get_pass(name, where)
        plan.append(PlannedPass(name=name, config=parse_config(cls.Config, raw, where), cls=cls, where=where))
    for i, planned in enumerate(plan):
        planned.cls.check_plan(plan, i, recipe)
    return plan


def describe_pass(cls: type[Pass]) -> dict[str, Any]:
    return {"name": cls.name, "summary": cls.summary or (cls.__doc__ or "").strip().splitlines()[0], "fields": describe_fields(cls.Config)}
