"""The run report: one record per evaluated step (baseline first) and the final model.

Torch-free: `deftcompress report` reads a finished run without importing torch.

`report.json` is a contract: each step holds at least pass, task_metric, task_score, density
{encoder, decoder, per_layer, mode}, params, nonzero_params, size_bytes, seconds. Pass-specific
facts (what the pass really did: counts, sizes, timings) go under `details`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # reading a report (`deftcompress report`) must not import torch
    from deftcompress.measurement.density import DensityResult
    from deftcompress.measurement.evaluation import Evaluation


@dataclass
class StepRecord:
    index: int
    pass_name: str
    task_metric: str
    task_score: float
    metrics: dict[str, float]
    density: dict[str, Any]
    params: int
    nonzero_params: int
    size_bytes: int
    latency_ms_per_example: float
    eval_examples: int
    eval_seconds: float
    seconds: float  # wall time of the pass itself (0 for the baseline)
    details: dict[str, Any] = field(default_factory=dict)
    # median ms per batch on a fixed workload (measurement.speed.step_latency): {"ms_batch_1": .., "ms_batch_64": ..}
    latency: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["pass"] = d.pop("pass_name")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StepRecord":
        d = dict(d)
        d["pass_name"] = d.pop("pass")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


def measured(step: StepRecord) -> bool:
    """False for a step that reused the step before it (its pass left the model unchanged)."""
    return "reused" not in str(step.details.get("evaluation", ""))


def measuring_step(steps: list[StepRecord]) -> StepRecord:
    """The last step that measured."""
    return next((s for s in reversed(steps) if measured(s)), steps[-1])


def measured_in_onnxruntime(step: StepRecord) -> bool:
    return str(step.details.get("runtime", "")).startswith("onnxruntime")


def last_pytorch_step(steps: list[StepRecord]) -> StepRecord:
    """The last step that measured the PyTorch model (what a run's `model/` holds)."""
    return next((s for s in reversed(steps) if measured(s) and not measured_in_onnxruntime(s)), steps[0])


LATENCY_LEGEND = ("latency: median of repeats on one fixed workload, ratio to step 0; ~: the spread of the repeats "
                  "(interquartile range) is larger than the difference, so the ratio is noise")


def spread_exceeds(ratio: float, *timings: tuple[Any, Any]) -> bool:
    """True when the interquartile range of the repeats of any of `timings` ((q1, q3), median), relative to its
    median, is larger than the difference the ratio shows: the ratio is then noise."""
    rel = [(iqr[1] - iqr[0]) / ms for iqr, ms in timings if isinstance(iqr, (list, tuple)) and len(iqr) == 2 and ms]
    return bool(rel) and max(rel) > abs(1.0 - ratio)


def within_spread(timing: dict[str, Any], base: dict[str, Any], batch: int, ratio: float) -> bool:
    """`spread_exceeds` for two fixed-workload latency records (`iqr_batch_N`, `ms_batch_N`)."""
    return spread_exceeds(ratio, *((t.get(f"iqr_batch_{batch}"), t.get(f"ms_batch_{batch}")) for t in (timing, base)))


def density_dict(result: "DensityResult | None") -> dict[str, Any]:
    if result is None:
        return {"encoder": None, "decoder": None, "per_layer": [], "mode": None, "tau": None}
    return {
        "encoder": result.encoder,
        "decoder": result.decoder,
        "encoder_above_tau": result.encoder_above_tau,
        "decoder_above_tau": result.decoder_above_tau,
        "per_layer": [asdict(layer) for layer in result.per_layer],
        "mode": result.mode,
        "tau": result.tau,
        "counted_positions": result.counted_positions,
    }


def make_step(index: int, pass_name: str, evaluation: "Evaluation", params: int, nonzero: int, size_bytes: int,
              seconds: float, details: dict[str, Any] | None = None) -> StepRecord:
    return StepRecord(
        index=index, pass_name=pass_name, task_metric=evaluation.task_metric, task_score=evaluation.task_score,
        metrics=evaluation.metrics, density=density_dict(evaluation.density), params=params, nonzero_params=nonzero,
        size_bytes=size_bytes, latency_ms_per_example=evaluation.latency_ms_per_example,
        eval_examples=evaluation.examples, eval_seconds=evaluation.seconds, seconds=seconds, details=details or {},
    )


@dataclass
class Report:
    name: str
    model: str
    task: str
    steps: list[StepRecord] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    status: str = "finished"  # running | failed | interrupted | finished
    recipe_hash: str | None = None
    resumed_from: int | None = None  # index of the first step this process ran, when it continued an earlier run
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.model, "task": self.task, "status": self.status,
                "recipe_hash": self.recipe_hash, "resumed_from": self.resumed_from, "error": self.error,
                "steps": [s.to_dict() for s in self.steps], "final": self.final, "environment": self.environment}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Report":
        return cls(name=d["name"], model=d["model"], task=d["task"], steps=[StepRecord.from_dict(s) for s in d["steps"]],
                   final=d.get("final", {}), environment=d.get("environment", {}), status=d.get("status", "finished"),
                   recipe_hash=d.get("recipe_hash"), resumed_from=d.get("resumed_from"), error=d.get("error"))

    @classmethod
    def load(cls, run_dir: str | Path) -> "Report":
        return cls.from_dict(json.loads((Path(run_dir) / "report.json").read_text()))

    def write(self, folder: Path) -> None:
        """report.json and report.md, each replaced atomically (a reader never sees half a file)."""
        write_atomic(folder / "report.json", json.dumps(self.to_dict(), indent=2, default=_json_default) + "\n")
        write_atomic(folder / "report.md", self.markdown())

    # -- tables ----------------------------------------------------------------------------------

    def latency_sizes(self) -> list[int]:
        """Batch sizes of the fixed-workload latency the steps carry (older reports: none)."""
        sizes: list[int] = []
        for s in self.steps:
            for key in s.latency:
                if key.startswith("ms_batch_") and int(key[9:]) not in sizes:
                    sizes.append(int(key[9:]))
        return sorted(sizes)

    def table_rows(self) -> list[list[str]]:
        base = self.steps[0] if self.steps else None
        sizes = self.latency_sizes()
        rows = []
        for s in self.steps:
            d = s.density
            if sizes:  # fixed workload, median of repeats: comparable between the steps of this run
                timing = [_fmt(s.latency.get(f"ms_batch_{b}"), 2) for b in sizes]
                ratios = [s.latency.get(f"ms_batch_{b}") and base.latency.get(f"ms_batch_{b}")
                          and s.latency[f"ms_batch_{b}"] / base.latency[f"ms_batch_{b}"] for b in sizes]
                noise = ["~" if s is not base and r and within_spread(s.latency, base.latency, b, r) else ""
                         for b, r in zip(sizes, ratios)]
                timing.append("/".join(f"{r:.2f}x{mark}" if r else "-" for r, mark in zip(ratios, noise)))
            else:
                timing = [f"{s.latency_ms_per_example:.2f}", f"{s.latency_ms_per_example / base.latency_ms_per_example:.2f}x"
                          if base and base.latency_ms_per_example else "-"]
            rows.append([
                str(s.index), s.pass_name, f"{s.task_score:.4f}",
                _fmt(d.get("encoder")), _fmt(d.get("decoder")), _fmt(d.get("encoder_above_tau") if d.get("encoder") is not None else d.get("decoder_above_tau")),
                f"{s.params / 1e6:.2f}M", f"{s.nonzero_params / 1e6:.2f}M", f"{s.size_bytes / 1e6:.1f}MB",
                *timing, f"{s.seconds:.1f}",
            ])
        return rows

    def headers(self) -> list[str]:
        metric = self.steps[0].task_metric if self.steps else "score"
        tau = self.steps[0].density.get("tau") if self.steps else None
        sizes = self.latency_sizes()
        timing = [f"ms b{b}" for b in sizes] + ["latency " + "/".join(f"b{b}" for b in sizes)] if sizes else ["ms/ex", "latency"]
        return ["#", "pass", metric, "density enc", "density dec", f"|a|>{tau:g}" if tau is not None else "|a|>tau",
                "params", "nonzero", "size", *timing, "pass s"]

    def per_layer_rows(self, step: StepRecord | None = None) -> list[list[str]]:
        step = step or self.steps[-1]
        rows = [((l["stack"], int(l["layer"])), [f"{l['stack']}.{l['layer']}", _fmt(l["density"]), _fmt(l["above_tau"]),
                                                 str(l["width"])])
                for l in step.density.get("per_layer", [])]
        for label in self.skipped_blocks(step):  # removed by ADA-DEFT: no activations at all
            stack, _, layer = label.partition(".")
            rows.append(((stack, int(layer)), [label, "skipped", "-", "0"]))
        order = {"encoder": 0, "decoder": 1}
        return [row for _, row in sorted(rows, key=lambda r: (order.get(r[0][0], 2), r[0][1]))]

    def skipped_blocks(self, step: StepRecord) -> list[str]:
        """MLP blocks removed (ADA-DEFT) by this step or an earlier one."""
        out: list[str] = []
        for s in self.steps[:step.index + 1]:
            out += [b for b in ((s.details or {}).get("blocks") or {}).get("skipped", []) if b not in out]
        return out

    def speed_rows(self, step: StepRecord) -> list[list[str]]:
        """A pass's own side-by-side latency and memory (e.g. ADA-DEFT's `speed`), as table rows with a header."""
        speed = (step.details or {}).get("speed")
        if not speed:
            return []
        sizes = speed["workload"]["batch_sizes"]
        rows = [["model"] + [f"ms b{b}" for b in sizes] + [f"latency b{b}" for b in sizes]
                + ["weights", "peak memory", "memory ratio"]]
        first = next(iter(speed["models"].values()))
        for name, m in speed["models"].items():
            rows.append([name] + [f"{m[f'ms_batch_{b}']:.2f}" for b in sizes]
                        + [f"{m[f'latency_ratio_batch_{b}']:.2f}x"
                           f"{'~' if m is not first and within_spread(m, first, b, m[f'latency_ratio_batch_{b}']) else ''}"
                           for b in sizes]
                        + [f"{m['weight_bytes'] / 1e6:.1f}MB", f"{m['peak_bytes'] / 1e6:.1f}MB", f"{m['peak_ratio']:.2f}x"])
        return rows

    def sparse_rows(self, step: StepRecord) -> list[list[str]]:
        layers = ((step.details or {}).get("sparse_mlp") or {}).get("layers") or []
        if not layers:
            return []
        rows = [["layer", "projection", "density", "union density", "dense / per-token / union calls", "dense ms",
                 "sparse runtime ms", "speed-up"]]
        for r in layers:
            paths = r["paths"]
            timed = "dense_ms" in r
            union = r["union_density"]
            density = r["density"]
            rows.append([r["layer"], r["role"], f"{density:.4f}" if density is not None else "-",
                         f"{union:.4f}" if union is not None else "-",
                         f"{paths['dense']} / {paths['per_token']} / {paths['union']}",
                         f"{r['dense_ms']:.3f}" if timed else "-", f"{r['runtime_ms']:.3f}" if timed else "-",
                         f"{r['dense_ms'] / r['runtime_ms']:.2f}x" if timed and r["runtime_ms"] > 0 else "-"])
        return rows

    def decoding_rows(self, step: StepRecord) -> list[list[str]]:
        """evaluate's decode_speed: tokens/s per runtime, its ratio to the dense PyTorch model, and token agreement."""
        decoding = (step.details or {}).get("decoding")
        if not decoding:
            return []
        prompts = decoding["workload"]["prompts"]
        rows = [["runtime", "tokens/s", "IQR", f"x {decoding['reference']}", "identical prompts", "first difference"]]
        for name, r in decoding["runtimes"].items():
            rows.append([name, f"{r['tokens_per_second']:.2f}", f"{r['iqr'][0]:.2f}-{r['iqr'][1]:.2f}",
                         f"{r['speedup']:.2f}x", f"{r['identical_prompts']}/{prompts}",
                         "-" if r["first_difference"] is None else f"token {r['first_difference']}"])
        return rows

    @staticmethod
    def decoding_caption(step: StepRecord) -> str:
        w = step.details["decoding"]["workload"]
        load = f"; other processes used {w['others_load']:.0%} of the machine" if w.get("others_load") else ""
        return (f"Decoding speed, step {step.index} ({step.pass_name}): greedy, batch 1, {w['prompts']} prompts of "
                f"{w['prompt_tokens']} tokens + {w['new_tokens']} new tokens, median of {w['repeats']} alternating "
                f"repetitions in one process{load}")

    def budget_rows(self, step: StepRecord) -> list[list[str]]:
        """An accuracy budget's search (`max_score_drop`): the reference, then every tried point, in the order tried."""
        budget = (step.details or {}).get("budget")
        if not budget:
            return []
        ref = budget["reference"]
        rows = [["setting", "held-out score", "drop (points)", "held-out density", "within", "seconds"],
                ["reference" + (f" ({ref['path']})" if ref.get("path") else " (trained here)"),
                 _fmt(ref["held_out_score"]), "-", _fmt(ref.get("held_out_density")), "-", _fmt(ref.get("seconds"), 1)]]
        for t in budget["tried"]:
            drop = f"{t['drop_points']:.2f}" + (f" ± {t['drop_se']:.2f}" if t.get("drop_se") is not None else "")
            if t.get("drop_bound") is not None:
                drop += f" (bound {t['drop_bound']:.2f})"
            rows.append([t["label"], _fmt(t["held_out_score"]), drop,
                         _fmt(t["held_out_density"]), "yes" if t["within_budget"] else "no", _fmt(t["seconds"], 1)])
        return rows

    def budget_caption(self, step: StepRecord) -> str:
        """What the search was and what it handed on (the verdict apart: report.md sets it in bold when outside)."""
        b = step.details["budget"]
        source = b.get("held_out_source", "of the training split")
        if any(t.get("drop_se") is not None for t in b["tried"]):
            source += "; drop ± the standard error of a paired bootstrap over them"
        if b.get("confidence"):
            source += f"; within = its {b['confidence']:g} one-sided bound"
        return (f"Accuracy budget of step {step.index} ({step.pass_name}): max_score_drop {b['max_score_drop']:g} points "
                f"of {b['metric']} on {b['held_out_rows']} held-out rows ({source}); searched {b['parameter']} over "
                f"{b['candidates']} by bisection; handed on: {b['chosen']}{_budget_on_evaluation_rows(b)}")

    def budget_outcome_line(self) -> str:
        """Where the run ends against its accuracy budget's reference on the evaluation rows ('' without one)."""
        o = (self.final or {}).get("budget_outcome")
        if not o:
            return ""
        verdict = "within" if o["within_budget"] else "BEYOND"
        why = "" if o["within_budget"] else (f" (the budget was judged on held-out training rows at step "
                                             f"{o['budget_step']}; later steps and other rows add to it)")
        return (f"budget outcome: step {o['final_step']} ends {o['drop_points']:+.2f} points from step "
                f"{o['budget_step']}'s reference on the {o['rows']} evaluation rows ({o['reference_score']:.4f} -> "
                f"{o['final_score']:.4f}), {verdict} max_score_drop {o['max_score_drop']:g}{why}; reported only")

    def deploy_line(self, run_folder: str = "") -> str:
        """What to ship, in one line (the CLI's last line; report.md's first): `final.deploy` of a finished run."""
        info = (self.final or {}).get("deploy")
        if not info:
            return ""
        if not info.get("folder"):
            return f"deploy: nothing to ship ({info.get('why', 'no artifact')})"
        where = f"{run_folder.rstrip('/')}/{info['folder']}/" if run_folder else f"{info['folder']}/"
        if info["runtime"] == "onnxruntime":
            what = f"onnxruntime {'int8' if info.get('quantized') else 'fp32'} graph, {info['graph_bytes'] / 1e6:.1f} MB"
        else:
            what = "the PyTorch model"
        return f"deploy: {where} ({what}; {info['metric']} {info['score']:.4f} on {info['rows']} rows, measured there)"

    def plain_peft_lines(self) -> list[str]:
        lines = [line for line in (plain_peft_line(step) for step in self.steps) if line]
        return lines + [""] if lines else []

    def text_table(self) -> str:
        lines = []
        if self.status != "finished":
            lines.append(f"status: {self.status}" + (f" ({self.error})" if self.error else "")
                         + "; finished passes are kept: the same apply command resumes\n")
        lines.append(_align([self.headers()] + self.table_rows()))
        if self.latency_sizes():
            lines.append(LATENCY_LEGEND)
        if self.steps:
            s = self.steps[-1]
            lines.append(f"\nper-layer density after step {s.index} ({s.pass_name}, mode={s.density.get('mode')}):")
            lines.append(_align([["layer", "density", "|a|>tau", "width"]] + self.per_layer_rows(s)))
        for step in self.steps:
            speed = self.speed_rows(step)
            if speed:
                lines.append(f"\nlatency and memory, step {step.index} ({step.pass_name}) against the previous step, one process:")
                lines.append(_align(speed))
            decoding = self.decoding_rows(step)
            if decoding:
                lines.append(f"\n{self.decoding_caption(step)}:")
                lines.append(_align(decoding))
            budget = self.budget_rows(step)
            if budget:
                within = step.details["budget"]["within_budget"]
                lines.append(f"\n{self.budget_caption(step)} (the search: {'within' if within else 'outside'} the budget).")
                lines.append(_align(budget))
        return "\n".join(lines)

    def markdown(self) -> str:
        from deftcompress.reporting.text import md_code, md_text

        out = [f"# {md_text(self.name)}: {md_text(self.model)} on {md_text(self.task)}", ""]
        if self.status != "finished":
            out += [f"Status: **{md_text(self.status)}**" + (f" ({md_text(self.error)})" if self.error else "")
                    + " (finished passes are kept; `deftcompress apply` with the same recipe resumes)", ""]
        if self.deploy_line():
            out += [f"**To ship**: {md_text(self.deploy_line())}", ""]
        if self.budget_outcome_line():
            out += [f"**Accuracy budget**: {md_text(self.budget_outcome_line())}", ""]
        if self.resumed_from is not None:
            out += [f"Resumed at step {self.resumed_from}: earlier steps were computed by an earlier run.", ""]
        out += [_md([self.headers()] + self.table_rows()), ""]
        if self.latency_sizes():
            out += ["Latency: median ms per batch of each step's model on one fixed workload (the same rows, each batch "
                    "padded to its longest row), ratios to step 0; comparable within this run. ~: the spread of the "
                    "repeats (interquartile range, this step's or step 0's) is larger than the difference to step 0. To compare runs, use "
                    "`deftcompress compare`, which times them side by side in one process.", ""]
        if self.steps:
            s = self.steps[-1]
            out += [f"Per-layer density after step {s.index} ({md_text(s.pass_name)}), mode {md_code(s.density.get('mode'))}:", "",
                    _md([["layer", "density", "|a|>tau", "width"]] + self.per_layer_rows(s)), ""]
            for step in self.steps:
                speed = self.speed_rows(step)
                if speed:
                    w = step.details["speed"]["workload"]
                    out += [f"Latency and memory of step {step.index} ({step.pass_name}) against the previous step, "
                            f"timed in one process (median of {w['repeats']} alternating repetitions, {w['rows']} rows; "
                            "memory = weights + peak of one forward of the largest batch):", "", _md(speed), ""]
            for step in self.steps:
                decoding = self.decoding_rows(step)
                if decoding:
                    out += [f"{md_text(self.decoding_caption(step))}:", "", _md(decoding), ""]
            for step in self.steps:
                budget = self.budget_rows(step)
                if budget:
                    # the search's verdict, on held-out rows: the caption's last figure is the evaluation rows' drop
                    verdict = ("the search: within the budget" if step.details["budget"]["within_budget"]
                               else "**the search: outside the budget**")
                    out += [f"{md_text(self.budget_caption(step))} ({verdict}).", "", _md(budget), ""]
            for step in self.steps:
                sparse = self.sparse_rows(step)
                if sparse:
                    out += [f"Sparse MLP execution in step {step.index} ({step.pass_name}): per layer, the density of "
                            "the projection's input (nonzero activations; gate: neurons the activation left active), "
                            "the paths taken per call, and the median time of the first calls run both dense and as "
                            "chosen, on the same inputs:", "", _md(sparse), ""]
            out += self.plain_peft_lines()
            for step in self.steps:
                if step.details:
                    out.append(f"- step {step.index} {md_code(step.pass_name)}: "
                               + md_code(json.dumps(step.details, default=_json_default)[:2000]))
            out.append("")
        return "\n".join(out)


