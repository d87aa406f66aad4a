"""ADA-DEFT against DEFT: accuracy, density, skipped blocks, latency and memory (MiniLM on SST-2, all dev rows).

Trains DEFT (LoRA, the settings of recipes/ada_deft_sst2.yaml without the block weights) and ADA-DEFT
skipping each budget of blocks, with the same data order and steps, then times every model in one
process, alternating, on the same SST-2 dev rows at batch 1 and batch 32 (medians of the repeats), and
measures memory (weights in memory; peak of one forward of the largest batch: see
deftcompress.measurement.speed). Ratios are to DEFT. Target: >= 15% lower latency and >= 15% less
memory at <= 1 point accuracy.

With --llama it does the same on a tiny Llama-style decoder (random init, 4 layers) trained on SST-2,
and also times greedy decoding (the decoder path with its KV cache) of a causal-LM model that carries
the same backbone weights: score on a random-init toy is not meaningful, latency and memory are.

Finished runs under --runs are reused (delete them to retrain). Run alone: it times.

    DEFTCOMPRESS_DATA_DIR=../shared/data python benchmarks/ada_deft.py --budgets 1,2,3 --repeats 7
    DEFTCOMPRESS_DATA_DIR=../shared/data python benchmarks/ada_deft.py --llama --budgets 1,2 --repeats 7
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
GATE_FIELDS = ("skip_blocks", "skip_fraction", "gate_penalty", "skip_threshold", "gate_lr", "gate_ramp_ratio",
               "gate_decision_ratio", "gate_controller_rate", "gate_lambda_max", "measure_speed", "speed_rows",
               "speed_repeats")


def parse_budget(item: str) -> tuple[str, int, dict, int | None]:
    """'3', '3:gate_decision_ratio=0.4' or '3:seed=43' -> (run name, blocks to skip, ada_deft overrides, seed)."""
    k, *settings = item.split(":")
    overrides = {}
    for setting in settings:
        key, value = setting.split("=", 1)
        overrides[key] = yaml.safe_load(value)
    seed = overrides.pop("seed", None)
    name = f"ada_k{int(k)}" + "".join(f"-{key}{value}" for key, value in overrides.items())
    return name + (f"-seed{seed}" if seed is not None else ""), int(k), overrides, seed


def recipes(base: dict, budgets: list[str], deft_seeds: list[int], model: str, steps: int | None) -> dict[str, dict]:
    """DEFT (per seed) and one ADA-DEFT recipe per budget, identical apart from the block weights (and overrides)."""
    ada = dict(base["passes"][0]["ada_deft"])
    if steps:
        ada["max_steps"] = steps
    deft = {k: v for k, v in ada.items() if k not in GATE_FIELDS}
    common = {k: v for k, v in base.items() if k not in ("passes", "name")}
    common["model"] = model
    out = {}
    for seed in deft_seeds:
        name = "deft" if seed == base["seed"] else f"deft-seed{seed}"
        out[name] = {**common, "seed": seed, "name": name, "passes": [{"deft": deft}]}
    for item in budgets:
        name, k, overrides, seed = parse_budget(item)
        out[name] = {**common, "seed": base["seed"] if seed is None else seed, "name": name,
                     "passes": [{"ada_deft": {**ada, "skip_blocks": k, "measure_speed": False, **overrides}}]}
    return out


def run_or_reuse(name: str, recipe: dict, runs: Path) -> dict:
    from deftcompress import Recipe, run_recipe

    out = runs / name
    report = out / "report.json"
    if report.is_file() and json.loads(report.read_text()).get("status") == "finished":
        print(f"{name}: reusing {out}", flush=True)
    else:
        print(f"{name}: training ...", flush=True)
        run_recipe(Recipe.from_dict(recipe), output_dir=out, quiet=True)  # resumes an unfinished run
    data = json.loads(report.read_text())
    last = data["steps"][-1]
    blocks = next((s["details"].get("blocks") for s in data["steps"] if s["pass"] == "ada_deft"), None)
    density = last["density"]
    return {"name": name, "accuracy": last["task_score"],
            "density": density.get("encoder") if density.get("encoder") is not None else density.get("decoder"),
            "skipped": blocks["skipped"] if blocks else [],
            "learned_weights": blocks["learned_weights"] if blocks else None,
            "train_seconds": next(s["details"]["train_seconds"] for s in data["steps"] if s["pass"] in ("deft", "ada_deft")),
            "folder": str(out)}


def tiny_llama_checkpoint(folder: Path) -> str:
    """A random-init Llama-style classifier (4 layers, hidden 256, MLP 1024) with MiniLM's tokenizer."""
    import transformers

    from deftcompress.core.model_refs import alias_path

    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        config = transformers.LlamaConfig(vocab_size=30522, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                          num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
                                          pad_token_id=0, hidden_act="silu", num_labels=2)
        transformers.LlamaForSequenceClassification(config).save_pretrained(folder)
        transformers.AutoTokenizer.from_pretrained(alias_path("minilm")).save_pretrained(folder)
    return str(folder)


