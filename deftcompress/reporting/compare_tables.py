"""Comparing finished runs: one row per run, the Pareto fronts, and compare.{json,md,csv,png} (torch-free).

Rows come from each run's `report.json` and `recipe.resolved.yaml`. Latency comes from one
side-by-side timing of every run's final model in one process (`deftcompress.pipeline.compare_runs`),
as ratios to the first row; without it (`--no-timing`), each run's own fixed-workload figures are
shown and marked as not comparable across runs.

A run is on the Pareto front of a cost (density, latency, size) when no other run has a score at
least as high and a cost at least as low, one of them strictly.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from deftcompress.reporting.plots import save_figure
from deftcompress.reporting.report import (Report, measured_in_onnxruntime, measuring_step, spread_exceeds,
                                           write_atomic)
from deftcompress.reporting.text import md_cell, md_code

COSTS = {"density": "MLP activation density", "latency": "latency at batch 1 (x first row)",
         "size": "size on disk (MB)"}


@dataclass
class CompareRow:
    name: str
    folder: str
    passes: str  # `prune30 > deft(lora) > int8`
    task_metric: str
    score: float
    density_encoder: float | None
    density_decoder: float | None
    params: int
    nonzero_params: int
    size_bytes: int
    runtime: str  # torch | onnxruntime
    recipe_hash: str | None = None
    density_mode: str | None = None  # masked (real tokens) | paper: the run's own mode, from its last step in it
    sweep: dict[str, Any] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)  # "b1" / "b64" -> median ms per batch
    latency_ratio: dict[str, float] = field(default_factory=dict)  # to the first row, same keys
    timing: str = "report"  # compare: timed side by side in one process; report: the run's own figures
    reused: str = ""  # how the run was obtained: ran, resumed, reused, given
    timing_load: float = 0.0  # share of the machine other processes used while the timing ran
    task: str = ""  # the task the score is on (one table holds one task and metric)
    latency_spread: dict[str, list[float]] = field(default_factory=dict)  # "b1" -> [q1, q3] ms over the repeats
    rows: int = 0  # evaluation rows the score was measured on
    ship: str = ""  # the folder a deployer ships (deploy/ or model/), relative to the run folder
    peak_memory_bytes: int | None = None  # a fresh process loading the artifact and running one batch (timing only)
    budget: dict[str, Any] | None = None  # the accuracy budget's search of the run's last step that had one
    decoding: dict[str, Any] | None = None  # evaluate's decode_speed of the run's last step that had one

    @property
    def density(self) -> float | None:
        return self.density_encoder if self.density_encoder is not None else self.density_decoder

    def cost(self, what: str) -> float | None:
        if what == "density":
            return self.density
        if what == "latency":  # only timings taken side by side on a quiet machine are ranked
            return self.latency_ratio.get("b1") if self.timing == "compare" else None
        if what == "size":
            return self.size_bytes / 1e6
        raise KeyError(what)


def passes_label(resolved: dict[str, Any]) -> str:
    """`prune30 > deft(lora) > int8` from a resolved recipe mapping (each pass's `label`)."""
    from deftcompress.core.config import parse_config
    from deftcompress.core.registry import all_passes

    known = all_passes()
    labels = []
    for item in resolved.get("passes") or []:
        (name, config), = item.items() if isinstance(item, dict) else ((item, {}),)
        cls = known.get(name)
        try:
            labels.append(cls.label(parse_config(cls.Config, config, name)) if cls else name)
        except Exception:  # a config this version cannot read: the name still says what ran
            labels.append(name)
    return " > ".join(labels)


def row_from_run(folder: str | Path, sweep: dict[str, Any] | None = None, reused: str = "given") -> CompareRow:
    """The comparison row of a finished run folder."""
    folder = Path(folder)
    report = Report.load(folder)
    resolved_path = folder / "recipe.resolved.yaml"
    resolved = yaml.safe_load(resolved_path.read_text()) if resolved_path.is_file() else {}
    last = report.steps[-1]
    # density in the run's own mode (the baseline's): a closing `evaluate: {density_mode: paper}` does not
    # make one run's figure incomparable with another's
    mode = report.steps[0].density.get("mode")
    measured = next((s for s in reversed(report.steps) if s.density.get("mode") == mode), last)
    final = report.final or {}
    # the runtime of the step that measured: a closing evaluate that reused the measurement says nothing of it
    measured_last = measuring_step(report.steps)
    on_graph = measured_in_onnxruntime(measured_last)
    # size: the files holding the weights a deployer ships (the .onnx files; model/'s safetensors), no tokenizer,
    # config or card: the same figure as the step's own size and the deployment benchmark's
    size = int(measured_last.size_bytes) if on_graph else (weight_file_bytes(folder / "model")
                                                           or int(final.get("saved_model_bytes") or last.size_bytes))
    label = passes_label(resolved) or " > ".join(s.pass_name for s in report.steps[1:])  # older runs: no resolved recipe
    row = CompareRow(name=report.name, folder=str(folder), passes=label or "-",
                     task_metric=last.task_metric, score=float(last.task_score),
                     density_encoder=measured.density.get("encoder"), density_decoder=measured.density.get("decoder"),
                     density_mode=mode,
                     params=int(last.params), nonzero_params=int(last.nonzero_params), size_bytes=size,
                     runtime="onnxruntime" if on_graph else "torch", recipe_hash=report.recipe_hash,
                     sweep=dict(sweep or {}), reused=reused, task=str(report.task), rows=int(measured_last.eval_examples),
                     ship=_ship(final))
    row.latency_ms = {f"b{k[9:]}": float(v) for k, v in last.latency.items() if k.startswith("ms_batch_") and v}
    searched = [s for s in report.steps if (s.details or {}).get("budget")]
    if searched:
        row.budget = {"step": searched[-1].index, "pass": searched[-1].pass_name, **searched[-1].details["budget"],
                      "outcome": final.get("budget_outcome")}
    decoded = [s for s in report.steps if (s.details or {}).get("decoding")]
    if decoded:
        row.decoding = {"step": decoded[-1].index, **decoded[-1].details["decoding"]}
    return row


def decoding_summary(decoding: dict[str, Any] | None) -> tuple[str, float, float] | None:
    """(the runtime the step measured in, its tokens/s, its ratio to the dense PyTorch model timed beside it)."""
    if not decoding:
        return None
    name, r = list(decoding["runtimes"].items())[-1]
    return name, r["tokens_per_second"], r["speedup"]


def _ship(final: dict[str, Any]) -> str:
    """The folder to deploy: final.deploy's (older runs: model/); '-' when the run has nothing to ship."""
    deploy = final.get("deploy")
    if deploy is None:
        return "model/"
    return f"{deploy['folder']}/" if deploy.get("folder") else "-"


def weight_file_bytes(folder: Path) -> int:
    """Bytes of the weight files (safetensors, .onnx and their external data) under a saved model folder."""
    if not folder.is_dir():
        return 0
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink()
               and (p.suffix in (".safetensors", ".onnx") or p.name.endswith((".onnx_data", ".onnx.data"))))


