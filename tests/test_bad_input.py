"""Bad input gets a one-line error, a non-zero exit, no traceback, and nothing written, in seconds.

The contract, for recipes, checkpoints, data and output folders:

* exactly one line starting with ``error:``, naming what is wrong and where (the recipe file and
  the field path, or the data / checkpoint / output path), with no traceback and no other noise;
* exit 2 for bad input found before any model loads, 1 for faults found at run time;
* nothing written: the output folder is not created, no file appears anywhere;
* fast: seconds, also for hostile input (YAML alias bombs, deep nesting, huge values).

Recipes are checked with hypothesis: a GOOD recipe (which must validate) is mutated into bad
ones. Data, checkpoints and output folders are table-driven. A few cases run in a real process
(`deftcompress` from the venv), where crashes, hangs and stray output would show.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from deftcompress.cli import main as cli_main

CONSOLE_SCRIPT = str(Path(sys.executable).parent / "deftcompress")
MAX_SECONDS = 10  # per recipe check
MAX_OUTPUT = 2000  # characters: one line, with bounded values in it
# Lines that must never accompany the error line (progress text may, for runtime faults).
NOISE = re.compile(r"Traceback|[Ww]arning|Exception|^\s+File \"|^Usage:|^Try '|^Error:|Some weights of")


# ---- the one-line-error check ---------------------------------------------------------------


def error_line(output: str, *, exit_code: int | None, codes: tuple[int, ...], exception: BaseException | None = None,
               progress_ok: bool = False, max_chars: int = MAX_OUTPUT, several: bool = False) -> str:
    """Assert `output` is one `error:` line (and nothing else, unless progress_ok); return that line. `several`:
    `validate` lists every problem of a recipe, one `error:` line each (returned joined)."""
    assert exception is None or isinstance(exception, SystemExit), (
        f"uncaught {type(exception).__name__}: {exception!s:.300}\n--- output ---\n{output[-2000:]}")
    assert "Traceback" not in output, output[-3000:]
    assert exit_code in codes, f"exit {exit_code}, expected one of {codes}\n--- output ---\n{output[-2000:]}"
    lines = [line for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 or (several and errors), \
        f"expected exactly one 'error:' line, got {len(errors)}\n--- output ---\n{output[-2000:]}"
    others = [line for line in lines if not line.startswith("error:")]
    if progress_ok:
        noisy = [line for line in others if NOISE.search(line)]
        assert not noisy, f"noise besides the error line: {noisy[:5]}"
    else:
        assert not others, f"output besides the error line: {others[:5]}"
    assert len(output) < max_chars * len(errors), f"output of {len(output)} characters (at most {max_chars} a line): {output[:300]}..."
    return "\n".join(errors)


def check_result(result, *, codes: tuple[int, ...] = (2,), progress_ok: bool = False,
                 max_chars: int = MAX_OUTPUT, several: bool = False) -> str:
    line = error_line(result.output, exit_code=result.exit_code, codes=codes, exception=result.exception,
                      progress_ok=progress_ok, max_chars=max_chars, several=several)
    assert "ok:" not in result.stdout, result.stdout
    return line


def invoke(args: list[str]):
    """In-process CLI call; returns (result, seconds)."""
    start = time.monotonic()
    result = CliRunner().invoke(cli_main, args, catch_exceptions=True)
    return result, time.monotonic() - start


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def q(value) -> str:
    """A YAML double-quoted scalar (JSON strings are valid YAML)."""
    return json.dumps(str(value))


@pytest.fixture
def model_loads(monkeypatch):
    """Calls of load_model_and_tokenizer during the test: none may happen before an exit-2 error."""
    import deftcompress.models.loading as loading
    import deftcompress.pipeline.runner as runner

    calls: list[str] = []
    real = loading.load_model_and_tokenizer

    def spy(*args, **kwargs):
        calls.append(str(args[0]) if args else str(kwargs.get("ref")))
        return real(*args, **kwargs)

    monkeypatch.setattr(loading, "load_model_and_tokenizer", spy)
    if hasattr(runner, "load_model_and_tokenizer"):
        monkeypatch.setattr(runner, "load_model_and_tokenizer", spy)
    return calls


# ---- recipes: the GOOD baseline and its mutations ---------------------------------------------

# Options that make each pass valid on the tiny bert; mutations change one thing on top.
PASS_BASE: dict[str, dict[str, str]] = {
    "evaluate": {},
    "deft": {"max_steps": "1", "batch_size": "4"},
    "magnitude_prune": {"sparsity": "0.5"},
    "quantize": {"backend": "torch_int8"},
    "structured_prune": {"mlp_ratio": "0.5"},
}


@dataclass
class Ctx:
    model: Path
    data: Path
    marker: Path  # must never be created


def recipe_yaml(ctx: Ctx, top: dict[str, str] | None = None, extra: str = "", passes: str | None = None,
                pass_name: str = "evaluate", opts: dict[str, str] | None = None, drop: tuple[str, ...] = ()) -> str:
    """The GOOD recipe, with top-level fields replaced / added / dropped and the passes block replaced."""
    fields = {"name": "t", "model": q(ctx.model), "task": "glue/sst2", "data_dir": q(ctx.data)}
    fields.update(top or {})
    lines = [f"{k}: {v}" for k, v in fields.items() if k not in drop]
    if extra:
        lines.append(extra)
    if passes is None:
        passes = pass_block(pass_name, opts)
    if passes:
        lines.append(passes)
    return "\n".join(lines) + "\n"


def pass_block(name: str, opts: dict[str, str] | None = None) -> str:
    options = {**PASS_BASE.get(name, {}), **(opts or {})}
    if not options:
        return f"passes:\n  - {name}: {{}}"
    return f"passes:\n  - {name}:\n" + "\n".join(f"      {k}: {v}" for k, v in options.items())


@dataclass
class Case:
    label: str
    make: Callable[[Ctx], bytes | str] = field(repr=False)
    needles: tuple[str, ...] = ()  # besides the recipe path, the error line names these (field path parts)
    max_chars: int = MAX_OUTPUT

    def __repr__(self) -> str:
        return f"Case({self.label!r})"

    def content(self, ctx: Ctx) -> bytes:
        data = self.make(ctx)
        return data.encode("utf-8") if isinstance(data, str) else data


TOP_FIELDS = {"name": "str", "model": "str", "task": "str", "seed": "int", "max_eval_samples": "int?",
              "density_mode": "lit", "density_tau": "float", "max_seq_length": "int", "eval_batch_size": "int",
              "device": "str"}
PASS_FIELDS = {
    "deft": {"r": "int", "lora_alpha": "float", "learning_rate": "float", "batch_size": "int", "max_steps": "int?",
             "method": "lit", "target_modules": "strlist?", "density_target": "float?"},
    "magnitude_prune": {"sparsity": "float", "scope": "lit", "targets": "strlist"},
    "quantize": {"backend": "lit"},
    "structured_prune": {"mlp_ratio": "float", "round_to": "int"},
}
WRONG = {
    "str": ["123", "1.5", "true", "[a, b]", "{a: 1}", "null", "2001-12-14", "!!binary aGVsbG8="],
    "int": ['"8"', "8.5", "true", "[8]", "{a: 1}", "null", "abc", "2001-12-14", ".inf"],
    "int?": ['"8"', "8.5", "true", "[8]", "{a: 1}", "abc", ".nan"],
    "float": ['"0.5"', "true", "[0.5]", "{a: 1}", "null", "abc", "!!set {a}"],
    "float?": ['"0.5"', "true", "[0.5]", "{a: 1}", "abc"],
    "lit": ["3", "bogus_choice", "[x]", "{a: 1}", "null", "true"],
    "strlist": ["5", "true", "[1, 2]", "{a: 1}", "[[query]]", "null", "[null]"],
    "strlist?": ["5", "true", "[1, 2]", "{a: 1}", "[[query]]", "[null]"],
}


def top_case(label: str, fld: str, value: str, needles: tuple[str, ...] | None = None) -> Case:
    return Case(f"{label}: {fld}: {value[:40]}", lambda c: recipe_yaml(c, top={fld: value}),
                (fld,) if needles is None else needles)


def pass_case(label: str, pass_name: str, fld: str, value: str) -> Case:
    return Case(f"{label}: {pass_name}.{fld}: {value[:40]}",
                lambda c: recipe_yaml(c, pass_name=pass_name, opts={fld: value}), ("passes[0]", pass_name, fld))


def wrong_type_cases() -> st.SearchStrategy[Case]:
    top = st.sampled_from(sorted(TOP_FIELDS)).flatmap(
        lambda f: st.sampled_from(WRONG[TOP_FIELDS[f]]).map(lambda v: top_case("wrong type", f, v)))
    per_pass = st.sampled_from([(p, f) for p, fs in PASS_FIELDS.items() for f in fs]).flatmap(
        lambda pf: st.sampled_from(WRONG[PASS_FIELDS[pf[0]][pf[1]]]).map(
            lambda v: pass_case("wrong type", pf[0], pf[1], v)))
    return st.one_of(top, per_pass)


OUT_OF_RANGE_TOP = [("seed", "-1"), ("seed", str(2**70)), ("max_eval_samples", "0"), ("max_eval_samples", "-5"),
                    ("max_seq_length", "0"), ("max_seq_length", "4"), ("max_seq_length", str(10**5)),
                    ("eval_batch_size", "0"), ("eval_batch_size", "-1"), ("eval_batch_size", str(10**9)),
                    ("density_tau", "-0.5"), ("name", '"../evil"'), ("name", '""'), ("name", "a/b"),
                    ("model", '"/nonexistent/ckpt"'), ("task", "glue/bogus"), ("task", "squad2"),
                    ("data_dir", '"/nonexistent/data"'), ("device", "banana"), ("device", '"cuda:x"')]
OUT_OF_RANGE_PASS = [("deft", "r", "0"), ("deft", "r", "-1"), ("deft", "r", str(10**9)),
                     ("deft", "lora_alpha", "0"), ("deft", "lora_alpha", "-1"),
                     ("deft", "learning_rate", "0"), ("deft", "learning_rate", "-1.0e-3"),
                     ("deft", "batch_size", "0"), ("deft", "batch_size", "-4"), ("deft", "batch_size", str(10**9)),
                     ("deft", "max_steps", "0"), ("deft", "max_steps", "-1"), ("deft", "max_steps", str(10**12)),
                     ("deft", "density_target", "1.0"), ("deft", "density_target", "1.5"),
                     ("deft", "density_target", "-0.1"), ("deft", "target_modules", "[]"),
                     ("magnitude_prune", "sparsity", "1.0"), ("magnitude_prune", "sparsity", "1"),
                     ("magnitude_prune", "sparsity", "1.5"), ("magnitude_prune", "sparsity", "-0.1"),
                     ("magnitude_prune", "targets", "[]"), ("magnitude_prune", "targets", '["re:("]'),
                     ("structured_prune", "mlp_ratio", "1.0"), ("structured_prune", "mlp_ratio", "-0.5"),
                     ("structured_prune", "round_to", "0"), ("structured_prune", "round_to", "-8"),
                     ("structured_prune", "round_to", str(10**9))]


def out_of_range_cases() -> st.SearchStrategy[Case]:
    return st.one_of(
        st.sampled_from(OUT_OF_RANGE_TOP).map(lambda fv: top_case("out of range", *fv)),
        st.sampled_from(OUT_OF_RANGE_PASS).map(lambda pfv: pass_case("out of range", *pfv)))


NON_FINITE = [".inf", "-.inf", ".nan", "+.inf", ".Inf", "-.INF", ".NaN"]
FLOAT_FIELDS = [("deft", "learning_rate"), ("deft", "lora_alpha"), ("deft", "density_target"),
                ("magnitude_prune", "sparsity"), ("structured_prune", "mlp_ratio")]


def non_finite_cases() -> st.SearchStrategy[Case]:
    top = st.tuples(st.sampled_from(["density_tau", "seed", "max_seq_length"]), st.sampled_from(NON_FINITE)).map(
        lambda fv: top_case("non-finite", *fv))
    per_pass = st.tuples(st.sampled_from(FLOAT_FIELDS), st.sampled_from(NON_FINITE)).map(
        lambda pf_v: pass_case("non-finite", pf_v[0][0], pf_v[0][1], pf_v[1]))
    return st.one_of(top, per_pass)


def unknown_key_cases() -> st.SearchStrategy[Case]:
    top = st.sampled_from(["bogus_key", "Seed", "passes_", "learning_rate", "steps"]).map(
        lambda k: Case(f"unknown top-level key {k}", lambda c: recipe_yaml(c, extra=f"{k}: 1"), (k,)))
    in_pass = st.sampled_from([("deft", "lr"), ("deft", "rank"), ("magnitude_prune", "sparsty"), ("evaluate", "bogus"),
                               ("quantize", "bits"), ("structured_prune", "ratio")]).map(
        lambda pk: Case(f"unknown option {pk[0]}.{pk[1]}", lambda c: recipe_yaml(c, pass_name=pk[0], opts={pk[1]: "1"}),
                        ("passes[0]", pk[0], pk[1])))
    no_such_pass = st.sampled_from(["bogus_pass", "Evaluate", "prune", "lora"]).map(
        lambda p: Case(f"unknown pass {p}", lambda c: recipe_yaml(c, passes=f"passes:\n  - evaluate: {{}}\n  - {p}: {{}}"),
                       ("passes[1]", p)))
    bad_items = st.sampled_from([
        "passes:\n  - evaluate: {}\n    extra: 1", "passes:\n  - 5", "passes:\n  - [evaluate]",
        "passes: 5", "passes: {evaluate: {}}", "passes: evaluate", "passes:\n  - evaluate: 5",
        "passes:\n  - evaluate: [1]", "passes:\n  - deft: lora", "passes:\n  - 1: {}", "passes:", "",
    ]).map(lambda text: Case(f"bad passes block {text!r}", lambda c: recipe_yaml(c, passes=text), ("passes",)))
    return st.one_of(top, in_pass, no_such_pass, bad_items)


TAGS = ['!!python/object/apply:os.system ["touch {m}"]', '!!python/object/apply:builtins.open ["{m}", "w"]',
        '!!python/object/new:builtins.open ["{m}", "w"]', '!!python/object/apply:subprocess.check_output [["touch", "{m}"]]',
        "!!python/name:os.system", "!!python/module:os", "!custom_tag value"]


def tag_case(tag: str, where: str) -> Case:
    def build(c: Ctx) -> str:
        value = tag.replace("{m}", str(c.marker))
        if where == "document":
            return value + "\n"
        if where == "pass item":
            return recipe_yaml(c, passes=f"passes:\n  - {value}")
        if where == "pass option":
            return recipe_yaml(c, pass_name="deft", opts={"r": value})
        return recipe_yaml(c, top={where: value})
    return Case(f"YAML tag {tag[:30]} at {where}", build)


def tag_cases() -> st.SearchStrategy[Case]:
    return st.builds(tag_case, st.sampled_from(TAGS), st.sampled_from(["name", "model", "seed", "document", "pass item",
                                                                    "pass option"]))


def duplicate_cases() -> st.SearchStrategy[Case]:
    return st.sampled_from([
        Case("duplicate seed", lambda c: recipe_yaml(c, extra="seed: 1\nseed: 2"), ("seed",)),
        Case("duplicate name", lambda c: recipe_yaml(c, extra="name: u"), ("name",)),
        Case("duplicate passes", lambda c: recipe_yaml(c, extra="passes:\n  - evaluate: {}"), ("passes",)),
        Case("duplicate deft option", lambda c: recipe_yaml(
            c, passes="passes:\n  - deft:\n      max_steps: 1\n      batch_size: 4\n      max_steps: 2"), ("max_steps",)),
        Case("duplicate evaluate option", lambda c: recipe_yaml(
            c, passes="passes:\n  - evaluate: {density_mode: paper, density_mode: masked}"), ("density_mode",)),
    ])


def bomb_levels(levels: int, width: int = 9) -> list[str]:
    defs = [f"&l0 [{', '.join(['x'] * width)}]"]
    defs += [f"&l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return defs


def bomb_case(levels: int, where: str) -> Case:
    defs, last = bomb_levels(levels), f"*l{levels - 1}"

    def build(c: Ctx) -> str:
        if where == "classic":  # the billion laughs: a: &a [...], b: &b [*a, ...], ..., then used as a value
            extra = "\n".join(f"bomb{i}: {d}" for i, d in enumerate(defs))
            return extra + "\n" + recipe_yaml(c, top={"seed": last})
        if where == "passes":  # defined inside one field, expanded as the passes list
            return recipe_yaml(c, top={"name": f"[{', '.join(defs)}]"}, passes=f"passes: {last}")
        if where == "target_modules":
            return recipe_yaml(c, pass_name="deft", opts={"target_modules": f"[{', '.join(defs)}]"})
        return recipe_yaml(c, top={where: f"[{', '.join(defs)}]"})
    return Case(f"alias bomb, {levels} levels, at {where}", build, max_chars=1000)


def alias_bomb_cases() -> st.SearchStrategy[Case]:
    return st.builds(bomb_case, st.integers(4, 9), st.sampled_from(["classic", "passes", "target_modules", "name",
                                                               "density_tau", "seed"]))


def bytes_case(payload: bytes, where: str) -> Case:
    def build(c: Ctx) -> bytes:
        good = recipe_yaml(c).encode()
        if where == "start":
            return payload + good
        if where == "comment":
            return good + b"# note " + payload + b"\n"
        if where == "name":
            return good.replace(b"name: t\n", b"name: t" + payload + b"\n")
        if where == "model":
            return good.replace(str(c.model).encode(), str(c.model).encode() + payload)
        return good.replace(b"evaluate: {}", b"evaluate: {density_mode: pa" + payload + b"per}")
    return Case(f"bytes {payload!r} at {where}", build)


def bad_bytes_cases() -> st.SearchStrategy[Case]:
    return st.builds(bytes_case, st.sampled_from([b"\xff\xfe", b"\xc3\x28", b"\x80", b"\xed\xa0\x80", b"\xfe", b"\x00",
                                            b"\x07"]),
                     st.sampled_from(["start", "comment", "name", "model", "pass option"]))


def not_a_mapping_cases() -> st.SearchStrategy[Case]:
    texts = [b"", b"   \n", b"# only a comment\n", b"---\n", b"---\n...\n", b"\n\n\n", b"\xef\xbb\xbf",
             b"- a\n- b\n", b"[1, 2]\n", b"42\n", b"hello\n", b"null\n", b"~\n", b".inf\n", b"true\n", b"{}\n",
             b'"just a string"\n', b"a: 1\n---\nb: 2\n"]
    return st.one_of(
        st.sampled_from(texts).map(lambda t: Case(f"document {t[:20]!r}", lambda c: t)),
        st.just(Case("two good documents", lambda c: recipe_yaml(c) + "---\n" + recipe_yaml(c))))


def nesting_case(depth: int, where: str) -> Case:
    flow = "[" * depth + "]" * depth
    flow_map = "{a: " * depth + "1" + "}" * depth

    def build(c: Ctx) -> str:
        if where == "document":
            return flow + "\n"
        if where == "document mapping":
            return flow_map + "\n"
        if where == "block mapping":
            d = min(depth, 300)
            return "".join("  " * i + f"k{i}:\n" for i in range(d)) + "  " * d + "1\n"
        if where == "passes":
            return recipe_yaml(c, passes=f"passes: {flow}")
        if where == "target_modules":
            return recipe_yaml(c, pass_name="deft", opts={"target_modules": flow})
        return recipe_yaml(c, top={"name": flow_map})
    return Case(f"nesting depth {depth} at {where}", build)


def nesting_cases() -> st.SearchStrategy[Case]:
    return st.builds(nesting_case, st.sampled_from([30, 300, 3000, 30000]),
                     st.sampled_from(["document", "document mapping", "block mapping", "passes", "target_modules",
                                      "name"]))


def garbage_cases() -> st.SearchStrategy[Case]:
    texts = ["::: - [ { ] }\n", "key: [unclosed\n", "\tname: t\n", "name: 'unterminated\n", "name: t\n  model: x\n",
             "passes:\n- evaluate: {}\n - deft: {}\n", "? [a, b]\n: 1\n", "&a a: *b\n", "*undefined\n", "%YAML 9.9\n---\na: 1\n",
             "name: t\nname\n", "{{{{\n", "- - - - -\n", "!!\n", "@reserved\n", "`backtick\n"]
    return st.sampled_from(texts).map(lambda t: Case(f"garbage {t[:24]!r}", lambda c: t))


def huge_value_cases() -> st.SearchStrategy[Case]:
    big = 100_000
    return st.sampled_from([
        Case("100k-character name", lambda c: recipe_yaml(c, top={"name": "a" * big}), ("name",)),
        Case("100k-character passes", lambda c: recipe_yaml(c, passes=f'passes: "{"p" * big}"'), ("passes",)),
        Case("100k-character model", lambda c: recipe_yaml(c, top={"model": "/" + "m" * big}), ("model",)),
        Case("100k-character task", lambda c: recipe_yaml(c, top={"task": "t" * big}), ("task",)),
        # (a plain YAML key is at most 1024 characters)
        Case("1000-character pass name", lambda c: recipe_yaml(c, passes=f"passes:\n  - {'q' * 1000}: {{}}"),
             ("passes[0]",)),
        Case("100k-item target_modules", lambda c: recipe_yaml(
            c, pass_name="deft", opts={"target_modules": "[" + ", ".join(["1"] * big) + "]"}), ("target_modules",)),
        Case("1.1 MiB recipe", lambda c: recipe_yaml(c) + "# " + "c" * (1_100_000) + "\n"),
    ])


def bad_recipes() -> st.SearchStrategy[Case]:
    return st.one_of(wrong_type_cases(), out_of_range_cases(), non_finite_cases(), unknown_key_cases(), tag_cases(),
                     duplicate_cases(), alias_bomb_cases(), bad_bytes_cases(), not_a_mapping_cases(), nesting_cases(),
                     garbage_cases(), huge_value_cases())


def always_run(test):
    """The hostile cases run on every test run, besides the random ones."""
    for case in (
        bomb_case(9, "classic"), bomb_case(9, "passes"), bomb_case(5, "passes"),
        tag_case(TAGS[0], "name"), tag_case(TAGS[1], "pass option"), tag_case(TAGS[0], "document"),
        nesting_case(30000, "passes"), nesting_case(3000, "document mapping"),
        bytes_case(b"\xff\xfe", "name"), bytes_case(b"\x00", "pass option"),
        Case("empty file", lambda c: b""), Case("a YAML list", lambda c: "- a\n- b\n"),
        Case("a YAML scalar", lambda c: "42\n"),
        Case("duplicate seed", lambda c: recipe_yaml(c, extra="seed: 1\nseed: 2"), ("seed",)),
        Case("100k-character model", lambda c: recipe_yaml(c, top={"model": "/" + "m" * 100_000}), ("model",)),
        pass_case("non-finite", "deft", "learning_rate", ".inf"), pass_case("non-finite", "magnitude_prune", "sparsity", ".nan"),
        top_case("non-finite", "density_tau", "-.inf"), top_case("out of range", "seed", str(2**70)),
        pass_case("out of range", "deft", "r", str(10**9)), top_case("out of range", "max_seq_length", str(10**5)),
        pass_case("out of range", "magnitude_prune", "sparsity", "1.0"),
        Case("unknown pass", lambda c: recipe_yaml(c, passes="passes:\n  - bogus_pass: {}"), ("passes[0]", "bogus_pass")),
    ):
        test = example(case=case)(test)
    return test


@pytest.fixture
def ctx(tiny_checkpoint, tiny_data, tmp_path) -> Ctx:
    return Ctx(model=tiny_checkpoint("bert"), data=tiny_data, marker=tmp_path / "MARKER")


def write_example(tmp_path: Path, case: Case, ctx: Ctx) -> tuple[Path, Path, Ctx]:
    """A fresh folder per example holding only recipe.yaml; the marker lives in it too."""
    work = Path(tempfile.mkdtemp(prefix="ex", dir=tmp_path))
    c = Ctx(model=ctx.model, data=ctx.data, marker=work / "MARKER")
    recipe = work / "recipe.yaml"
    recipe.write_bytes(case.content(c))
    return work, recipe, c


def check_names(line: str, recipe: Path, case: Case) -> None:
    assert str(recipe) in line, f"error line does not name the recipe {recipe}: {line[:300]}"
    rest = line.replace(str(recipe), "")
    for needle in case.needles:
        assert needle in rest, f"error line does not name {needle!r}: {line[:300]}"


# ---- 0. the baselines are good -------------------------------------------------------------------


@pytest.mark.parametrize("pass_name", sorted(PASS_BASE))
def test_good_baseline_validates(ctx, tmp_path, pass_name):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_yaml(ctx, pass_name=pass_name))
    result, _ = invoke(["validate", str(recipe)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("ok:"), result.output


def test_good_baseline_is_the_documented_one(ctx, tmp_path):
    recipe = tmp_path / "good.yaml"
    recipe.write_text(f"name: t\nmodel: {ctx.model}\ntask: glue/sst2\ndata_dir: {ctx.data}\npasses:\n  - evaluate: {{}}\n")
    result, _ = invoke(["validate", str(recipe)])
    assert result.exit_code == 0, result.output


# ---- 1. validate: every malformed recipe is one line, exit 2 ---------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture], database=None,
          derandomize=True)  # the same examples on every run: CI never turns red by chance
@given(case=bad_recipes())
@always_run
def test_validate_rejects_malformed_recipe(ctx, tmp_path, case):
    work, recipe, c = write_example(tmp_path, case, ctx)
    with contextlib.chdir(work):
        result, seconds = invoke(["validate", str(recipe)])
    line = check_result(result, codes=(2,), max_chars=case.max_chars, several=True)
    check_names(line, recipe, case)
    assert seconds < MAX_SECONDS, f"took {seconds:.1f} s"
    assert not c.marker.exists(), "a YAML tag ran code"
    assert listing(work) == ["recipe.yaml"]


# ---- 2. apply: the same, and nothing written ---------------------------------------------------------


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture], database=None,
          derandomize=True)
@given(case=bad_recipes())
@always_run
def test_apply_rejects_malformed_recipe_and_writes_nothing(ctx, tmp_path, model_loads, case):
    before_model, before_data = snapshot(ctx.model), snapshot(ctx.data)
    work, recipe, c = write_example(tmp_path, case, ctx)
    out = work / "out"
    with contextlib.chdir(work):
        result, seconds = invoke(["apply", str(recipe), "-o", str(out)])
    line = check_result(result, codes=(2,), max_chars=case.max_chars)
    check_names(line, recipe, case)
    assert seconds < MAX_SECONDS, f"took {seconds:.1f} s"
    assert not model_loads, f"a model was loaded before an exit-2 error: {model_loads}"
    assert not out.exists(), "the output folder was created"
    assert listing(work) == ["recipe.yaml"], f"files appeared: {listing(work)}"
    assert snapshot(ctx.model) == before_model and snapshot(ctx.data) == before_data


def test_learning_rate_inf_rejected_at_validate(ctx, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_yaml(ctx, pass_name="deft", opts={"learning_rate": ".inf"}))
    result, _ = invoke(["validate", str(recipe)])
    line = check_result(result, codes=(2,))
    assert str(recipe) in line and "passes[0]" in line and "learning_rate" in line, line


# ---- 3. bad data ----------------------------------------------------------------------------------


def _sst2_dev(root: Path) -> Path:
    return root / "glue" / "sst2" / "dev.tsv"


def _squad_dev(root: Path) -> Path:
    return root / "squad" / "dev-v1.1.json"


def _non_utf8_dev(root: Path) -> Path:
    path = _sst2_dev(root)
    lines = path.read_bytes().split(b"\n")
    lines[1] = lines[1].replace(b"the film", b"the f\xff\xfelm")
    path.write_bytes(b"\n".join(lines))
    return path


def _no_label_column(root: Path) -> Path:
    path = _sst2_dev(root)
    rows = [line.split("\t")[0] for line in path.read_text().splitlines()]
    path.write_text("\n".join(rows) + "\n")
    return path


def _bad_label(root: Path) -> Path:
    path = _sst2_dev(root)
    lines = path.read_text().splitlines()
    lines[1] = lines[1].rsplit("\t", 1)[0] + "\tmaybe"
    path.write_text("\n".join(lines) + "\n")
    return path


def _squad_list(root: Path) -> Path:
    path = _squad_dev(root)
    path.write_text(json.dumps(json.loads(path.read_text())["data"]))
    return path


def _squad_latin1(root: Path) -> Path:
    path = _squad_dev(root)
    path.write_bytes(path.read_text().replace("colour", "colour caf\u00e9").encode("latin-1"))
    return path


def _empty_dev(root: Path) -> Path:
    path = _sst2_dev(root)
    path.write_bytes(b"")
    return path


BAD_DATA = {
    "non-utf8 dev.tsv": ("glue/sst2", _non_utf8_dev),
    "tsv without label column": ("glue/sst2", _no_label_column),
    "bad label value": ("glue/sst2", _bad_label),
    "squad top level is a list": ("squad", _squad_list),
    "squad not utf8": ("squad", _squad_latin1),
    "empty dev.tsv": ("glue/sst2", _empty_dev),
}


@pytest.fixture
def broken_data(tiny_data, tmp_path):
    def make(breaker) -> tuple[Path, Path]:
        root = tmp_path / "data"
        shutil.copytree(tiny_data, root)
        return root, breaker(root)
    return make


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_apply_bad_data(case, broken_data, tiny_checkpoint, tmp_path, model_loads):
    task, breaker = BAD_DATA[case]
    root, bad_file = broken_data(breaker)
    model = tiny_checkpoint("t5_relu" if task == "squad" else "bert")
    work = tmp_path / "work"
    work.mkdir()
    recipe = work / "recipe.yaml"
    recipe.write_text(f"name: t\nmodel: {q(model)}\ntask: {task}\ndata_dir: {q(root)}\npasses:\n  - evaluate: {{}}\n")
    before = snapshot(root)
    out = work / "out"
    with contextlib.chdir(work):
        result, seconds = invoke(["apply", str(recipe), "-o", str(out)])
    line = check_result(result, codes=(1, 2), progress_ok=True)
    assert str(bad_file) in line, f"error line does not name {bad_file}: {line}"
    if result.exit_code == 2:
        assert not model_loads, "exit 2 after a model loaded"
    assert not out.exists(), "the output folder was created"
    assert listing(work) == ["recipe.yaml"], listing(work)
    assert snapshot(root) == before
    assert seconds < 60, f"took {seconds:.1f} s"


def test_missing_train_file_fails_at_validate(broken_data, tiny_checkpoint, tmp_path, model_loads):
    root, train = broken_data(lambda r: r / "glue" / "sst2" / "train.tsv")
    train.unlink()
    work = tmp_path / "work"
    work.mkdir()
    recipe = work / "recipe.yaml"
    recipe.write_text(f"name: t\nmodel: {q(tiny_checkpoint('bert'))}\ntask: glue/sst2\ndata_dir: {q(root)}\n"
                      "passes:\n  - deft: {max_steps: 1, batch_size: 4}\n")
    result, _ = invoke(["validate", str(recipe)])
    line = check_result(result, codes=(2,))
    assert str(recipe) in line and str(train) in line, line

    out = work / "out"
    with contextlib.chdir(work):
        result, _ = invoke(["apply", str(recipe), "-o", str(out)])
    line = check_result(result, codes=(2,))
    assert str(train) in line, line
    assert not model_loads
    assert not out.exists() and listing(work) == ["recipe.yaml"], listing(work)


# ---- 4. bad checkpoints --------------------------------------------------------------------------


class _Evil:
    """Unpickling this opens (creates) the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _truncate(ckpt: Path, marker: Path) -> Path:
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    return f


