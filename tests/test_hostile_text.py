"""Outside text in Markdown and YAML: hostile model paths, task names and sweep values stay inert values.

Parsed with markdown-it (CommonMark + tables) and PyYAML, never checked by eye: no injected heading,
no raw HTML, no extra table cell, no broken front matter, and each value reads back as it was.
"""

from __future__ import annotations

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from markdown_it import MarkdownIt

from deftcompress.reporting.model_card import model_card
from deftcompress.reporting.report import Report, StepRecord
from deftcompress.reporting.text import md_cell, md_code, md_fence, md_text, one_line, yaml_scalar

HOSTILE = [
    "runs/x\n# Injected heading\n",
    "```\n## pwned\n```",
    "a | b | c",
    "<img src=x onerror=alert(1)>",
    "<script>alert(1)</script>",
    "---\nlibrary_name: evil\n---",
    "name: [1, 2]\nother: {a: b}",
    "'\"\\`*_[x](http://e)~~#",
    "\u2028line\u2029sep\x00\x1b[31m",
    "  ",
]
md = MarkdownIt("commonmark").enable("table")


def _inline_text(tokens) -> str:
    out = []
    for token in tokens:
        for child in token.children or []:
            if child.type in ("text", "code_inline"):
                out.append(child.content)
            elif child.type in ("softbreak", "hardbreak"):
                out.append("\n")
    return "".join(out)


def _no_html(tokens) -> bool:
    return not any(t.type.startswith("html") or any(c.type.startswith("html") for c in t.children or []) for t in tokens)


@pytest.mark.parametrize("value", HOSTILE)
def test_md_text_and_code_show_the_value_literally_in_one_paragraph(value):
    for render in (md_text, md_code):
        tokens = md.parse(f"before {render(value)} after")
        assert [t.type for t in tokens] == ["paragraph_open", "inline", "paragraph_close"], render.__name__
        assert _no_html(tokens)
        shown = _inline_text(tokens)
        if render is md_text:
            assert shown == f"before {one_line(value)} after"
        else:
            assert one_line(value).strip() in shown.replace("\\|", "|")


@given(st.text(max_size=40))
@settings(max_examples=200, deadline=None)
def test_any_text_keeps_a_table_row_at_its_width_and_yaml_reads_it_back(value):
    table = f"| a | b | c |\n|---|---|---|\n| {md_cell(value)} | {md_code(value)} | x |\n"
    tokens = md.parse(table)
    assert sum(t.type == "td_open" for t in tokens) == 3
    assert _no_html(tokens)
    assert yaml.safe_load(f"key: {yaml_scalar(value)}\n") == {"key": value}


def test_a_fence_is_not_closed_by_the_body():
    body = "a: 1\n```\n# not a heading\n````\n"
    tokens = md.parse("\n".join(md_fence(body, "yaml")) + "\nafter\n")
    assert tokens[0].type == "fence" and tokens[0].content == body
    assert not any(t.type == "heading_open" for t in tokens)


def _step(index: int, metric: str) -> StepRecord:
    return StepRecord(index=index, pass_name="deft", task_metric=metric, task_score=0.8, metrics={metric: 0.8},
                      density={"encoder": 0.3, "mode": "masked"}, params=10, nonzero_params=9, size_bytes=40,
                      latency_ms_per_example=1.0, eval_examples=8, eval_seconds=0.1, seconds=0.2)


