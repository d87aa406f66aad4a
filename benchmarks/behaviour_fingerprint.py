"""Behaviour fingerprint: the shipped recipes at a tiny budget, every number except timings.

A change that should not alter behaviour (a layout change, a refactor) is checked by running this
before and after it and diffing the two JSON files: scores, densities, sizes, counts and the
per-pass details must be identical; only timings may differ.

    DEFTCOMPRESS_DATA_DIR=../shared/data python benchmarks/behaviour_fingerprint.py --out before.json
    ... change ...
    DEFTCOMPRESS_DATA_DIR=../shared/data python benchmarks/behaviour_fingerprint.py --out after.json
    python benchmarks/behaviour_fingerprint.py --diff before.json after.json

Budgets are cut (`--steps`, `--train-rows`, `--eval-rows`) so that all recipes run in minutes on a CPU.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RECIPES = ["evaluate", "prune_then_deft", "structured_then_deft", "deft_to_onnx", "deft_then_quantize",
                   "relufy_then_deft", "ada_deft_sst2", "deft_adapter_sst2", "deft_prefix_sst2"]
# keys whose values are timings, paths or machine facts: they may differ between two runs of the same code
VOLATILE = re.compile(r"(^|_)(ms|s|seconds|time|times|timing|latency|elapsed|wall|speed|speedup|throughput|"
                      r"tokens_per_s|rows_per_s|steps_per_s|path|dir|folder|file|files|created|date|host|"
                      r"threads|machine|python|torch|version|versions|load|peak|rss|memory|calibration|"
                      r"sparse_vs_dense|dense_ms|sparse_ms|ratio_to_dense)($|_)")


def cut_budget(data: dict, steps: int, train_rows: int, eval_rows: int) -> dict:
    data = dict(data)
    data["max_eval_samples"] = eval_rows
    for item in data.get("passes", []):
        if not isinstance(item, dict):
            continue
        for options in item.values():
            if not isinstance(options, dict):
                continue
            if "max_steps" in options or "epochs" in options or "max_train_samples" in options:
                options["max_steps"] = steps
                options["max_train_samples"] = train_rows
                options.pop("epochs", None)
                options.pop("eval_steps", None)
                options["batch_size"] = min(int(options.get("batch_size") or 8), 8)
            if "check_rows" in options:
                options["check_rows"] = min(int(options["check_rows"]), eval_rows)
            if "rows" in options:
                options["rows"] = min(int(options["rows"]), eval_rows)
    return data


def stable(value, key: str = ""):
    """The value without timings and machine facts (dict keys matching VOLATILE are dropped)."""
    if isinstance(value, dict):
        return {k: stable(v, k) for k, v in sorted(value.items()) if not VOLATILE.search(str(k))}
    if isinstance(value, list):
        return [stable(v) for v in value]
    if isinstance(value, float):
        return round(value, 6)
    return value


def run(names: list[str], out: Path, steps: int, train_rows: int, eval_rows: int) -> None:
    from deftcompress import Recipe, run_recipe

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            data = yaml.safe_load((ROOT / "recipes" / f"{name}.yaml").read_text())
            data = cut_budget(data, steps, train_rows, eval_rows)
            data["name"] = f"fingerprint_{name}"
            recipe = Recipe.from_dict(data, source=f"recipes/{name}.yaml (budget cut)")
            run_recipe(recipe, output_dir=Path(tmp) / name, quiet=True)
            results[name] = stable(json.loads((Path(tmp) / name / "report.json").read_text()))
            print(f"{name}: done", file=sys.stderr)
    out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")


def diff(a, b, where: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        lines = []
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                lines.append(f"{where}.{k}: only in {'after' if k not in a else 'before'}")
            else:
                lines += diff(a[k], b[k], f"{where}.{k}")
        return lines
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [line for i, (x, y) in enumerate(zip(a, b)) for line in diff(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {a!r} -> {b!r}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="*", default=DEFAULT_RECIPES)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--train-rows", type=int, default=96)
    parser.add_argument("--eval-rows", type=int, default=48)
    parser.add_argument("--diff", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args()
    if args.diff:
        lines = diff(*(json.loads(p.read_text()) for p in args.diff))
        print("\n".join(lines) if lines else "identical (timings and machine facts aside)")
        sys.exit(1 if lines else 0)
    if args.out is None:
        parser.error("--out is required (or --diff BEFORE AFTER)")
    run(args.recipes, args.out, args.steps, args.train_rows, args.eval_rows)


if __name__ == "__main__":
    main()