def comparable_rows(rows: list[CompareRow]) -> list[bool]:
    """Scores compare only when measured on the same number of rows as run 1's (older runs record none)."""
    first = rows[0].rows if rows else 0
    return [not first or not r.rows or r.rows == first for r in rows]


def set_report_ratios(rows: list[CompareRow]) -> None:
    """Without side-by-side timing: each run's own figures are shown, but no ratio and no latency front (they
    were timed in separate processes, so a ratio between them would rank the machine's moods)."""
    for row in rows:
        row.timing = "report"
        row.latency_ratio = {}


def uncertain(row: CompareRow, key: str) -> bool:
    """True when the spread of a row's repeats is larger than its difference to the first row."""
    ratio = row.latency_ratio.get(key)
    return ratio is not None and spread_exceeds(ratio, (row.latency_spread.get(key), row.latency_ms.get(key)))


def pareto_front(points: list[tuple[float | None, float | None]]) -> list[int]:
    """Indices of the points (score, cost) no other point dominates: higher score and lower cost win."""
    front = []
    for i, (score, cost) in enumerate(points):
        if score is None or cost is None or math.isnan(score) or math.isnan(cost):
            continue
        dominated = any(s is not None and c is not None and s >= score and c <= cost and (s > score or c < cost)
                        for j, (s, c) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return front


def _better(row: CompareRow) -> float:
    return -row.score if row.task_metric == "perplexity" else row.score  # the front wants higher = better


def fronts(rows: list[CompareRow]) -> dict[str, list[str]]:
    """Run names on each front; a run scored on other rows than run 1 is left out (its score does not compare)."""
    ok = comparable_rows(rows)
    return {what: [rows[i].name for i in pareto_front([(_better(r) if ok[j] else None, r.cost(what))
                                                       for j, r in enumerate(rows)])] for what in COSTS}


# ---- tables --------------------------------------------------------------------------------------

def _sweep_keys(rows: list[CompareRow]) -> list[str]:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r.sweep if k not in keys]
    return keys


