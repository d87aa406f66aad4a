"""Putting outside text (model paths, task names, sweep values, error messages) into Markdown and YAML.

Every report, card and compare table builds its text from these functions, so a value holding a
newline, back-ticks, `|`, HTML or YAML syntax stays one inert value: it cannot start a heading, end a
code fence, split a table row, inject HTML, or break a card's front matter.
"""

from __future__ import annotations

import re
from typing import Any

# Characters with a meaning inside a line of Markdown (CommonMark lets any ASCII punctuation be escaped);
# `_` inside a word (snake_case names) cannot open emphasis and stays as it is, for readable source.
_MARKDOWN_PUNCTUATION = re.compile(r"([\\`*\[\]|~#]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9]))")
_LINE_BREAKS = re.compile(r"[\r\n\u2028\u2029\x0b\x0c\x85]+")
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")


def one_line(value: Any) -> str:
    """The value as one line of plain characters (line breaks become spaces, control characters go)."""
    return _CONTROL.sub("", _LINE_BREAKS.sub(" ", str(value)))


def md_text(value: Any) -> str:
    """Inline Markdown that shows `value` literally: HTML as entities, Markdown punctuation escaped, one line."""
    text = one_line(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MARKDOWN_PUNCTUATION.sub(r"\\\1", text)


def md_cell(value: Any) -> str:
    """A table cell: like `md_text` (a `|` is escaped, so the row keeps its columns)."""
    return md_text(value)


def md_code(value: Any) -> str:
    """An inline code span holding `value` literally, whatever back-ticks it holds (a `|` is escaped for tables)."""
    text = one_line(value).replace("|", "\\|")
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or not text.strip() else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def md_fence(body: str, info: str = "") -> list[str]:
    """A fenced code block around `body` whose fence no line of `body` can close."""
    longest = max((len(run) for run in re.findall(r"^\s*(`{3,}|~{3,})", body, flags=re.M)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence + info, body.rstrip("\n"), fence]


def yaml_scalar(value: Any) -> str:
    """A YAML double-quoted scalar that reads back as exactly `str(value)`: printable ASCII as it is, every other
    character as a \\u / \\U escape (so no line break, control or astral character reaches the YAML reader raw)."""
    out = []
    for ch in str(value):
        code = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif 0x20 <= code < 0x7F:
            out.append(ch)
        else:
            out.append(f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")
    return '"' + "".join(out) + '"'
