"""How recipes/deploy_cpu.yaml was chosen: candidate chains scored on held-out TRAINING rows, never on dev.

Every candidate trains at the competitor's budget (250 steps of 32 rows drawn from 8,000, seed 42) with
`validation_fraction: 0.1` (800 of the 8,000 rows held out) and `eval_steps: 125`; the figure that decides is
the held-out accuracy of the kept step. `r0` is the competitor's training (plain LoRA, lr 5e-4, query, value
and MLP up-projection). The others remove layers (`depth_prune`) and MLP blocks (`ada_deft: skip_blocks`); the
batch-1 estimate of each structure comes from docs/deployment.md (int8 graphs with parts removed, timed side
by side: 3 of 6 layers 0.53x, about 0.09x per MLP block). Dev accuracy (100 rows) is shown, not used.

    python benchmarks/deploy_cpu_choice.py --write-recipes            # benchmarks/recipes/deploy_cpu_choice/*.yaml
    for r in benchmarks/recipes/deploy_cpu_choice/*.yaml; do
        DEFTCOMPRESS_DATA_DIR=../shared/data deftcompress apply $r -o runs/choice/$(basename $r .yaml) --quiet
    done                                                               # ~3 min each (two at a time: OMP_NUM_THREADS=1)
    python benchmarks/deploy_cpu_choice.py runs/choice/*               # the table
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "benchmarks" / "recipes" / "deploy_cpu_choice"
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

BUDGET = {"max_train_samples": 8000, "max_steps": 250, "batch_size": 32, "validation_fraction": 0.1, "eval_steps": 125}
GATES = {"method": "lora", "merge": True, "gate_lr": 0.05, "gate_ramp_ratio": 0.3, "gate_decision_ratio": 0.6}
DEFT = {"activation_scale_fold": "activation", "density_loss": "preact", "density_target": 0.38}
WIDE = {"target_modules": ["query", "key", "value", "dense"], "r": 16}

# name -> (layers removed, MLP blocks skipped of those left, ada_deft / deft settings)
CANDIDATES: dict[str, tuple[int, int | None, dict]] = {
    "r0": (0, None, {"method": "lora", "r": 8, "lora_alpha": 16, "density_weight": 0.0, "warmup_ratio": 0.06,
                     "merge": True, "learning_rate": 5.0e-4}),
    "c1": (3, 1, {**GATES, **DEFT, "learning_rate": 5.0e-4}),
    "c2": (2, 2, {**GATES, **DEFT, "learning_rate": 5.0e-4}),
    "c3": (2, 3, {**GATES, **DEFT, "learning_rate": 5.0e-4}),
    "c4": (4, 0, {**GATES, **DEFT, "learning_rate": 5.0e-4}),
    "e1": (3, 1, {**GATES, **DEFT, "learning_rate": 5.0e-4, "density_weight": 0.0}),
    "e2": (3, 1, {**GATES, **DEFT, "learning_rate": 5.0e-4, **WIDE}),
    "e3": (3, None, {"method": "lora", "density_weight": 0.0, "warmup_ratio": 0.06, "merge": True,
                     "learning_rate": 5.0e-4}),
    "e4": (3, 1, {**GATES, **DEFT, "learning_rate": 1.0e-3, **WIDE, "density_weight": 0.0}),
    "f1": (3, 1, {**GATES, **DEFT, "learning_rate": 1.0e-3, **WIDE}),
    "f2": (3, 1, {**GATES, **DEFT, "learning_rate": 2.0e-3, **WIDE, "density_weight": 0.0}),
}
LAYERS, MLP_SHARE, THREE_LAYERS = 6, 0.09, 0.53  # docs/deployment.md, batch 1, 1 thread


def recipe(name: str) -> dict:
    layers, skip, settings = CANDIDATES[name]
    passes: list = [{"depth_prune": {"layers": layers}}] if layers else []
    if skip is None:
        passes.append({"deft": {**settings, **BUDGET}})
    else:
        passes.append({"ada_deft": {**settings, "skip_blocks": skip, **BUDGET}})
    return {"name": name, "model": "minilm", "task": "glue/sst2", "seed": 42, "max_eval_samples": 100,
            "passes": passes}


def batch_one_estimate(layers: int, skip: int | None) -> float:
    """Latency against the competitor from the measured shares (docs/deployment.md), not a measurement."""
    left = LAYERS - layers
    by_depth = {6: 1.0, 4: 0.67, 3: THREE_LAYERS}.get(left, THREE_LAYERS * left / 3)
    return round(by_depth - MLP_SHARE * (skip or 0), 2)


def summarise(folders: list[Path]) -> dict:
    rows = []
    for folder in folders:
        report = json.loads((folder / "report.json").read_text())
        name = report["name"]
        last = report["steps"][-1]
        details = last["details"]
        chosen = details.get("chosen_step")
        held = next((e["score"] for e in details.get("step_evals", []) if e["step"] == chosen), None)
        layers, skip, settings = CANDIDATES[name]
        rows.append({"name": name, "layers_removed": layers, "mlp_skipped": skip or 0,
                     "lr": settings.get("learning_rate"), "targets": settings.get("target_modules", "default"),
                     "r": settings.get("r", 8), "density_weight": settings.get("density_weight", 1.0),
                     "held_out": held, "held_out_rows": details.get("held_out_rows"), "chosen_step": chosen,
                     "dev_100": last["task_score"], "skipped": (details.get("blocks") or {}).get("skipped"),
                     "removed_layers": next((s["details"].get("removed") for s in report["steps"]
                                             if s["pass"] == "depth_prune"), None),
                     "batch1_estimate": batch_one_estimate(layers, skip), "folder": str(folder)})
    reference = next(r for r in rows if r["name"] == "r0")["held_out"]
    for r in rows:
        r["vs_r0_points"] = round(100 * (r["held_out"] - reference), 2)
    eligible = [r for r in rows if r["batch1_estimate"] <= 0.5]
    best = max(eligible, key=lambda r: r["held_out"])["name"] if eligible else None
    return {"rows": rows, "reference": reference, "chosen": best,
            "rule": "the best held-out accuracy among the structures estimated at <= 0.5x the competitor's batch-1 latency"}


def markdown(result: dict, command: str) -> str:
    lines = ["# How deploy_cpu was chosen: held-out training rows", "", f"Command: `{command}`", "",
             "Each candidate trained at the competitor's budget with 800 of its 8,000 training rows held out "
             "(`validation_fraction: 0.1`, evaluated at steps 125 and 250, the better kept). The held-out "
             "accuracy decides; dev (first 100 rows) is shown and was not used. Batch-1 latency is the estimate "
             "from the measured shares in docs/deployment.md; benchmarks/deploy_cpu.py measures the chosen chain.",
             "", f"Rule: {result['rule']}. Chosen: **{result['chosen']}**.", "",
             "| run | layers removed | MLP blocks skipped | LoRA targets, r | lr | density weight | held-out acc | vs r0 "
             "| dev (100) | batch-1 estimate |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        targets = "q,k,v,all dense" if r["targets"] != "default" else "default (q, v, MLP up)"
        lines.append(f"| {r['name']} | {r['layers_removed']} {r['removed_layers'] or ''} | {r['mlp_skipped']} "
                     f"{r['skipped'] or ''} | {targets}, {r['r']} | {r['lr']:g} | {r['density_weight']:g} | "
                     f"{r['held_out']:.4f} | {r['vs_r0_points']:+.2f} | {r['dev_100']:.2f} | {r['batch1_estimate']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", type=Path, help="finished run folders of the candidates")
    parser.add_argument("--write-recipes", action="store_true", help="write the candidate recipes and stop")
    args = parser.parse_args(argv)
    if args.write_recipes:
        RECIPES.mkdir(parents=True, exist_ok=True)
        for name in CANDIDATES:
            (RECIPES / f"{name}.yaml").write_text(yaml.safe_dump(recipe(name), sort_keys=False))
        print(f"wrote {len(CANDIDATES)} recipes to {RECIPES}")
        return
    result = summarise(args.runs)
    command = "python benchmarks/deploy_cpu_choice.py " + " ".join(str(p) for p in args.runs)
    (RESULTS / "deploy_cpu_choice.json").write_text(json.dumps({"command": command, **result}, indent=2) + "\n")
    (RESULTS / "deploy_cpu_choice.md").write_text(markdown(result, command))
    print(markdown(result, command))


if __name__ == "__main__":
    main()
