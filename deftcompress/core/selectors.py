"""Selecting modules: the one pattern syntax of every `targets` / `ignore` / skip option.

A pattern is one of:

- a class name, written as Python writes classes (``Linear``, ``Embedding``): matches modules of
  that class and its subclasses (the whole method resolution order is compared);
- a module-name component in lower case (``classifier``): matches every module whose dotted name
  has that component (``classifier``, ``classifier.dense``, ``base_model.model.classifier``);
- ``re:<regex>``: matched against the full module name with `re.fullmatch`.

Defaults that must leave task heads alone use `kept_module_patterns()`, built from the architecture
table, so heads are named in one place: the family records.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Iterable, Iterator

from deftcompress.errors import DeftcompressError

if TYPE_CHECKING:  # `deftcompress validate` checks patterns without importing torch
    from torch import nn

REGEX_PREFIX = "re:"
_MAX_PATTERN = 500  # a recipe's regex is user input: keep it short enough to read


def is_class_pattern(pattern: str) -> bool:
    return pattern.isidentifier() and pattern[0].isupper()


def pattern_problem(pattern: str) -> str | None:
    """Why `pattern` is unusable (for config checks), or None."""
    if len(pattern) > _MAX_PATTERN:
        return f"pattern of {len(pattern)} characters (at most {_MAX_PATTERN})"
    if pattern.startswith(REGEX_PREFIX):
        try:
            re.compile(pattern[len(REGEX_PREFIX):])
        except re.error as exc:
            return f"bad regular expression in {pattern!r}: {exc}"
        for probe in _PROBES:  # a pattern that backtracks catastrophically would hang on a module name
            try:
                _fullmatch(pattern, probe)
            except SelectorTimeout:
                return f"regular expression {pattern[:60]!r} takes too long to match (catastrophic backtracking)"
        return None
    if not pattern.isidentifier():
        return (f"{pattern!r} is neither a class name (e.g. Linear), a module-name component (e.g. classifier) "
                "nor 're:<regex>' on module names")
    return None


class SelectorTimeout(DeftcompressError):
    """A `re:` pattern took too long on a module name."""


_PROBES = ("a" * 40 + "!", "x." * 30 + "!", "base_model.model.bert.encoder.layer.11.attention.self.query.lora_A.default")
_TIMEOUT = 0.25  # seconds a single module name may take


def _fullmatch(pattern: str, name: str) -> bool:
    """`re:` patterns run under a time limit (the `regex` module), so no pattern can hang a run."""
    import regex

    try:
        return regex.fullmatch(pattern[len(REGEX_PREFIX):], name, timeout=_TIMEOUT) is not None
    except TimeoutError:
        raise SelectorTimeout(f"{pattern[:60]!r} took more than {_TIMEOUT}s on module name {name[:80]!r}") from None


def patterns_problem(patterns: Iterable[str], field: str) -> str | None:
    for p in patterns:
        problem = pattern_problem(p)
        if problem:
            return f"{field}: {problem}"
    return None


def matches(name: str, module: "nn.Module | None", patterns: Iterable[str]) -> bool:
    """True if any pattern matches `module`'s class (`module` may be None: names only) or its `name`."""
    class_names = None
    parts = None
    for pattern in patterns:
        if pattern.startswith(REGEX_PREFIX):
            if _fullmatch(pattern, name):
                return True
        elif is_class_pattern(pattern):
            if module is None:
                continue
            if class_names is None:
                class_names = {cls.__name__ for cls in type(module).__mro__}
            if pattern in class_names:
                return True
        else:
            if parts is None:
                parts = name.split(".")
            if pattern in parts:
                return True
    return False


def select_modules(model: "nn.Module", targets: Iterable[str], ignore: Iterable[str] = ()) -> Iterator[tuple[str, "nn.Module"]]:
    """(name, module) of every module matching `targets` and no `ignore` pattern, in model order."""
    targets, ignore = list(targets), list(ignore)
    for name, module in model.named_modules():
        if name and matches(name, module, targets) and not matches(name, module, ignore):
            yield name, module


def kept_module_patterns() -> list[str]:
    """Module-name components of every family's task heads, pooler and LM head (never pruned or quantized by default)."""
    from deftcompress.architecture.spec import kept_module_names

    return list(kept_module_names())