def plain_peft_line(step: StepRecord) -> str | None:
    """How plain peft (no deftcompress import) reloads a training step's adapter, or why it cannot; None if no adapter."""
    plain = (step.details or {}).get("plain_peft")
    if not plain:
        return None
    from deftcompress.reporting.text import md_code, md_text

    if plain.get("dir") is None:
        return f"Adapter of step {step.index} ({md_text(step.pass_name)}) with plain peft: not possible: {md_text(plain['why_not'])}."
    size = f"{plain['bytes'] / 1e6:.2f} MB" if plain.get("bytes") else "size unknown"
    call = f"PeftModel.from_pretrained(base, {json.dumps(str(plain['dir']))})"
    line = (f"Adapter of step {step.index} ({md_text(step.pass_name)}) with plain peft: {md_code(call)} onto "
            f"{md_text(plain['loads_onto'])} ({size})")
    if plain.get("modules_to_save"):
        line += (f"; {md_text(plain['why'])}, so its {md_text(plain['modules_to_save'])} MLP projections are saved whole "
                 "(peft modules_to_save), and the library adapter beside it needs deftcompress")
    return line + "."


def write_atomic(path: Path, text: str) -> None:
    """Write `text` beside `path`, then rename it over `path`, never through a link (`core.files.write_atomic`)."""
    from deftcompress.core.files import write_atomic as write

    write(path, text)


def _fmt(x: Any, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _align(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))) for r in rows)


def _md(rows: list[list[str]]) -> str:
    """A Markdown table; pipes inside cells (`|a|>0.01`) are escaped so that every row keeps its columns."""
    from deftcompress.reporting.text import md_cell

    head, *body = [[md_cell(c) for c in row] for row in rows]
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in body])


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "__dataclass_fields__"):
        return asdict(o)
    return str(o)


def _budget_on_evaluation_rows(budget: dict) -> str:
    """The budget's outcome on the recipe's evaluation rows (reported after the choice, never used for it)."""
    dev = budget.get("on_evaluation_rows")
    if not dev:
        return ""
    return (f". On the {dev['rows']} evaluation rows (reported only): reference {dev['reference_score']:.4f}, handed "
            f"on {dev['chosen_score']:.4f}, a drop of {dev['drop_points']:.2f} points")
