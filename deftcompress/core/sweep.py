"""Recipe grids: a `sweep:` mapping expands one recipe into several runs (torch-free).

    sweep:
      deft.density_target: [0.3, 0.4, 0.5]     # <pass>.<field>: the only pass of that name
      magnitude_prune.sparsity: [0.3, 0.5]
      passes[2].bits: [4, 8]                   # passes[i].<field>: by position
      seed: [0, 1]                             # a top-level recipe field

expands into the cartesian product of the values, one recipe per point, named after the base name
and the values (`prune_then_deft-sparsity0.3-density_target0.4`). Every key and value is checked
here; each expanded recipe is then checked like any recipe, before anything runs.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import re
from typing import Any

from deftcompress.core.config import short
from deftcompress.errors import RecipeError

MAX_POINTS = 64
MAX_VALUES = 16
_PASS_KEY = re.compile(r"(?:passes\[(\d+)\]|([A-Za-z_][A-Za-z0-9_]*))\.([A-Za-z_][A-Za-z0-9_]*)")
_NOT_SWEPT = ("name", "output_dir", "passes", "sweep")


@dataclasses.dataclass(frozen=True)
class SweepPoint:
    name: str
    values: dict[str, Any]  # sweep key -> value at this point
    data: dict[str, Any]  # the recipe mapping with the values set (no `sweep`)


def _pass_names(passes: list) -> list[str | None]:
    names = []
    for item in passes:
        if isinstance(item, str):
            names.append(item)
        elif isinstance(item, dict) and len(item) == 1:
            names.append(next(iter(item)))
        else:
            names.append(None)
    return names


def _locate(key: str, passes: list, where: str, settings_fields: set[str]) -> tuple[int | None, str]:
    """(index of the pass, field) for a pass key; (None, field) for a top-level field."""
    from deftcompress.core.registry import get_pass

    m = _PASS_KEY.fullmatch(key)
    if m is None:
        if key in settings_fields - set(_NOT_SWEPT):
            return None, key
        raise RecipeError(f"{where}: {key!r} is neither a recipe field nor <pass>.<field> / passes[i].<field>")
    position, pass_name, field = m.groups()
    names = _pass_names(passes)
    if position is not None:
        index = int(position)
        if index >= len(passes) or names[index] is None:
            raise RecipeError(f"{where}: the recipe has no passes[{index}]")
    else:
        found = [i for i, n in enumerate(names) if n == pass_name]
        if not found:
            raise RecipeError(f"{where}: no {pass_name!r} pass in this recipe (passes: {', '.join(map(str, names))})")
        if len(found) > 1:
            raise RecipeError(f"{where}: {len(found)} {pass_name!r} passes; name one as passes[{found[0]}].{field}")
        index = found[0]
    cls = get_pass(names[index], where)
    if cls.Config is None or field not in {f.name for f in dataclasses.fields(cls.Config)}:
        raise RecipeError(f"{where}: {names[index]} has no field {field!r} (see `deftcompress passes`)")
    return index, field


def _label(field: str, value: Any) -> str:
    text = re.sub(r"[^A-Za-z0-9.]+", "_", str(value)).strip("_") or "none"
    return f"{field}{text}"


def expand_sweep(data: dict[str, Any], source: str, settings_fields: set[str]) -> list[SweepPoint]:
    """The recipes a `sweep:` mapping stands for; [one point, the recipe itself] when it has none.

    `settings_fields`: the top-level recipe fields a sweep may vary (the recipe module passes them).
    """
    sweep = data.get("sweep")
    base = {k: v for k, v in data.items() if k != "sweep"}
    if sweep is None:
        return [SweepPoint(name=str(base.get("name", "run")), values={}, data=base)]
    where = f"{source}: sweep"
    if not isinstance(sweep, dict) or not sweep:
        raise RecipeError(f"{where}: expected a mapping of fields to lists of values, got {short(sweep)}")
    passes = base.get("passes")
    if not isinstance(passes, list):
        raise RecipeError(f"{source}: passes: required (a list) for a sweep")
    targets = {}
    for key, values in sweep.items():
        if not isinstance(key, str):
            raise RecipeError(f"{where}: keys must be strings, got {short(key)}")
        if not isinstance(values, list) or not values:
            raise RecipeError(f"{where}.{key}: expected a non-empty list of values, got {short(values)}")
        if len(values) > MAX_VALUES:
            raise RecipeError(f"{where}.{key}: {len(values)} values; at most {MAX_VALUES} per field")
        if any(isinstance(v, (dict, list)) for v in values):
            raise RecipeError(f"{where}.{key}: values must be numbers, strings, booleans or null")
        if len(set(map(repr, values))) != len(values):
            raise RecipeError(f"{where}.{key}: repeated values {short(values)}")
        targets[key] = _locate(key, passes, f"{where}.{key}", settings_fields)
    total = 1
    for values in sweep.values():
        total *= len(values)
    if total > MAX_POINTS:
        raise RecipeError(f"{where}: {total} runs; a sweep expands to at most {MAX_POINTS}")
    fields = [field for _, field in targets.values()]
    labels = {key: (field if fields.count(field) == 1 else key.replace("[", "").replace("]", ""))
              for key, (_, field) in targets.items()}
    points = []
    base_name = str(base.get("name", "run"))
    for combination in itertools.product(*sweep.values()):
        values = dict(zip(sweep, combination))
        point = copy.deepcopy(base)
        for key, value in values.items():
            index, field = targets[key]
            if index is None:
                point[field] = value
                continue
            item = point["passes"][index]
            name = item if isinstance(item, str) else next(iter(item))
            config = {} if isinstance(item, str) else dict(item[name] or {})
            config[field] = value
            point["passes"][index] = {name: config}
        name = "-".join([base_name] + [_label(labels[k], v) for k, v in values.items()])[:100].rstrip("-.")
        point["name"] = name
        if base.get("output_dir"):
            point["output_dir"] = f"{base['output_dir'].rstrip('/')}/{name}"
        points.append(SweepPoint(name=name, values=values, data=point))
    return points