def _random_bytes(ckpt: Path, marker: Path) -> Path:
    import random

    f = ckpt / "model.safetensors"
    f.write_bytes(random.Random(1).randbytes(f.stat().st_size))
    return f


def _empty(ckpt: Path, marker: Path) -> Path:
    f = ckpt / "model.safetensors"
    f.write_bytes(b"")
    return f


def _no_tokenizer(ckpt: Path, marker: Path) -> Path:
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (ckpt / name).unlink(missing_ok=True)
    return ckpt


def _garbled_layout(ckpt: Path, marker: Path) -> Path:
    f = ckpt / "config.json"
    config = json.loads(f.read_text())
    config["deftcompress_layout"] = {"format": 1, "mlp": "x"}
    f.write_text(json.dumps(config))
    return f


def _pickle_only(ckpt: Path, marker: Path) -> Path:
    import torch
    from safetensors.torch import load_file

    state = load_file(ckpt / "model.safetensors")
    (ckpt / "model.safetensors").unlink()
    torch.save(state, ckpt / "pytorch_model.bin")
    return ckpt


def _evil_pickle(ckpt: Path, marker: Path) -> Path:
    (ckpt / "model.safetensors").unlink()
    with open(ckpt / "pytorch_model.bin", "wb") as f:
        pickle.dump({"bert.embeddings.word_embeddings.weight": _Evil(marker)}, f)
    return ckpt


