"""The registry of passes: `@register_pass`, lookup by recipe name, and descriptions for `deftcompress passes`.

Built-in passes live in `deftcompress.passes`; other packages can add theirs through the
`deftcompress.passes` entry-point group. Importing a pass module registers it (torch-free: passes
import torch inside `run`).
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import Any

from deftcompress.core.config import describe_fields, did_you_mean
from deftcompress.core.protocol import Constraint, Pass
from deftcompress.errors import RecipeError

_REGISTRY: dict[str, type[Pass]] = {}
_CONSTRAINTS: dict[str, type[Constraint]] = {}
_LOADED = False


def register_pass(cls: type[Pass]) -> type[Pass]:
    if not getattr(cls, "name", None):
        raise TypeError(f"{cls.__name__} needs a `name`")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise TypeError(f"two passes are named {cls.name!r}: {_REGISTRY[cls.name].__module__} and {cls.__module__}")
    _REGISTRY[cls.name] = cls
    return cls


def unregister_pass(name: str) -> None:
    """Remove a pass (tests and notebooks that register temporary passes)."""
    _REGISTRY.pop(name, None)


def register_constraint(cls: type[Constraint]) -> type[Constraint]:
    """Constraints that can be saved with a run's state register here, by `name`, to be restored."""
    _CONSTRAINTS[cls.name] = cls
    return cls


def constraint_class(name: str) -> type[Constraint]:
    _load_builtin_passes()
    if name not in _CONSTRAINTS:
        raise KeyError(f"no constraint named {name!r} is registered")
    return _CONSTRAINTS[name]


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
        raise RecipeError(f"{where}: unknown pass {name[:60]!r}{did_you_mean(name, _REGISTRY)} "
                          f"(known: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name]


def all_passes() -> dict[str, type[Pass]]:
    _load_builtin_passes()
    return dict(sorted(_REGISTRY.items()))


def describe_pass(cls: type[Pass]) -> dict[str, Any]:
    return {"name": cls.name, "summary": cls.summary or (cls.__doc__ or "").strip().splitlines()[0],
            "trains": cls.trains, "changes_model": cls.changes_model, "fields": describe_fields(cls.Config)}
