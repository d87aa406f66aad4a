"""Checking a list of passes before any model loads: configs, then what each pass leaves and needs."""

from __future__ import annotations

from typing import Any

from deftcompress.core.config import parse_config
from deftcompress.core.protocol import FACTS, PlannedPass
from deftcompress.core.registry import get_pass
from deftcompress.errors import RecipeError, raise_all


def plan_passes(items: list[tuple[str, Any, str]]) -> list[PlannedPass]:
    """Validate (name, raw config, where) triples into a plan, including the checks between passes."""
    plan, errors = [], []
    for name, raw, where in items:  # every pass is checked, so that one validation shows every problem
        try:
            cls = get_pass(name, where)
            plan.append(PlannedPass(name=name, config=parse_config(cls.Config, raw, where), cls=cls, where=where))
        except RecipeError as exc:
            errors.append(exc)
    raise_all(errors)
    check_facts(plan)
    return plan


def check_facts(plan: list[PlannedPass]) -> None:
    """Walk the plan with the facts earlier passes left; raise at the first pass whose needs are not met."""
    left: dict[str, tuple[PlannedPass, str]] = {}  # fact -> (the pass that left it, its note)
    for here in plan:
        for need in here.cls.needs(here.config):
            holder = left.get(need.fact)
            if need.present == (holder is not None):
                continue
            earlier, note = holder if holder is not None else (None, "")
            raise RecipeError(need.message.format(here=here.where, earlier=earlier.where if earlier else "no earlier pass",
                                                  note=note or FACTS.get(need.fact, need.fact)))
        for fact, note in here.cls.leaves(here.config).items():
            left[fact] = (here, note)