def causal_lm_from(classifier):
    """A LlamaForCausalLM with the classifier's backbone (skipped blocks included) and a fixed random LM head."""
    import copy

    import transformers

    torch.manual_seed(1)
    lm = transformers.LlamaForCausalLM(copy.deepcopy(classifier.config))
    lm.model = copy.deepcopy(classifier.model)
    return lm.eval()


def time_decoding(models: dict, tokenizer, rows: list[dict], new_tokens: int, repeats: int) -> dict[str, float]:
    """Median ms per generated token, greedy, batch 1, KV cache on; models alternate."""
    prompts = [{k: v for k, v in tokenizer(r["text_a"], return_tensors="pt", truncation=True, max_length=32).items()
                if k in ("input_ids", "attention_mask")} for r in rows]
    names = list(models)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats + 1):
        for n in (names if r % 2 == 0 else names[::-1]):
            start = time.perf_counter()
            with torch.inference_mode():
                for p in prompts:
                    models[n].generate(**p, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                       pad_token_id=0)
            if r:  # the first round warms up
                times[n].append((time.perf_counter() - start) / (len(prompts) * new_tokens))
    return {n: round(1000 * statistics.median(t), 4) for n, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="1,2,3",
                        help="blocks to skip per run, comma-separated; '3:gate_decision_ratio=0.4' adds ada_deft overrides")
    parser.add_argument("--deft-seeds", default=None, help="seeds of the DEFT reference runs (default: the recipe's)")
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "ada_deft_sst2.yaml")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "ada_deft_bench")
    parser.add_argument("--llama", action="store_true", help="the tiny Llama-style decoder instead of MiniLM")
    parser.add_argument("--steps", type=int, default=None, help="override max_steps")
    parser.add_argument("--rows", type=int, default=128, help="dev rows in the timing workload")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch threads while timing (default: torch's)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--render", action="store_true", help="only write the .md again from the committed .json")
    args = parser.parse_args()
    if args.render:
        out = args.out or ROOT / "benchmarks" / "results" / ("ada_deft_llama" if args.llama else "ada_deft")
        out.with_suffix(".md").write_text(markdown(json.loads(out.with_suffix(".json").read_text()), args.llama))
        return
    warnings.filterwarnings("ignore")
    logging.getLogger().setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()

    from deftcompress.data.tasks import get_task, load_examples
    from deftcompress.measurement.speed import compare_speed
    from deftcompress.models.formats import load_model

    budgets = [b for b in args.budgets.split(",") if b]
    base = yaml.safe_load(args.recipe.read_text())
    kind = "llama" if args.llama else "minilm"
    runs = args.runs / kind
    model_ref = tiny_llama_checkpoint(runs / "checkpoint") if args.llama else base["model"]
    deft_seeds = [int(s) for s in args.deft_seeds.split(",")] if args.deft_seeds else [base["seed"]]
    planned = recipes(base, budgets, deft_seeds, model_ref, args.steps)
    rows = [run_or_reuse(name, recipe, runs) for name, recipe in planned.items()]
    for row in rows:
        row["seed"] = planned[row["name"]]["seed"]

    if args.threads:
        torch.set_num_threads(args.threads)
    task = get_task(base["task"])
    dev = load_examples(task, "validation", None, args.rows)
    models, tokenizer, arch = {}, None, None
    for row in rows:
        models[row["name"]], tokenizer, arch = load_model(Path(row["folder"]) / "model")
    speed = compare_speed(models, tokenizer, task, arch, dev, batch_sizes=(1, 32), repeats=args.repeats,
                          max_seq_length=base.get("max_seq_length", 128), batch_one_rows=32, progress=True)
    measured = speed.to_dict()
    decoding = None
    if args.llama:
        lms = {n: causal_lm_from(m) for n, m in models.items()}
        decoding = time_decoding(lms, tokenizer, dev[:8], new_tokens=16, repeats=args.repeats)
    reference = rows[0]
    deft_by_seed = {r["seed"]: r for r in rows if r["name"].startswith("deft")}
    for row in rows:
        m = measured["models"][row["name"]]
        same_seed = deft_by_seed.get(row["seed"], reference)  # accuracy against the DEFT run of the same seed
        row.update({"points_vs_deft": round(100 * (row["accuracy"] - same_seed["accuracy"]), 2),
                    "latency_b1": m["latency_ratio_batch_1"], "latency_b32": m["latency_ratio_batch_32"],
                    "weight_memory": m["weight_ratio"], "peak_memory": m["peak_ratio"],
                    "ms_b1": m["ms_batch_1"], "ms_b32": m["ms_batch_32"], "weight_mb": round(m["weight_bytes"] / 1e6, 2),
                    "peak_forward_mb": round(m["peak_forward_bytes"] / 1e6, 2)})
        if decoding:
            row["decode_ms_per_token"] = decoding[row["name"]]
            row["decode_ratio"] = round(decoding[row["name"]] / decoding[reference["name"]], 4)
        row["target_met"] = (not row["name"].startswith("deft") and row["points_vs_deft"] >= -1.0
                             and row["latency_b1"] <= 0.85 and row["latency_b32"] <= 0.85 and row["peak_memory"] <= 0.85)
    command = "python benchmarks/ada_deft.py " + " ".join(sys.argv[1:])
    out = args.out or ROOT / "benchmarks" / "results" / ("ada_deft_llama" if args.llama else "ada_deft")
    payload = {"command": command, "threads": torch.get_num_threads(), "workload": measured["workload"],
               "rows": rows, "model": model_ref, "recipe": str(args.recipe.relative_to(ROOT)),
               "means": seed_means(rows)}
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(payload, args.llama))
    print(out.with_suffix(".md").read_text())