# case -> (breaker, extra words the error line must contain, exit codes)
BAD_CHECKPOINTS = {
    "truncated safetensors": (_truncate, (), (2,)),
    "random bytes": (_random_bytes, (), (2,)),
    "empty safetensors": (_empty, (), (2,)),
    "tokenizer removed": (_no_tokenizer, ("tokenizer",), (2,)),
    "garbled layout": (_garbled_layout, ("deftcompress_layout",), (2,)),
    "pickle only": (_pickle_only, ("--trust-pickle",), (2,)),
    "malicious pickle only": (_evil_pickle, ("--trust-pickle",), (2,)),
}


@pytest.fixture
def broken_checkpoint(tiny_checkpoint, tmp_path):
    def make(breaker) -> tuple[Path, Path, Path]:
        ckpt = tmp_path / "ckpt"
        shutil.copytree(tiny_checkpoint("bert"), ckpt)
        marker = tmp_path / "MARKER"
        return ckpt, breaker(ckpt, marker), marker
    return make


def _apply_with_model(ckpt: Path, tiny_data: Path, tmp_path: Path, *extra: str):
    work = tmp_path / "work"
    work.mkdir()
    recipe = work / "recipe.yaml"
    recipe.write_text(f"name: t\nmodel: {q(ckpt)}\ntask: glue/sst2\ndata_dir: {q(tiny_data)}\nmax_eval_samples: 8\n"
                      "passes:\n  - evaluate: {}\n")
    out = work / "out"
    with contextlib.chdir(work):
        result, seconds = invoke(["apply", str(recipe), "-o", str(out), *extra])
    return result, seconds, work, out