def table(rows: list[CompareRow]) -> list[list[str]]:
    """Header and one line per row (the terminal, compare.md)."""
    keys = _sweep_keys(rows)
    sizes = sorted({k for r in rows for k in r.latency_ms}, key=lambda k: int(k[1:]))
    on_front = {what: set(names) for what, names in fronts(rows).items()}
    metric = rows[0].task_metric if rows else "score"
    head = ["#", "run", *keys, "passes", metric, "rows", "density enc", "density dec", "nonzero", "size",
            *[f"ms {k}" for k in sizes], *[f"latency {k}" for k in sizes], "peak memory", "runtime", "ship", "front"]
    budgets = any(r.budget for r in rows)
    if budgets:
        head.insert(head.index("ship"), "budget")
    decodes = any(r.decoding for r in rows)
    if decodes:
        head.insert(head.index("runtime"), "decode tok/s")
    out = [head]
    ok = comparable_rows(rows)
    for i, r in enumerate(rows, 1):
        marks = "".join(m for m, what in (("d", "density"), ("l", "latency"), ("s", "size")) if r.name in on_front[what])
        out.append([str(i), r.name, *[str(r.sweep.get(k, "-")) for k in keys], r.passes,
                    f"{r.score:.4f}{'' if ok[i - 1] else '!'}", str(r.rows or "-"),
                    _num(r.density_encoder), _num(r.density_decoder), f"{r.nonzero_params / 1e6:.2f}M",
                    f"{r.size_bytes / 1e6:.1f}MB", *[_num(r.latency_ms.get(k), 2) for k in sizes],
                    *[(f"{r.latency_ratio[k]:.2f}x{'~' if i > 1 and uncertain(r, k) else ''}" if k in r.latency_ratio else "-")
                      for k in sizes], _mb(r.peak_memory_bytes), *([_decode_cell(r)] if decodes else []), r.runtime,
                    *([_budget_cell(r)] if budgets else []),
                    r.ship or "-", marks or "-"])
    return out


def _decode_cell(r: CompareRow) -> str:
    summary = decoding_summary(r.decoding)
    if summary is None:
        return "-"
    name, rate, ratio = summary
    return f"{rate:.1f} {name}" + ("" if name == "torch" else f" ({ratio:.2f}x torch)")


def _budget_cell(r: CompareRow) -> str:
    """max_score_drop and whether the run ended within it, on held-out training rows ('-': no budget)."""
    if not r.budget:
        return "-"
    dev = r.budget.get("outcome") or r.budget.get("on_evaluation_rows")  # the run's end, else the budget's step
    on_dev = f" (eval {dev['drop_points']:+.2f})" if dev else ""
    return f"{'within' if r.budget['within_budget'] else 'OUTSIDE'} {r.budget['max_score_drop']:g} pt{on_dev}"


def _mb(x: int | None) -> str:
    return "-" if x is None else f"{x / 1e6:.0f}MB"


def _num(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def text_table(rows: list[CompareRow]) -> str:
    lines = table(rows)
    widths = [max(len(r[i]) for r in lines) for i in range(len(lines[0]))]
    text = "\n".join("  ".join(c.ljust(w) if j in (1, 3) else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths)))
                     for r in lines)
    return text + "\n\n" + _legend(rows)


