"""relufy then DEFT on MiniLM / SST-2 at the long budget: the density / accuracy frontier.

    DEFTCOMPRESS_DATA_DIR=../shared/data python benchmarks/relufy_frontier.py --targets 0.08,0.15 --seeds 42
    DEFTCOMPRESS_DATA_DIR=../shared/data python benchmarks/relufy_frontier.py --summarize

Each point is `recipes/relufy_then_deft.yaml` as shipped (relufy, then DEFT: LoRA on the attention and
up-projections, trained MLP biases, one epoch of SST-2 with held-out selection after the density
ramp), with its `density_target` (and optionally other deft options, `--deft`) replaced, and one
dense `evaluate` on all 872 dev rows. The PEFT reference is plain LoRA at the same budget from
`results/deft_vs_peft_long.jsonl` (mean of its seeds). Target (issue 14): exact density <= 10% at
<= 2 points below PEFT. Appends to results/relufy_frontier.jsonl; writes .md and .png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", default="0.08", help="density targets, comma-separated")
    p.add_argument("--seeds", default="42")
    p.add_argument("--deft", default="{}", help="JSON of further deft options for every point")
    p.add_argument("--tag", default=None, help="label of --deft options (in run names and rows)")
    p.add_argument("--out", default=str(HERE / "results" / "relufy_frontier"))
    p.add_argument("--summarize", action="store_true")
    p.add_argument("--smoke", action="store_true", help="2 steps on 64 rows, 32 dev rows; nothing appended")
    return p.parse_args(argv)


def peft_reference() -> tuple[float | None, int]:
    from deft_vs_peft import latest_per_run  # this folder's script: the same rule for rows of runs made again

    path = HERE / "results" / "deft_vs_peft_long.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    scores = [r["score"] for r in latest_per_run(rows)[0] if r.get("task", "glue/sst2") == "glue/sst2"
              and r["method"] == "lora" and r["run"] == "peft" and not r.get("pair_tag") and r["steps"] >= 2000]
    return (statistics.mean(scores), len(scores)) if scores else (None, 0)


def run_point(target: float, seed: int, extra: dict, tag: str | None, smoke: bool = False) -> dict:
    import yaml

    from deftcompress import Recipe, run_recipe

    shipped = yaml.safe_load((ROOT / "recipes" / "relufy_then_deft.yaml").read_text())
    relufy, deft = shipped["passes"][0], dict(shipped["passes"][1]["deft"])
    deft.update({"density_target": target, **extra})
    if smoke:
        deft.update({"max_steps": 2, "max_train_samples": 64, "eval_steps": 1, "validation_fraction": 0.25})
    name = f"relufy_deft_t{target:g}_s{seed}" + (f"_{tag}" if tag else "") + ("_smoke" if smoke else "")
    recipe = Recipe.build(name=name, model=shipped["model"], task=shipped["task"], seed=seed,
                          max_eval_samples=32 if smoke else None, passes=[relufy, {"deft": deft}, {"evaluate": {}}])
    start = time.perf_counter()
    report = run_recipe(recipe, output_dir=Path("runs") / "relufy_frontier" / name, quiet=True)
    relufied, trained = report.steps[1], report.steps[-1]
    details = report.steps[2].details
    return {"target": target, "seed": seed, "tag": tag, "deft": deft, "run_dir": str(Path("runs") / "relufy_frontier" / name),
            "accuracy": trained.task_score, "density": trained.density["encoder"],
            "per_layer": [round(layer["density"], 4) for layer in trained.density.get("per_layer", [])],
            "relufied_accuracy": relufied.task_score, "relufied_density": relufied.density["encoder"],
            "chosen_step": details.get("chosen_step"), "steps": details.get("steps"),
            "wall_seconds": round(time.perf_counter() - start, 1),
            "cmd": "python benchmarks/relufy_frontier.py " + " ".join(sys.argv[1:])}


def summarize(rows: list[dict], out: Path) -> str:
    latest = {r["run_dir"]: r for r in rows}  # a point made again replaces its earlier row
    rows = sorted(latest.values(), key=lambda r: (r.get("tag") or "", -r["target"], r["seed"]))
    peft, peft_seeds = peft_reference()
    lines = ["# relufy then DEFT: density / accuracy frontier (MiniLM, SST-2, one epoch)", "",
             "Produced by " + ", then ".join(f"`{c}`" for c in dict.fromkeys(r["cmd"] for r in rows)) +
             " (table: `python benchmarks/relufy_frontier.py --summarize`). Each point: `recipes/relufy_then_deft.yaml` "
             "with its density_target; all 872 dev rows; exact-nonzero MLP density over real tokens. "
             + (f"PEFT reference: plain LoRA at the same budget, {peft:.4f} (mean of {peft_seeds} seeds, "
                "`deft_vs_peft_long.jsonl`)." if peft is not None else "No PEFT reference found."),
             "Target: density <= 10% at <= 2 points below PEFT.", "",
             "| tag | density target | seed | accuracy | d vs PEFT (pts) | density | per layer | relufied, untrained (acc / density) | target met |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d = 100 * (r["accuracy"] - peft) if peft is not None else None
        met = d is not None and r["density"] <= 0.10 and d >= -2.0
        lines.append(f"| {r.get('tag') or '-'} | {r['target']:g} | {r['seed']} | {r['accuracy']:.4f} | "
                     f"{'-' if d is None else f'{d:+.2f}'} | {r['density']:.4f} | {', '.join(f'{x:.3f}' for x in r['per_layer'])} | "
                     f"{r['relufied_accuracy']:.4f} / {r['relufied_density']:.4f} | {'yes' if met else 'no'} |")
    text = "\n".join(lines) + "\n"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([r["density"] for r in rows], [r["accuracy"] for r in rows], "o")
        for r in rows:
            ax.annotate(f"t={r['target']:g}", (r["density"], r["accuracy"]), fontsize=8)
        if peft is not None:
            ax.axhline(peft, color="grey", lw=0.8, label="plain LoRA (PEFT)")
            ax.axhline(peft - 0.02, color="grey", lw=0.8, ls="--", label="PEFT - 2 points")
        ax.axvline(0.10, color="red", lw=0.8, ls=":", label="10% density")
        ax.set_xlabel("exact MLP density (real tokens)")
        ax.set_ylabel("SST-2 dev accuracy")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=120)
    except ImportError:
        pass
    return text


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    jsonl = out.with_suffix(".jsonl")
    if not args.summarize:
        extra = json.loads(args.deft)
        if extra and not args.tag:
            raise SystemExit("relufy_frontier.py: --deft needs --tag")
        for target in (float(t) for t in args.targets.split(",")):
            for seed in (int(s) for s in args.seeds.split(",")):
                row = run_point(target, seed, extra, args.tag, args.smoke)
                print(json.dumps({k: row[k] for k in ("target", "seed", "accuracy", "density")}), flush=True)
                if args.smoke:
                    print(summarize([row], Path("/tmp/relufy_frontier_smoke")))
                    continue
                jsonl.parent.mkdir(parents=True, exist_ok=True)
                with open(jsonl, "a") as f:
                    f.write(json.dumps(row) + "\n")
    if args.smoke:
        return
    rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()] if jsonl.is_file() else []
    out.with_suffix(".md").write_text(summarize(rows, out))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