@pytest.mark.parametrize("case", sorted(BAD_CHECKPOINTS))
def test_apply_bad_checkpoint(case, broken_checkpoint, tiny_data, tmp_path, model_loads):
    breaker, words, codes = BAD_CHECKPOINTS[case]
    ckpt, bad, marker = broken_checkpoint(breaker)
    before = snapshot(ckpt)
    result, seconds, work, out = _apply_with_model(ckpt, tiny_data, tmp_path)
    line = check_result(result, codes=codes)
    assert str(bad) in line, f"error line does not name {bad}: {line}"
    for word in words:
        assert word in line, f"error line lacks {word!r}: {line}"
    assert not model_loads, "exit 2 after a model loaded"
    assert not marker.exists(), "the pickle was loaded"
    assert not out.exists() and listing(work) == ["recipe.yaml"], listing(work)
    assert snapshot(ckpt) == before, "the checkpoint folder changed"
    assert seconds < 30, f"took {seconds:.1f} s"


@pytest.mark.parametrize("case", ["pickle only", "malicious pickle only"])
def test_validate_refuses_pickle_only_checkpoint(case, broken_checkpoint, tiny_data, tmp_path):
    ckpt, _, marker = broken_checkpoint(BAD_CHECKPOINTS[case][0])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"name: t\nmodel: {q(ckpt)}\ntask: glue/sst2\ndata_dir: {q(tiny_data)}\npasses:\n  - evaluate: {{}}\n")
    result, _ = invoke(["validate", str(recipe)])
    line = check_result(result, codes=(2,))
    assert str(recipe) in line and str(ckpt) in line and "--trust-pickle" in line, line
    assert not marker.exists()