def _legend(rows: list[CompareRow]) -> str:
    timing = rows[0].timing if rows else "report"
    if timing == "compare":
        text = ("latency: every run's final model timed side by side in one process (median of repeats), ratios to "
                "run 1; ~: the spread of the repeats (interquartile range) is larger than the difference to run 1")
    elif timing == "loaded":
        text = (f"latency: timed side by side, but other processes used {rows[0].timing_load:.0%} of the machine "
                "meanwhile: figures shown, not ranked (no ratios, no latency front); run again on a quiet machine, "
                "or pass --rank-loaded")
    else:
        text = ("latency: each run's own fixed-workload figures (timed in separate processes: not comparable across "
                "runs, so no ratios and no latency front; run compare without --no-timing to time them side by side)")
    modes = sorted({str(r.density_mode) for r in rows if r.density_mode})
    if not all(comparable_rows(rows)):
        text += (f". !: scored on another number of rows than run 1 ({rows[0].rows}): its score does not compare "
                 "and it is on no front; give every run the same max_eval_samples")
    if any(r.budget for r in rows):
        text += (". budget: the run's max_score_drop (points of the metric against its reference, on held-out training "
                 "rows) and whether it ended within it, with the run's last step against that reference on the evaluation rows "
                 "in brackets (eval, reported only: the search never looks at them); compare_budget.png shows every point its search tried")
    if any(r.decoding for r in rows):
        text += (". decode tok/s: greedy decoding at batch 1 from the run's evaluate decode_speed, in the runtime that "
                 "step measured in, and its ratio to the dense PyTorch model timed beside it in the same process (the "
                 "ratio compares; tokens/s of different runs were timed in different processes)")
    return (f"{text}. size: the weight files a deployer ships (the .onnx files of a graph, the safetensors of model/; "
            f"no tokenizer, config or card). ship: the folder to deploy. peak memory: what a fresh process added to load the artifact and run "
            f"one batch of the largest size (timed comparisons only). density: exact nonzero MLP activations, {' / '.join(modes) or 'masked'} mode, from each run's "
            f"last step measured in its own mode. front: on the Pareto front of score against d = density, l = latency, s = size "
            "(no other run scores at least as high at a cost at least as low).")


def markdown(rows: list[CompareRow], command: str, picture: str | None, budget_picture: str | None = None) -> str:
    lines = [line + [how] for line, how in zip(table(rows), ["obtained"] + [r.reused for r in rows])]
    md = ["# Comparison", "", f"Command: {md_code(command)}", "",
          "| " + " | ".join(md_cell(c) for c in lines[0]) + " |", "|" + "---|" * len(lines[0])]
    md += ["| " + " | ".join(md_cell(c) for c in r) + " |" for r in lines[1:]]
    md += ["", _legend(rows), ""]
    if picture:
        md += [f"![score against density, latency and size]({picture})", ""]
    if budget_picture:
        md += [f"![every point the accuracy budgets' searches tried]({budget_picture})", ""]
    return "\n".join(md)


def csv_text(rows: list[CompareRow]) -> str:
    keys = _sweep_keys(rows)
    sizes = sorted({k for r in rows for k in r.latency_ms}, key=lambda k: int(k[1:]))
    on_front = fronts(rows)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["run", *keys, "passes", "task_metric", "score", "rows", "density_encoder", "density_decoder", "params",
                     "nonzero_params", "size_bytes", *[f"latency_ms_{k}" for k in sizes],
                     *[f"latency_ratio_{k}" for k in sizes], "peak_memory_bytes", "decode_runtime",
                     "decode_tokens_per_second", "decode_ratio_to_torch", "timing", "runtime",
                     *[f"pareto_{what}" for what in COSTS], "obtained", "folder", "ship"])
    for r in rows:
        writer.writerow([r.name, *[r.sweep.get(k, "") for k in keys], r.passes, r.task_metric, r.score, r.rows,
                         _blank(r.density_encoder), _blank(r.density_decoder), r.params, r.nonzero_params, r.size_bytes,
                         *[_blank(r.latency_ms.get(k)) for k in sizes], *[_blank(r.latency_ratio.get(k)) for k in sizes],
                         _blank(r.peak_memory_bytes), *(decoding_summary(r.decoding) or ("", "", "")), r.timing, r.runtime, *[int(r.name in on_front[what]) for what in COSTS], r.reused, r.folder,
                         r.ship])
    return buffer.getvalue()


def _blank(x: Any) -> Any:
    return "" if x is None else x


