"""Do the shipped DEFT recipes end within their accuracy budget on dev? One row per finished run folder.

Each recipe states `max_score_drop`; its `deft` / `ada_deft` step trains the PEFT reference, searches on held-out
training rows and hands a model on. This table reads what the runs recorded (report.json) and sets the run's *final*
score (after any later step: int8, ONNX, onnxruntime) against the reference's score on the same evaluation rows,
which the budget step recorded after its choice (`on_evaluation_rows`, never used to choose).

    DEFTCOMPRESS_DATA_DIR=../shared/data deftcompress apply recipes/<name>.yaml -o runs/budget4/<name>   # each
    python benchmarks/budget_recipes.py runs/budget4/* --out benchmarks/results/budget_recipes
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from deftcompress.data.tasks import get_task
from deftcompress.reporting.report import Report
from deftcompress.training.score_budget import budget_outcome


def row(run: Path) -> dict | None:
    report = Report.load(run)
    # the run's end against the budget's reference, as apply records it (final.budget_outcome); computed the same
    # way for runs made before apply recorded it
    outcome = budget_outcome(report.steps, get_task(report.task)) if report.status == "finished" else None
    if outcome is None:  # unfinished, no budget, or made before the budget scored the evaluation rows
        return None
    step, final = report.steps[outcome["budget_step"]], report.final
    budget = step.details["budget"]
    on_dev = budget["on_evaluation_rows"]
    return {
        "run": run.name, "step": f"{step.index} {step.pass_name}", "metric": final["task_metric"],
        "held_out": f"{budget['held_out_rows']} ({budget.get('held_out_source', 'validation_fraction')})",
        "tried": [(t["value"], t["drop_points"], t["within_budget"], t.get("drop_se")) for t in budget["tried"]],
        "chosen": budget["chosen"], "within_held_out": budget["within_budget"],
        "reference_dev": on_dev["reference_score"], "step_dev": on_dev["chosen_score"],
        "step_drop": on_dev["drop_points"], "final_step": report.steps[-1].pass_name,
        "final_dev": final["task_score"], "final_drop": outcome["drop_points"],
        "final_density": (final.get("density") or {}).get("encoder"),
        "within_on_dev": outcome["within_budget"], "max_score_drop": budget["max_score_drop"],
        "search_seconds": budget["seconds"],
    }


def markdown(rows: list[dict], command: str, note: str = "") -> str:
    head = ("# Shipped DEFT recipes within `max_score_drop` on dev\n\n"
            f"Produced by `{command}` from finished run folders (`deftcompress apply recipes/<run>.yaml -o "
            "<folder>/<run>`, two runs at a time with OMP_NUM_THREADS=1 each). The search chooses on held-out "
            "training rows only; `reference dev` is the reference scored on the evaluation rows after the choice "
            "(reported only), `final dev` the run's last step (after int8 / ONNX where the recipe has them). "
            f"drop = reference dev - final dev, in points.{' ' + note if note else ''}\n\n")
    cols = ["run", "budget step", "held-out rows", "tried (value: held-out drop)", "handed on", "reference dev",
            "final step", "final dev", "drop (pts)", "density", "within on dev", "search min"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        tried = ", ".join(f"{v}: {d:+.2f}{'' if se is None else f' ± {se:.2f}'}{'' if ok else ' (out)'}"
                          for v, d, ok, se in r["tried"])
        density = "-" if r["final_density"] is None else f"{r['final_density']:.3f}"
        lines.append("| " + " | ".join([
            r["run"], r["step"], r["held_out"], tried, r["chosen"], f"{r['reference_dev']:.4f}", r["final_step"],
            f"{r['final_dev']:.4f}", f"{r['final_drop']:+.2f}", density,
            f"{'yes' if r['within_on_dev'] else 'NO'} ({r['max_score_drop']:g})", f"{r['search_seconds'] / 60:.0f}",
        ]) + " |")
    within = sum(r["within_on_dev"] for r in rows)
    # a run handing on its trained reference ends at its score (up to later steps): say how many compressed within
    compressed = [r for r in rows if r["within_held_out"]]
    compressed_within = sum(r["within_on_dev"] for r in compressed)
    return head + "\n".join(lines) + (f"\n\n{within} of {len(rows)} runs end within their budget on dev; "
                                      f"{len(compressed)} hand on a compressed point (the search found one within "
                                      f"the budget on its held-out rows), {compressed_within} of them within on dev; "
                                      f"the other {len(rows) - len(compressed)} found none (a trained reference is then handed on).\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished run folders of recipes with max_score_drop")
    parser.add_argument("--out", type=Path, required=True, help="writes OUT.md and OUT.json")
    parser.add_argument("--note", default="", help="a sentence for the table's header (which recipes' version ran)")
    args = parser.parse_args(argv)
    rows, skipped = [], []
    for run in sorted(args.runs):
        r = row(run) if (run / "report.json").is_file() else None
        (rows if r else skipped).append(r or run.name)
    if skipped:
        print(f"skipped (unfinished, no budget, or no evaluation-row scores): {', '.join(skipped)}", file=sys.stderr)
    command = ("python benchmarks/budget_recipes.py " + " ".join(str(p) for p in sorted(args.runs)) + f" --out {args.out}"
               + (f" --note '{args.note}'" if args.note else ""))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(markdown(rows, command, args.note))
    args.out.with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))
    print(markdown(rows, command, args.note))
    return 0


if __name__ == "__main__":
    sys.exit(main())