def test_apply_intermediate_size_mismatch_is_an_error(broken_checkpoint, tiny_data, tmp_path):
    def edit(ckpt: Path, marker: Path) -> Path:
        f = ckpt / "config.json"
        config = json.loads(f.read_text())
        assert config["intermediate_size"] == 64
        config["intermediate_size"] = 48
        f.write_text(json.dumps(config))
        return f

    ckpt, _, _ = broken_checkpoint(edit)
    result, seconds, work, out = _apply_with_model(ckpt, tiny_data, tmp_path)
    line = check_result(result, codes=(1, 2), progress_ok=True)
    assert str(ckpt) in line, f"error line does not name the checkpoint {ckpt}: {line}"
    assert "intermediate" in line, f"error line does not name the mismatched MLP weights: {line}"
    assert not out.exists() and listing(work) == ["recipe.yaml"], listing(work)
    assert seconds < 60


def test_apply_replaces_only_a_head_sized_for_another_label_count(broken_checkpoint, tiny_data, tmp_path):
    """The one mismatch allowed: a classifier for 3 labels used on SST-2 (2 labels) gets a new head."""

    def three_labels(ckpt: Path, marker: Path) -> Path:
        import torch
        from safetensors.torch import load_file, save_file

        state = load_file(ckpt / "model.safetensors")
        state["classifier.weight"] = torch.randn(3, state["classifier.weight"].shape[1])
        state["classifier.bias"] = torch.zeros(3)
        save_file(state, ckpt / "model.safetensors", metadata={"format": "pt"})
        config = json.loads((ckpt / "config.json").read_text())
        config["id2label"] = {str(i): f"L{i}" for i in range(3)}
        config["label2id"] = {f"L{i}": i for i in range(3)}
        (ckpt / "config.json").write_text(json.dumps(config))
        return ckpt

    ckpt, _, _ = broken_checkpoint(three_labels)
    result, _, _, out = _apply_with_model(ckpt, tiny_data, tmp_path, "-q")
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 0, result.output[-2000:]
    assert (out / "report.json").is_file()