def write_outputs(rows: list[CompareRow], folder: Path, command: str, timing: dict[str, Any] | None) -> dict[str, Path]:
    """compare.json, compare.md, compare.csv and compare.png in `folder` (each replaced atomically)."""
    picture = plot_compare(rows, folder / "compare.png")
    budget_picture = plot_budgets(rows, folder / "compare_budget.png")
    payload = {"command": command, "timing": timing, "pareto": fronts(rows), "rows": [asdict(r) for r in rows]}
    write_atomic(folder / "compare.json", json.dumps(payload, indent=2, default=str) + "\n")
    write_atomic(folder / "compare.md", markdown(rows, command, picture.name if picture else None,
                                                 budget_picture.name if budget_picture else None))
    write_atomic(folder / "compare.csv", csv_text(rows))
    out = {"json": folder / "compare.json", "md": folder / "compare.md", "csv": folder / "compare.csv"}
    if picture:
        out["png"] = picture
    if budget_picture:
        out["budget_png"] = budget_picture
    return out


def load_rows(folder: Path) -> tuple[list[CompareRow], dict[str, Any]]:
    """Rows and timing of an earlier compare.json (to reuse its timing when the same runs are compared again)."""
    data = json.loads((folder / "compare.json").read_text())
    return [CompareRow(**r) for r in data["rows"]], data.get("timing") or {}


# ---- picture -------------------------------------------------------------------------------------

def plot_compare(rows: list[CompareRow], path: Path) -> Path | None:
    """Score against density, latency and size; the Pareto front joined and filled, every point numbered."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = [what for what in COSTS if any(r.cost(what) is not None for r in rows)]
    if not rows or not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.4), squeeze=False)
    for ax, what in zip(axes[0], panels):
        points = [(i, r.cost(what), r.score) for i, r in enumerate(rows) if r.cost(what) is not None]
        ok = comparable_rows(rows)
        front = set(pareto_front([(_better(r) if ok[j] else None, r.cost(what)) for j, r in enumerate(rows)]))
        for i, x, y in points:
            on = i in front
            ax.scatter([x], [y], s=46, color="tab:blue" if on else "white", edgecolors="tab:blue", zorder=3)
            ax.annotate(str(i + 1), (x, y), textcoords="offset points", xytext=(5, 4 if i % 2 == 0 else -10),
                        fontsize=8, color="black" if on else "grey")
        line = sorted((x, y) for i, x, y in points if i in front)
        if len(line) > 1:
            ax.plot([p[0] for p in line], [p[1] for p in line], color="tab:blue", lw=1, zorder=2)
        ax.set_xlabel(COSTS[what] + ("" if what != "latency" or rows[0].timing == "compare" else " (own reports)"))
        ax.set_ylabel(rows[0].task_metric)
        ax.grid(alpha=0.3)
    fig.suptitle("filled: on the Pareto front (higher score, lower cost)", fontsize=9)
    legend = "\n".join(f"{i}: {r.name} ({r.passes})" for i, r in enumerate(rows, 1))
    fig.text(0.01, -0.02, legend, fontsize=7, va="top", family="monospace")
    fig.tight_layout()
    save_figure(fig, path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_budgets(rows: list[CompareRow], path: Path) -> Path | None:
    """One panel per run with an accuracy budget: every tried point's drop against its held-out density, the budget
    as a line (points on or under it are within), the handed-on point ringed."""
    searched = [(i, r) for i, r in enumerate(rows, 1) if r.budget]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not searched:
        return None
    fig, axes = plt.subplots(1, len(searched), figsize=(4.6 * len(searched), 4.0), squeeze=False)
    for ax, (i, r) in zip(axes[0], searched):
        b = r.budget
        for t in b["tried"]:
            x = t["held_out_density"] if t["held_out_density"] is not None else float("nan")
            chosen = b["chosen"].startswith(t["label"])
            ax.scatter([x], [t["drop_points"]], s=80 if chosen else 40, zorder=3,
                       color="tab:green" if t["within_budget"] else "tab:red",
                       edgecolors="black" if chosen else "none")
            ax.annotate(str(t["value"]), (x, t["drop_points"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.axhline(b["max_score_drop"], color="grey", ls="--", lw=1)
        ax.axhline(0.0, color="black", lw=0.6)
        ax.set_xlabel("held-out density (exact nonzero MLP activations)")
        ax.set_ylabel(f"drop against the reference ({b['metric']} points)")
        ax.set_title(f"{i}: {r.name}: {b['parameter']} ({'within' if b['within_budget'] else 'outside'})", fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle("accuracy budget searches: green within, red outside, ringed = handed on, dashed = max_score_drop",
                 fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
