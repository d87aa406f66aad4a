"""Typed config dataclasses, checked field by field.

Every pass declares its options as a dataclass of `PassConfig`; each field carries a `help`
string in its metadata, which `deftcompress passes` prints. `parse_config` turns a YAML mapping
into that dataclass and rejects unknown keys and wrong types with the field path in the message;
a config's `problem()` method, if it has one, checks fields against each other.
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
import types
import typing
from typing import Any, Literal, Union

from deftcompress.errors import RecipeError


# Bounds several option groups share, checked by `out_of_range` (one place each).
MAX_SEQ_LENGTH = (8, 8192)  # the shortest useful truncation; the longest any supported model takes
EVAL_BATCH_SIZE = (1, 65536)


def out_of_range(name: str, value: int | None, bounds: tuple[int, int], nullable: bool = False) -> str | None:
    """The problem with `value` for a bounded option (None when it is within `bounds`, or null where allowed)."""
    low, high = bounds
    if value is None and nullable:
        return None
    if value is None or not low <= value <= high:
        return f"{name} must be in [{low}, {high}]{' or null' if nullable else ''}, got {value}"
    return None


def option(default: Any, help: str, timing_only: bool = False, **kwargs: Any) -> Any:
    """A dataclass field with a help text (lists and dicts get a fresh copy per instance). `timing_only`: the field
    changes what is timed, never a score or a model, so it is left out of the recipe's hash (a finished run stays
    finished when only such a field changes)."""
    metadata = {"help": help, "timing_only": timing_only}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


@dataclasses.dataclass
class PassConfig:
    """Base class for pass configs (empty: a pass with no options)."""


_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxlevel = 60, 60, 4, 4, 2


def short(value: Any) -> str:
    """A bounded repr for error messages: a value can be huge (a YAML alias bomb) or very long."""
    return _SHORT.repr(value)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`; return it (ints become floats where a float is expected)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise RecipeError(f"{where}: expected one of {_type_name(tp)}, got {short(value)}")
    if origin in (Union, types.UnionType):
        if isinstance(value, dict):  # a mapping where a dataclass fits: its own field-by-field errors
            nested = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
            if len(nested) == 1:
                return parse_config(nested[0], value, where)
        errors = []
        for arg in typing.get_args(tp):
            try:
                return coerce(value, arg, where)
            except RecipeError as exc:
                errors.append(exc)
        raise RecipeError(f"{where}: expected {_type_name(tp)}, got {short(value)}")
    if tp is type(None):
        if value is None:
            return None
        raise RecipeError(f"{where}: expected null, got {short(value)}")
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise RecipeError(f"{where}: expected {_type_name(tp)}, got {short(value)}")
        (item_tp,) = typing.get_args(tp)[:1] or (Any,)
        return [coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a mapping, got {short(value)}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise RecipeError(f"{where}: expected a finite number, got {value}")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif dataclasses.is_dataclass(tp):
        return parse_config(tp, value, where)
    else:
        raise TypeError(f"unsupported config annotation {tp!r} at {where}")
    raise RecipeError(f"{where}: expected {_type_name(tp)}, got {short(value)}")


def did_you_mean(word: Any, choices) -> str:
    """' (did you mean X?)' for the closest of `choices` to a misspelt `word`, or ''."""
    import difflib

    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.7)
    return f" (did you mean {close[0]!r}?)" if close else ""


def parse_config(cls: type, data: Any, where: str) -> Any:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types raise RecipeError naming `where`."""
    if data is None:
        data = {}
    if dataclasses.is_dataclass(data) and isinstance(data, cls):
        data = dataclasses.asdict(data)
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping of options, got {short(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        names = [*fields, *getattr(cls, "ALSO_KNOWN", ())]  # keys read elsewhere (a recipe's passes, sweep)
        known = ", ".join(names) or "(none)"
        raise RecipeError(f"{where}.{str(unknown[0])[:60]}: unknown option{did_you_mean(unknown[0], names)} "
                          f"(known: {known})")
    values = {}
    for name, f in fields.items():
        if name in data:
            values[name] = coerce(data[name], hints[name], f"{where}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecipeError(f"{where}.{name}: required option is missing")
    config = cls(**values)
    problem = getattr(config, "problem", None)  # a config's own cross-field check: None or what is wrong
    if callable(problem):
        found = problem()
        if found:
            raise RecipeError(f"{where}: {found}")
    return config


def describe_fields(cls: type) -> list[dict[str, str]]:
    """Name, type, default and help of each field, for `deftcompress passes`."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        rows.append({"name": f.name, "type": _type_name(hints[f.name]), "default": default, "help": f.metadata.get("help", "")})
    return rows