# ---- 5. output folders and environment ----------------------------------------------------------


@pytest.fixture
def good_recipe(ctx, tmp_path) -> Callable[..., tuple[Path, Path]]:
    def make(**top: str) -> tuple[Path, Path]:
        work = tmp_path / "work"
        work.mkdir(exist_ok=True)
        recipe = work / "recipe.yaml"
        recipe.write_text(recipe_yaml(ctx, top={"max_eval_samples": "8", **top}))
        return work, recipe
    return make


def test_output_is_a_file(good_recipe, model_loads):
    work, recipe = good_recipe()
    target = work / "out"
    target.write_text("keep me\n")
    with contextlib.chdir(work):
        result, seconds = invoke(["apply", str(recipe), "-o", str(target)])
    line = check_result(result, codes=(1, 2))
    assert str(target) in line, line
    if result.exit_code == 2:
        assert not model_loads
    assert target.read_text() == "keep me\n"
    assert listing(work) == ["out", "recipe.yaml"], listing(work)
    assert seconds < 30


def test_output_parent_read_only(good_recipe, model_loads):
    if os.geteuid() == 0:
        pytest.skip("root ignores file permissions")
    work, recipe = good_recipe()
    parent = work / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        out = parent / "out"
        with contextlib.chdir(work):
            result, seconds = invoke(["apply", str(recipe), "-o", str(out)])
        line = check_result(result, codes=(1, 2))
        assert str(parent) in line, line
        if result.exit_code == 2:
            assert not model_loads
        assert list(parent.iterdir()) == []
        assert listing(work) == ["recipe.yaml", "ro"], listing(work)
        assert seconds < 30
    finally:
        parent.chmod(0o755)


