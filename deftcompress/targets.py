"""Selecting modules by class name or by a regular expression on their name.

A pattern is either a class name (``Linear`` matches `nn.Linear` and its subclasses, since the
whole method resolution order is compared) or ``re:<regex>``, matched against the full module
name with `re.fullmatch` (``re:.*classifier.*`` matches ``classifier`` and ``classifier.dense``).
Passes that take ``targets`` / ``ignore`` options (magnitude pruning, quantization) share this.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Iterable, Iterator

if TYPE_CHECKING:  # `deftcompress validate` checks patterns without importing torch
    from torch import nn

REGEX_PREFIX = "re:"


def pattern_problem(pattern: str) -> str | None:
    """Why `pattern` is unusable (for config checks), or None."""
    if pattern.startswith(REGEX_PREFIX):
        try:
            re.compile(pattern[len(REGEX_PREFIX):])
        except re.error as exc:
            return f"bad regular expression in {pattern!r}: {exc}"
        return None
    if not pattern.isidentifier():
        return f"{pattern!r} is neither a class name (e.g. Linear) nor 're:<regex>' on module names"
    return None


def patterns_problem(patterns: Iterable[str], field: str) -> str | None:
    for p in patterns:
        problem = pattern_problem(p)
        if problem:
            return f"{field}: {problem}"
    return None


def matches(name: str, module: "nn.Module", patterns: Iterable[str]) -> bool:
    """True if any pattern matches `module` (class name anywhere in its MRO) or `name` (``re:``)."""
    class_names = None
    for pattern in patterns:
        if pattern.startswith(REGEX_PREFIX):
            if re.fullmatch(pattern[len(REGEX_PREFIX):], name):
                return True
        else:
            if class_names is None:
                class_names = {cls.__name__ for cls in type(module).__mro__}
            if pattern in class_names:
                return True
    return False


def select_modules(model: "nn.Module", targets: Iterable[str], ignore: Iterable[str] = ()) -> Iterator[tuple[str, "nn.Module"]]:
    """(name, module) of every module matching `targets` and no `ignore` pattern, in model order."""
    targets, ignore = list(targets), list(ignore)
    for name, module in model.named_modules():
        if name and matches(name, module, targets) and not matches(name, module, ignore):
            yield name, module