def seed_means(rows: list[dict]) -> list[dict]:
    """Configurations run with more than one seed: mean accuracy, points against DEFT, and timing ratios."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["name"].split("-seed")[0], []).append(r)
    out = []
    for name, group in groups.items():
        if len(group) < 2:
            continue
        mean = lambda key: round(sum(r[key] for r in group) / len(group), 4)  # noqa: E731
        out.append({"config": name, "seeds": [r["seed"] for r in group], "accuracy": mean("accuracy"),
                    "points_vs_deft": round(mean("points_vs_deft"), 2), "latency_b1": mean("latency_b1"),
                    "latency_b32": mean("latency_b32"), "peak_memory": mean("peak_memory"),
                    "target_met": (not name.startswith("deft") and mean("points_vs_deft") >= -1.0
                                   and mean("latency_b1") <= 0.85 and mean("latency_b32") <= 0.85
                                   and mean("peak_memory") <= 0.85)})
    return out


def markdown(payload: dict, llama: bool) -> str:
    rows = payload["rows"]
    lines = [f"# ADA-DEFT against DEFT ({'tiny Llama-style decoder, random init' if llama else 'MiniLM'}, SST-2)", "",
             f"Command: `DEFTCOMPRESS_DATA_DIR=../shared/data {payload['command']}` (torch threads: {payload['threads']}).",
             f"Recipe: `{payload['recipe']}` (DEFT row: the same fields without the block weights). Accuracy and density",
             "on all SST-2 dev rows (density: exact nonzero MLP activations over real tokens, in the blocks that run).",
             f"Latency: median ms per batch over {payload['workload']['repeats']} alternating repetitions in one process,",
             f"batch 1 on 32 dev rows, batch 32 on {payload['workload']['rows']} rows. Memory: weights in memory, and",
             "weights + the peak bytes one forward of the largest batch allocates. Ratios are to DEFT.", ""]
    head = "| run | skipped | accuracy | vs DEFT (points) | density | latency b1 | latency b32 | weights | peak memory |"
    sep = "|---|---|---|---|---|---|---|---|---|"
    if llama:
        head += " decode ms/token | decode ratio |"
        sep += "---|---|"
    lines += [head + " target met |", sep + "---|"]
    for r in rows:
        line = (f"| {r['name']} | {', '.join(r['skipped']) or '-'} | {r['accuracy']:.4f} | {r['points_vs_deft']:+.2f} | "
                f"{r['density']:.4f} | {r['latency_b1']:.3f} ({r['ms_b1']:.2f} ms) | {r['latency_b32']:.3f} "
                f"({r['ms_b32']:.1f} ms) | {r['weight_memory']:.3f} ({r['weight_mb']:.1f} MB) | {r['peak_memory']:.3f} |")
        if llama:
            line += f" {r['decode_ms_per_token']:.3f} | {r['decode_ratio']:.3f} |"
        lines.append(line + (" - |" if r["name"].startswith("deft") else f" {'yes' if r['target_met'] else 'no'} |"))
    lines += ["", "Target: latency (both batch sizes) and peak memory <= 0.85x DEFT at >= -1.0 point "
                  "(points against the DEFT run of the same seed).", ""]
    if payload.get("means"):
        lines += ["Mean over seeds:", "", "| configuration | seeds | accuracy | vs DEFT (points) | latency b1 | latency b32 | "
                  "peak memory | target met |", "|---|---|---|---|---|---|---|---|"]
        for m in payload["means"]:
            lines.append(f"| {m['config']} | {', '.join(map(str, m['seeds']))} | {m['accuracy']:.4f} | "
                         f"{m['points_vs_deft']:+.2f} | {m['latency_b1']:.3f} | {m['latency_b32']:.3f} | "
                         f"{m['peak_memory']:.3f} | {'-' if m['config'].startswith('deft') else ('yes' if m['target_met'] else 'no')} |")
        lines.append("")
    learned = [r for r in rows if r["learned_weights"]]
    if learned:
        lines += ["Learned block weights at the end (skipped blocks at 0; kept ones folded into their down-projection):", ""]
        for r in learned:
            lines.append(f"- {r['name']}: " + ", ".join(f"{k} {v:.3f}" for k, v in r["learned_weights"].items()))
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
