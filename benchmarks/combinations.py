"""Pruning and quantization combined with DEFT: MiniLM on SST-2.

    DEFTCOMPRESS_DATA_DIR=../shared/data python benchmarks/combinations.py

Each row is a recipe run through the real pipeline (the DEFT settings are those of
recipes/prune_then_deft.yaml, with the budget set here). Score, density, parameters and size come
from each run's report; latency is measured afterwards for all final models in one alternating loop
(median of --repeats), as a ratio to the PEFT baseline. Writes results/combinations.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml

from deftcompress.measurement.evaluation import EvalSettings, evaluate
from deftcompress.pipeline.runner import Pipeline
from deftcompress.pipeline.recipe import Recipe

ROOT = Path(__file__).resolve().parents[1]


def deft_settings(train_samples: int, steps: int | None) -> dict:
    recipe = yaml.safe_load((ROOT / "recipes" / "prune_then_deft.yaml").read_text())
    deft = next(p["deft"] for p in recipe["passes"] if "deft" in p)
    return {**deft, "max_train_samples": train_samples, "max_steps": steps}


def combinations(deft: dict) -> dict[str, list[dict]]:
    peft = {**deft, "density_weight": 0.0}
    return {
        "peft (baseline)": [{"deft": peft}],
        "deft": [{"deft": deft}],
        "magnitude 30% + deft": [{"magnitude_prune": {"sparsity": 0.3}}, {"deft": deft}],
        "magnitude 50% + deft": [{"magnitude_prune": {"sparsity": 0.5}}, {"deft": deft}],
        "structured 30% + deft": [{"structured_prune": {"mlp_ratio": 0.3}}, {"deft": deft}],
        # 1/s kept after the activation: folded into the weights, int8 collapsed (results/int8_after_deft.md)
        "deft + int8": [{"deft": {**deft, "merge": True, "activation_scale_fold": "activation"}},
                        {"quantize": {"backend": "torch_int8"}}],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-samples", type=int, default=8000)
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--eval-samples", type=int, default=None, help="default: all 872 dev rows")
    parser.add_argument("--repeats", type=int, default=5, help="latency repetitions (alternating over models)")
    parser.add_argument("--only", nargs="*", help="run only these rows (names as in the table)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "combinations"))
    args = parser.parse_args()

    deft = deft_settings(args.train_samples, args.steps)
    rows, models = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, passes in combinations(deft).items():
            if args.only and name not in args.only:
                continue
            recipe = Recipe.build(name="combo", model="minilm", task="glue/sst2", seed=42,
                                  max_eval_samples=args.eval_samples, passes=passes)
            pipeline = Pipeline(recipe, output_dir=Path(tmp) / f"run{len(rows)}", quiet=True)
            t0 = time.perf_counter()
            report = pipeline.run()
            final = report.final
            print(f"{name}: {final['task_metric']}={final['task_score']:.4f} density={final['density']['encoder']:.4f} "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
            rows.append({"name": name, "passes": passes, "accuracy": final["task_score"],
                         "density": final["density"]["encoder"], "density_above_tau": final["density"]["encoder_above_tau"],
                         "params": final["params"], "nonzero_params": final["nonzero_params"],
                         "state_dict_bytes": final["size_bytes"], "saved_bytes": final["saved_model_bytes"],
                         "run_seconds": time.perf_counter() - t0})
            state = pipeline.final_state
            models[name] = (state.model, state.tokenizer, state.task, state.arch)
            examples = state.eval_examples()

    # Latency: every final model, alternating, in one loop (density off: pure inference cost).
    times: dict[str, list[float]] = {n: [] for n in models}
    settings = EvalSettings(measure_density=False)
    for _ in range(args.repeats):
        for name, (model, tok, task, arch) in models.items():
            t0 = time.perf_counter()
            evaluate(model, tok, task, examples, arch, settings, progress=False)
            times[name].append((time.perf_counter() - t0) / len(examples))
    base = statistics.median(times[rows[0]["name"]])
    for row in rows:
        row["latency_ms_per_example"] = 1000 * statistics.median(times[row["name"]])
        row["latency_ratio"] = statistics.median(times[row["name"]]) / base

    command = "DEFTCOMPRESS_DATA_DIR=../shared/data python benchmarks/combinations.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in (("train_samples", args.train_samples), ("steps", args.steps),
                                                    ("repeats", args.repeats)))
    out = {"benchmark": "combinations", "command": command, "deft": deft, "eval_examples": len(examples),
           "torch_threads": torch.get_num_threads(), "rows": rows}
    Path(args.out + ".json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [f"# Pruning / quantization + DEFT on MiniLM, SST-2 dev ({len(examples)} rows)", "",
             f"Command: `{command}`", "",
             f"DEFT settings (from recipes/prune_then_deft.yaml): `{json.dumps(deft)}`", "",
             "| combination | accuracy | density | |a|>tau | params | nonzero params | saved size | latency ms/ex | latency ratio |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['accuracy']:.4f} | {r['density']:.4f} | {r['density_above_tau']:.4f} | "
                     f"{r['params'] / 1e6:.2f}M | {r['nonzero_params'] / 1e6:.2f}M | {r['saved_bytes'] / 1e6:.1f} MB | "
                     f"{r['latency_ms_per_example']:.2f} | {r['latency_ratio']:.2f}x |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