def test_output_name_too_long(good_recipe, model_loads):
    work, recipe = good_recipe()
    name = "x" * 300
    with contextlib.chdir(work):
        result, seconds = invoke(["apply", str(recipe), "-o", name])
    line = check_result(result, codes=(1, 2))
    assert "x" * 20 in line, f"error line does not name the output path: {line}"
    if result.exit_code == 2:
        assert not model_loads
    assert listing(work) == ["recipe.yaml"], listing(work)
    assert seconds < 30


def test_device_banana_fails_at_validate(good_recipe, model_loads):
    work, recipe = good_recipe(device="banana")
    result, _ = invoke(["validate", str(recipe)])
    line = check_result(result, codes=(2,))
    assert str(recipe) in line and "device" in line.replace(str(recipe), ""), line
    out = work / "out"
    with contextlib.chdir(work):
        result, _ = invoke(["apply", str(recipe), "-o", str(out)])
    check_result(result, codes=(2,))
    assert not model_loads and not out.exists() and listing(work) == ["recipe.yaml"]


def test_device_cuda_without_cuda(good_recipe, model_loads):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    work, recipe = good_recipe(device="cuda")
    out = work / "out"
    with contextlib.chdir(work):
        result, seconds = invoke(["apply", str(recipe), "-o", str(out)])
    line = check_result(result, codes=(1, 2))
    assert "device" in line.replace(str(recipe), "") and "cuda" in line, line
    assert not model_loads, "a model was loaded before the device error"
    assert not out.exists() and listing(work) == ["recipe.yaml"], listing(work)
    assert seconds < 30


# ---- 6. numbers that do nothing must warn ---------------------------------------------------------