@pytest.mark.parametrize("value", HOSTILE)
def test_a_model_card_with_hostile_names_keeps_its_shape(value):
    report = Report(name=f"run{value}", model=value, task=value, steps=[_step(0, "accuracy"), _step(1, "accuracy")])
    manifest = {"format": "plain", "load": f"AutoModel.from_pretrained({value!r})"}
    recipe_yaml = yaml.safe_dump({"name": f"run{value}", "model": value, "task": value})
    card = model_card(report, manifest, f"deft > {value}", recipe_yaml)
    assert card.startswith("---\n")
    front, body = card[4:].split("\n---\n", 1)
    meta = yaml.safe_load(front)
    assert "base_model" not in meta  # not a hub id: no hub metadata claims it is one
    assert set(meta) == {"library_name", "metrics", "tags"} and meta["metrics"] == ["accuracy"]
    tokens = md.parse(body)
    assert _no_html(tokens)
    headings = [tokens[i + 1].content for i, t in enumerate(tokens) if t.type == "heading_open"]
    assert len(headings) == 3 and headings[1:] == ["How to load", "Recipe"]
    fences = [t for t in tokens if t.type == "fence"]
    assert len(fences) == 1 and yaml.safe_load(fences[0].content) == yaml.safe_load(recipe_yaml)
    rows = [i for i, t in enumerate(tokens) if t.type == "tr_open"]
    for i in rows:
        cells = 0
        for t in tokens[i + 1:]:
            if t.type == "tr_close":
                break
            cells += t.type in ("td_open", "th_open")
        assert cells == 3


@pytest.mark.parametrize("value", HOSTILE)
def test_report_md_with_hostile_names_keeps_its_shape(value):
    report = Report(name=value, model=value, task=value, steps=[_step(0, value)], status="failed", error=value)
    tokens = md.parse(report.markdown())
    assert _no_html(tokens)
    assert sum(t.type == "heading_open" for t in tokens) == 1
    for table in [i for i, t in enumerate(tokens) if t.type == "table_open"]:
        widths = []
        for t in tokens[table:]:
            if t.type == "table_close":
                break
            if t.type == "tr_open":
                widths.append(0)
            elif t.type in ("td_open", "th_open"):
                widths[-1] += 1
        assert len(set(widths)) == 1


def _row(name: str, task: str = "glue/sst2", metric: str = "accuracy", sweep=None):
    from deftcompress.reporting.compare_tables import CompareRow

    return CompareRow(name=name, folder=f"runs/{name}", passes=f"deft > {name}", task_metric=metric, score=0.8,
                      density_encoder=0.3, density_decoder=None, params=10, nonzero_params=9, size_bytes=40,
                      runtime="torch", sweep=sweep or {"density_target": name}, task=task)


@pytest.mark.parametrize("value", HOSTILE)
def test_compare_md_rows_keep_their_columns_whatever_the_names(value):
    from deftcompress.reporting.compare_tables import markdown

    text = markdown([_row(value), _row("plain")], f"deftcompress compare {value}", None)
    tokens = md.parse(text)
    assert _no_html(tokens) and sum(t.type == "heading_open" for t in tokens) == 1
    widths, current = [], 0
    for t in tokens:
        if t.type == "tr_open":
            current = 0
        elif t.type in ("td_open", "th_open"):
            current += 1
        elif t.type == "tr_close":
            widths.append(current)
    assert len(widths) == 3 and len(set(widths)) == 1


def test_compare_refuses_runs_of_different_tasks_or_metrics_in_one_table():
    from deftcompress.errors import DeftcompressError
    from deftcompress.pipeline.compare_runs import check_one_task

    check_one_task([_row("a"), _row("b")])
    with pytest.raises(DeftcompressError, match=r"one task and metric.*glue/mrpc \(f1\): c"):
        check_one_task([_row("a"), _row("b"), _row("c", "glue/mrpc", "f1")])


def test_card_metadata_names_the_hub_model_of_an_alias_and_the_dataset():
    report = Report(name="r", model="minilm", task="glue/sst2", steps=[_step(0, "accuracy"), _step(1, "accuracy")])
    card = model_card(report, {"format": "plain", "load": "x"}, "deft", "name: r\n")
    meta = yaml.safe_load(card[4:].split("\n---\n", 1)[0])
    assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2" and meta["datasets"] == ["nyu-mll/glue"]