def test_round_to_larger_than_the_mlp_warns(ctx, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    recipe = work / "recipe.yaml"
    recipe.write_text(recipe_yaml(ctx, top={"max_eval_samples": "8"}, pass_name="structured_prune",
                                  opts={"mlp_ratio": "0.1", "round_to": "4096"}))
    out = work / "out"
    with contextlib.chdir(work):
        result, _ = invoke(["apply", str(recipe), "-o", str(out), "-q"])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 0, result.output[-2000:]
    report = json.loads((out / "report.json").read_text())
    details = report["steps"][1]["details"]
    warnings = details.get("warnings")
    assert isinstance(warnings, list) and warnings, f"no warnings in the step details: {sorted(details)}"
    assert any("round_to" in str(w) for w in warnings), warnings


# ---- real processes: crashes, hangs, stray output ----------------------------------------------


def _run(args: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.monotonic()
    try:
        proc = subprocess.run([CONSOLE_SCRIPT, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"deftcompress {' '.join(args)[:200]} did not finish in 60 s")
    return proc, time.monotonic() - start


def _check_process(proc: subprocess.CompletedProcess, codes: tuple[int, ...], max_chars: int = MAX_OUTPUT) -> str:
    assert proc.stdout.strip() == "", f"stdout: {proc.stdout[:500]}"
    return error_line(proc.stderr, exit_code=proc.returncode, codes=codes, max_chars=max_chars)


def test_process_validate_alias_bomb(ctx, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    defs = bomb_levels(9)
    recipe.write_text("\n".join(f"bomb{i}: {d}" for i, d in enumerate(defs)) + "\n"
                      + recipe_yaml(ctx, top={"name": "*l8"}, passes="passes: *l8"))
    proc, seconds = _run(["validate", str(recipe)], tmp_path)
    line = _check_process(proc, (2,), max_chars=1000)
    assert str(recipe) in line, line
    assert seconds < MAX_SECONDS, f"took {seconds:.1f} s"


def test_process_apply_deep_nesting(ctx, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_yaml(ctx, passes="passes: " + "[" * 100_000 + "]" * 100_000))
    out = tmp_path / "out"
    proc, seconds = _run(["apply", str(recipe), "-o", str(out)], tmp_path)
    line = _check_process(proc, (2,))
    assert str(recipe) in line, line
    assert not out.exists() and listing(tmp_path) == ["recipe.yaml"], listing(tmp_path)
    assert seconds < 30, f"took {seconds:.1f} s"


def test_process_apply_malicious_pickle(broken_checkpoint, tiny_data, tmp_path):
    ckpt, _, marker = broken_checkpoint(_evil_pickle)
    work = tmp_path / "work"
    work.mkdir()
    recipe = work / "recipe.yaml"
    recipe.write_text(f"name: t\nmodel: {q(ckpt)}\ntask: glue/sst2\ndata_dir: {q(tiny_data)}\npasses:\n  - evaluate: {{}}\n")
    out = work / "out"
    proc, seconds = _run(["apply", str(recipe), "-o", str(out)], work)
    line = _check_process(proc, (2,))
    assert str(ckpt) in line and "--trust-pickle" in line, line
    assert not marker.exists(), "the pickle was loaded"
    assert not out.exists() and listing(work) == ["recipe.yaml"], listing(work)
    assert seconds < 30


def test_process_apply_output_is_a_file(good_recipe):
    work, recipe = good_recipe()
    target = work / "out"
    target.write_text("keep me\n")
    proc, seconds = _run(["apply", str(recipe), "-o", str(target)], work)
    line = _check_process(proc, (1, 2))
    assert str(target) in line, line
    assert target.read_text() == "keep me\n" and listing(work) == ["out", "recipe.yaml"], listing(work)
    assert seconds < 30


def test_process_apply_device_cuda(good_recipe):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    work, recipe = good_recipe(device="cuda")
    out = work / "out"
    proc, seconds = _run(["apply", str(recipe), "-o", str(out)], work)
    line = _check_process(proc, (1, 2))
    assert "cuda" in line, line
    assert not out.exists() and listing(work) == ["recipe.yaml"], listing(work)
    assert seconds < 30


def test_trust_pickle_loads_a_plain_state_dict(broken_checkpoint, tiny_data, tmp_path):
    """--trust-pickle loads pickled tensors (transformers reads them with torch.load(weights_only=True))."""
    ckpt, _, _ = broken_checkpoint(_pickle_only)
    result, _, _, out = _apply_with_model(ckpt, tiny_data, tmp_path, "--trust-pickle")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "report.json").read_text())["status"] == "finished"


def test_trust_pickle_still_never_runs_code_from_a_pickle(broken_checkpoint, tiny_data, tmp_path):
    ckpt, _, marker = broken_checkpoint(_evil_pickle)
    result, _, _, out = _apply_with_model(ckpt, tiny_data, tmp_path, "--trust-pickle")
    check_result(result, codes=(2,), progress_ok=True)
    assert not marker.exists(), "the pickle ran code"
    assert not out.exists()


def test_a_regex_that_backtracks_is_refused_at_validate_and_stopped_at_run_time(ctx, tmp_path):
    slow = r"re:(\w|\w\w|\.)+\d"  # exponential backtracking on any longer name that ends in a letter
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: t\nmodel: {q(ctx.model)}\ntask: glue/sst2\ndata_dir: {q(ctx.data)}\n"
                      f"passes:\n  - magnitude_prune: {{targets: [{q(slow)}]}}\n")
    result, seconds = invoke(["validate", str(recipe)])
    line = check_result(result, codes=(2,))
    assert "takes too long" in line and seconds < 10, (line, seconds)
    # a pattern that slips past the validation probes still cannot hang a run: each match has a time limit
    import torch

    from deftcompress.core.selectors import SelectorTimeout, select_modules

    model = torch.nn.Module()
    model.add_module("bert", torch.nn.Module())
    model.bert.add_module("encoder_layer_0_attention_output_query_value", torch.nn.Linear(2, 2))
    start = time.monotonic()
    with pytest.raises(SelectorTimeout, match="took more than"):
        list(select_modules(model, [slow]))
    assert time.monotonic() - start < 10


def test_a_loss_that_turns_nan_stops_training_in_one_line(ctx, tmp_path):
    """A finite but absurd learning rate blows the weights up: the pass stops before saving them."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: t\nmodel: {q(ctx.model)}\ntask: glue/sst2\ndata_dir: {q(ctx.data)}\nmax_eval_samples: 4\n"
                      "passes:\n  - deft: {method: lora, max_steps: 6, batch_size: 8, learning_rate: 1.0e+30, "
                      "warmup_ratio: 0.0}\n")
    out = tmp_path / "out"
    result, _ = invoke(["apply", str(recipe), "-o", str(out), "--quiet"])
    line = check_result(result, codes=(1,), progress_ok=True)
    assert "the loss is" in line and "learning_rate" in line, line
    report = json.loads((out / "report.json").read_text())  # the baseline was committed; the failed pass was not
    assert report["status"] == "failed" and [s["pass"] for s in report["steps"]] == ["baseline"]
    assert not (out / "model").exists()


def test_disk_full_while_committing_is_one_line(ctx, tmp_path, monkeypatch):
    import errno

    from deftcompress.pipeline import progress

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "progress.json"))

    monkeypatch.setattr(progress.RunProgress, "commit", full)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_yaml(ctx))
    result, _ = invoke(["apply", str(recipe), "-o", str(tmp_path / "out"), "--quiet"])
    line = check_result(result, codes=(1,), progress_ok=True)
    assert "No space left on device" in line and "progress.json" in line, line
