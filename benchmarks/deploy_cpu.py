"""The yardstick: each finished run's deployed artifact against the competitor's, side by side in one process.

    DEFTCOMPRESS_DATA_DIR=../shared/data python benchmarks/deploy_cpu.py runs/peft_to_onnx_int8 runs/deploy_cpu

The first run is the competitor (default `runs/peft_to_onnx_int8`: plain LoRA, merged, exported, onnxruntime
int8, from `recipes/peft_to_onnx_int8.yaml`); every other run is compared with it (default `runs/deploy_cpu`).

What is deployed: the graph of report.json's `final.onnx` (folder and files) when the run's last step ran in
onnxruntime, else the run's `model/` folder in PyTorch. Everything below is measured in this one process:

- accuracy (the task metric) on every evaluation row of the competitor's recipe (its `max_eval_samples`; all
  872 SST-2 dev rows for the shipped recipes), through deftcompress's own evaluation
  (`runtime.onnxruntime.evaluate_onnx` / `measurement.evaluation.evaluate`), each batch padded to its longest row;
  the run's own figure is shown beside it;
- latency at batch 1 and at batch 32 over the first `--rows` evaluation rows (default: all of them) in file
  order, each batch padded to its longest row (`measurement.speed.fixed_batches`), for each `--threads` value
  (one table per thread count; onnxruntime sessions are created with that many intra-op threads, PyTorch gets
  `torch.set_num_threads`, and OMP_WAIT_POLICY=PASSIVE unless given, since idle OpenMP workers that spin
  would take the cores of the next artifact; onnxruntime's spinning is off too, unless `--spinning`). Each
  repetition runs every artifact over the whole workload, in an order that reverses every repetition
  (A B, B A, ...), so a drift of the machine hits every artifact alike. Reported: median ms per row and its
  interquartile range over `--repeats` repetitions, and the ratio to the competitor as the median (and IQR)
  of the per-repetition ratios (each repetition's pair ran back to back);
- size: the weight files a deployer ships, as `compare` and every report count them (no tokenizer, config or
  card): for a graph, the .onnx file(s) and their external-data files; for a PyTorch folder, the safetensors
  files of `model/`;
- peak RSS added: the resident-memory high-water mark of this process while the artifact was loaded and ran
  its first pass over both workloads, minus the RSS just before it was loaded (Linux: the high-water mark is
  reset through /proc/self/clear_refs before each artifact). A primer session of each runtime runs first, so
  no figure carries a runtime's one-time allocations. `RSS kept` is what stayed resident afterwards.

Verdicts (the deployment targets), for each run after the first: batch-1 latency <= 0.5x and batch-32 latency
<= 0.8x the competitor's at every thread count, size <= 1.0x, accuracy >= the competitor's minus 1 point.
Writes `--out`.md and `--out`.json (default benchmarks/results/deploy_cpu), with the exact command on top.
Run it alone on the machine: it times.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

TARGETS = {"b1": 0.5, "b32": 0.8}  # latency ratios; size <= 1.0x; accuracy >= competitor - 1 point
SIZE_TARGET = 1.0
ACCURACY_POINTS = 1.0
BATCH_SIZES = (1, 32)


class BenchmarkError(Exception):
    """A run folder that cannot be benchmarked (unfinished, no deployed artifact, another task)."""


@dataclass
class Artifact:
    name: str
    run: str
    runtime: str  # onnxruntime | torch
    folder: str  # the graph's folder, or model/
    file: str | None  # the main .onnx file (onnxruntime)
    files: list[str] = field(default_factory=list)  # the shipped files, relative to `folder`
    size_bytes: int = 0
    task: Any = None
    metric: str = ""
    reported_score: float | None = None
    reported_rows: int | None = None
    resolved: dict = field(default_factory=dict)


# ---------------------------------------------------------------- finding what each run deploys


def _graph_files(folder: Path, main: str) -> list[str]:
    """The .onnx files and every external-data file they reference (what onnxruntime loads)."""
    import onnx

    files = []
    for name in sorted({main, *(p.name for p in folder.glob("*.onnx"))}):
        files.append(name)
        model = onnx.load(str(folder / name), load_external_data=False)
        for tensor in _tensors(model.graph):
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                location = next((e.value for e in tensor.external_data if e.key == "location"), None)
                if location and location not in files:
                    files.append(location)
    return files


def _tensors(graph):
    """Every tensor stored in a graph: initializers and tensor attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                yield from _tensors(sub)


def find_artifact(run: Path) -> Artifact:
    """The deployed artifact of a finished run folder (see the module docstring)."""
    import yaml

    report_path = run / "report.json"
    if not report_path.is_file():
        raise BenchmarkError(f"{run}: no report.json (not a finished run folder)")
    report = json.loads(report_path.read_text())
    if report.get("status", "finished") != "finished":
        raise BenchmarkError(f"{run}: the run is {report.get('status')}, not finished")
    steps = report.get("steps") or []
    if not steps:
        raise BenchmarkError(f"{run}: report.json has no steps")
    last = steps[-1]
    from deftcompress.reporting.report import StepRecord, measured_in_onnxruntime, measuring_step

    try:  # the step that measured decides (a pass that left the model unchanged reuses the one before)
        measured = measuring_step([StepRecord.from_dict(s) for s in steps])
    except (KeyError, TypeError):
        raise BenchmarkError(f"{run}: report.json steps are not what a run writes") from None
    resolved_path = run / "recipe.resolved.yaml"
    resolved = (yaml.safe_load(resolved_path.read_text()) or {}) if resolved_path.is_file() else {}
    onnx = (report.get("final") or {}).get("onnx")
    on_graph = measured_in_onnxruntime(measured)
    common = dict(name=report.get("name") or run.name, run=str(run), task=resolved.get("task") or report.get("task"),
                  metric=last.get("task_metric", ""), reported_score=last.get("task_score"),
                  reported_rows=last.get("eval_examples"), resolved=resolved)
    if on_graph and onnx:
        folder = run / onnx["folder"]
        main = "model.onnx" if "model.onnx" in onnx["files"] else onnx["files"][0]
        if main != "model.onnx":
            raise BenchmarkError(f"{run}: a text-to-text graph ({', '.join(onnx['files'])}); the yardstick times "
                                 "classifier graphs")
        files = _graph_files(folder, main)
        art = Artifact(runtime="onnxruntime", folder=str(folder), file=main, files=files, **common)
    else:
        folder = run / "model"
        if not (folder / "config.json").is_file():
            raise BenchmarkError(f"{run}: no deployed artifact (no final.onnx measured in onnxruntime, no model/)")
        # the weight files, as compare counts them (no tokenizer, config or card)
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.suffix == ".safetensors")
        art = Artifact(runtime="torch", folder=str(folder), file=None, files=files, **common)
    art.size_bytes = sum((Path(art.folder) / f).stat().st_size for f in art.files)
    return art


# ---------------------------------------------------------------- memory


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def _release_freed_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakRSS:
    """The peak resident memory of this process while the block runs, above the RSS when it started.

    Linux resets the high-water mark (VmHWM) when "5" is written to /proc/self/clear_refs; where that is not
    allowed, a thread samples the RSS every millisecond instead (`method` says which)."""

    def __enter__(self):
        _release_freed_memory()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.method = "VmHWM reset"
        except OSError:
            self.method = "sampled every 1 ms"
        self.start = _rss_bytes()
        self._sampled, self._stop = self.start, threading.Event()
        if self.method != "VmHWM reset":
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self._sampled = max(self._sampled, _rss_bytes())

    def __exit__(self, *exc):
        if self.method == "VmHWM reset":
            peak = _hwm_bytes()
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._sampled, _rss_bytes())
        self.peak_added = peak - self.start
        self.kept = _rss_bytes() - self.start
        return False


# ---------------------------------------------------------------- loading and running


def _load(art: Artifact, threads: int, spinning: bool) -> Callable:
    """A callable that runs one `Batch` through the artifact as deployed."""
    if art.runtime == "onnxruntime":
        from deftcompress.runtime.onnxruntime import onnx_forward

        return onnx_forward(art.folder, art.file, threads=threads, spinning=spinning)
    import torch

    from deftcompress.models.formats import load_model

    model = load_model(art.folder)[0].eval()

    def forward(batch):
        with torch.inference_mode():
            return model(**{k: v for k, v in batch.inputs.items() if k != "labels"})

    forward.model = model  # keeps it alive with the callable
    return forward


def _accuracy(art: Artifact, tokenizer, task, arch, examples, settings) -> float:
    if art.runtime == "onnxruntime":
        from deftcompress.export.onnx import OnnxGraph
        from deftcompress.runtime.onnxruntime import SessionSettings, evaluate_onnx

        graph = OnnxGraph(folder=art.folder, kind="classifier", files=[f for f in art.files if f.endswith(".onnx")])
        evaluation = evaluate_onnx(graph, tokenizer, task, examples, arch, settings, SessionSettings(threads=1),
                                   progress=False)
    else:
        from deftcompress.measurement.evaluation import evaluate
        from deftcompress.models.formats import load_model

        model, model_tokenizer, model_arch = load_model(art.folder)
        evaluation = evaluate(model, model_tokenizer, task, examples, model_arch, settings, progress=False)
        del model
    return float(evaluation.task_score)


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, statistics.median(values), q3


def _time(forward: Callable, batches: list) -> float:
    start = time.perf_counter()
    for batch in batches:
        forward(batch)
    return time.perf_counter() - start


def _set_torch_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def benchmark(runs: list[Path], threads: list[int] = (1, 2), repeats: int = 7, rows: int | None = None,
              data_dir: str | None = None, spinning: bool = False, progress: Callable[[str], None] | None = print) -> dict:
    """Measure every run's deployed artifact side by side (the module docstring says what and how)."""
    from deftcompress.architecture import spec_for_model_type
    from deftcompress.core.model_refs import unmarked_model_type
    from deftcompress.data.tasks import get_task, load_examples
    from deftcompress.measurement.evaluation import EvalSettings
    from deftcompress.measurement.speed import fixed_batches
    from deftcompress.models.loading import load_tokenizer

    say = progress or (lambda _: None)
    if len(runs) < 2:
        raise BenchmarkError("give at least two run folders: the competitor first, then the runs to compare with it")
    arts = [find_artifact(Path(r)) for r in runs]
    names = [a.name for a in arts]
    if len(set(names)) != len(names):
        raise BenchmarkError(f"two runs share a name ({', '.join(names)}); give runs of different names")
    if len({json.dumps(a.task, sort_keys=True) for a in arts}) > 1 or len({a.metric for a in arts}) > 1:
        raise BenchmarkError("the runs are of different tasks or metrics: nothing to compare")
    first = arts[0]
    resolved = first.resolved
    task = get_task(first.task)
    data_dir = data_dir or os.environ.get("DEFTCOMPRESS_DATA_DIR") or resolved.get("data_dir")
    max_seq_length = int(resolved.get("max_seq_length") or 128)
    examples = load_examples(task, "validation", data_dir, resolved.get("max_eval_samples"))
    timed_rows = examples if rows is None else examples[:rows]
    tokenizer = load_tokenizer(first.folder)
    config = json.loads((Path(first.folder) / "config.json").read_text())
    arch = spec_for_model_type(unmarked_model_type(config["model_type"]))
    if arch.text_to_text or task.kind not in ("classification", "regression"):
        raise BenchmarkError(f"{first.run}: the yardstick times classifiers; this is a {task.kind} task")
    settings = EvalSettings(batch_size=int(resolved.get("eval_batch_size") or 64), max_seq_length=max_seq_length,
                            density_mode="masked", measure_density=False)

    _set_torch_threads(1)
    accuracy = {}
    for a in arts:
        say(f"accuracy: {a.name} ({a.runtime}) on {len(examples)} rows")
        accuracy[a.name] = _accuracy(a, tokenizer, task, arch, examples, settings)

    workloads = {b: fixed_batches(tokenizer, task, arch, timed_rows, b, max_seq_length) for b in BATCH_SIZES}
    warm = workloads[32] + workloads[1]
    tables: dict[int, list[dict]] = {}
    memory_method = None
    for t in threads:
        _set_torch_threads(t)
        for runtime in sorted({a.runtime for a in arts}):  # one-time allocations of each runtime, out of every figure
            primer = _load(next(a for a in arts if a.runtime == runtime), t, spinning)
            primer(workloads[1][0])
            primer(workloads[32][0])
            del primer
        forwards, memory = [], []
        for a in arts:
            say(f"{t} thread(s): loading {a.name} and its first pass (memory)")
            with PeakRSS() as rss:
                forward = _load(a, t, spinning)
                for batch in warm:
                    forward(batch)
            memory.append({"peak_rss_added_bytes": rss.peak_added, "rss_kept_bytes": rss.kept})
            memory_method = rss.method
            forwards.append(forward)
        seconds = {(i, b): [] for i in range(len(arts)) for b in BATCH_SIZES}
        for r in range(repeats):
            say(f"{t} thread(s): repetition {r + 1} of {repeats}")
            order = list(range(len(arts))) if r % 2 == 0 else list(range(len(arts)))[::-1]
            for b in BATCH_SIZES:
                for i in order:
                    seconds[(i, b)].append(_time(forwards[i], workloads[b]))
        del forwards
        _release_freed_memory()
        table = []
        for i, a in enumerate(arts):
            row = {"name": a.name, "runtime": a.runtime, "threads": t, **memory[i]}
            for b in BATCH_SIZES:
                ms = [1000 * s / len(timed_rows) for s in seconds[(i, b)]]
                ratios = [s / c for s, c in zip(seconds[(i, b)], seconds[(0, b)])]
                q1, med, q3 = _quartiles(ms)
                r1, rmed, r3 = _quartiles(ratios)
                row[f"b{b}"] = {"ms_per_row": med, "ms_iqr": [q1, q3], "ratio": rmed, "ratio_iqr": [r1, r3],
                                "ms_per_row_each_repeat": ms}
            table.append(row)
        tables[t] = table

    out = {
        "artifacts": [{**{k: v for k, v in asdict(a).items() if k != "resolved"},
                       "accuracy": accuracy[a.name], "size_ratio": a.size_bytes / first.size_bytes} for a in arts],
        "eval_rows": len(examples), "timed_rows": len(timed_rows), "batch_sizes": list(BATCH_SIZES),
        "repeats": repeats, "threads": list(threads), "max_seq_length": max_seq_length,
        "onnxruntime_spinning": spinning, "memory_method": memory_method, "tables": {str(t): v for t, v in tables.items()},
    }
    out["verdicts"] = verdicts(out)
    return out


# ---------------------------------------------------------------- verdicts and tables


def verdicts(result: dict) -> list[dict]:
    """One verdict per target for every run after the first: {run, target, met, figure}."""
    arts = result["artifacts"]
    base = arts[0]
    out = []
    for j, a in enumerate(arts[1:], start=1):
        for b, limit in TARGETS.items():
            ratios = {t: table[j][b]["ratio"] for t, table in result["tables"].items()}
            figure = ", ".join(f"{r:.3f}x at {t} thread{'s' if t != '1' else ''}" for t, r in ratios.items())
            out.append({"run": a["name"], "target": f"batch-{b[1:]} latency <= {limit}x the competitor's",
                        "met": all(r <= limit for r in ratios.values()), "figure": figure})
        ratio = a["size_bytes"] / base["size_bytes"]
        out.append({"run": a["name"], "target": f"size <= {SIZE_TARGET}x the competitor's", "met": ratio <= SIZE_TARGET,
                    "figure": f"{ratio:.3f}x: {a['size_bytes'] / 1e6:.2f} MB against {base['size_bytes'] / 1e6:.2f} MB"})
        points = 100 * (a["accuracy"] - base["accuracy"])
        out.append({"run": a["name"], "target": f"{a['metric']} >= the competitor's - {ACCURACY_POINTS:g} point",
                    "met": points >= -ACCURACY_POINTS - 1e-9,
                    "figure": f"{a['accuracy']:.4f} against {base['accuracy']:.4f}: {points:+.2f} points"})
    return out


def verdict_line(v: dict, name: Callable[[str], str] = str) -> str:
    return f"{name(v['run'])}: {v['target']}: {'met' if v['met'] else 'missed'} ({v['figure']})"


def markdown(result: dict) -> str:
    from deftcompress.reporting.text import md_cell, md_code

    arts = result["artifacts"]
    env = result.get("environment", {})
    lines = ["# Deployed artifacts against the competitor, side by side", "",
             f"Command: {md_code(result.get('command', ''))}", ""]
    if env:
        lines += [f"Machine: {md_cell(env.get('cpu'))}, {env.get('cores')} cores; onnxruntime {env.get('onnxruntime')}, "
                  f"torch {env.get('torch')}; load average {env.get('loadavg_before')} before, "
                  f"{env.get('loadavg_after')} after; {env.get('date')}.", ""]
    lines += [f"One process. Accuracy: each artifact scored on all {result['eval_rows']} evaluation rows here "
              "(the run's own figure in brackets). Latency: the first "
              f"{result['timed_rows']} evaluation rows in file order at batch 1 and in batches of 32, each batch padded "
              f"to its longest row; {result['repeats']} repetitions, artifacts alternating (order reversed every "
              "repetition); median ms per row (IQR), and the ratio to the first row as the median (IQR) of the "
              "per-repetition ratios. Size: the weight files a deployer ships, as compare and the reports count "
              "them (the .onnx graph and its external data; for a PyTorch `model/`, its safetensors; no tokenizer, "
              f"config or card). Peak RSS added: this process's resident-memory peak while the artifact loaded and "
              f"made its first pass over both workloads, above the RSS before ({result['memory_method']}); kept: "
              "what stayed resident. onnxruntime intra-op threads as titled, spinning "
              f"{'on' if result['onnxruntime_spinning'] else 'off'}, graph optimisation level all; PyTorch with "
              f"OMP_WAIT_POLICY={env.get('OMP_WAIT_POLICY', 'unset')}.", ""]
    for t, table in result["tables"].items():
        lines += [f"## {t} thread{'s' if t != '1' else ''}", "",
                  "| artifact | runtime | accuracy | size MB | size ratio | b1 ms/row (IQR) | b1 ratio (IQR) | "
                  "b32 ms/row (IQR) | b32 ratio (IQR) | peak RSS added MB | RSS kept MB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for a, row in zip(arts, table):
            cells = [md_cell(a["name"]), a["runtime"],
                     f"{a['accuracy']:.4f} ({a['reported_score']:.4f})" if a["reported_score"] is not None
                     else f"{a['accuracy']:.4f}",
                     f"{a['size_bytes'] / 1e6:.2f}", f"{a['size_ratio']:.3f}x"]
            for b in BATCH_SIZES:
                m = row[f"b{b}"]
                cells += [f"{m['ms_per_row']:.3f} ({m['ms_iqr'][0]:.3f}-{m['ms_iqr'][1]:.3f})",
                          f"{m['ratio']:.3f}x ({m['ratio_iqr'][0]:.3f}-{m['ratio_iqr'][1]:.3f})"]
            cells += [f"{row['peak_rss_added_bytes'] / 1e6:.1f}", f"{row['rss_kept_bytes'] / 1e6:.1f}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Verdicts", "", *[f"- {verdict_line(v, md_cell)}" for v in result["verdicts"]], "",
              "## Artifacts", ""]
    for a in arts:
        lines.append(f"- {md_cell(a['name'])}: {md_code(a['run'])}, {a['runtime']}, "
                     f"{md_code(a['folder'])}: {', '.join(md_code(f) for f in a['files'])}")
    return "\n".join(lines) + "\n"


def environment() -> dict:
    import onnxruntime
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return {"cpu": cpu, "cores": os.cpu_count(), "onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
            "python": platform.python_version(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def command_line(argv: list[str] | None) -> str:
    env = " ".join(f"{k}={shlex.quote(os.environ[k])}" for k in ("DEFTCOMPRESS_DATA_DIR", "OMP_NUM_THREADS") if k in os.environ)
    args = sys.argv[1:] if argv is None else argv
    return " ".join(filter(None, [env, "python benchmarks/deploy_cpu.py", shlex.join(args)]))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", type=Path, default=[Path("runs/peft_to_onnx_int8"), Path("runs/deploy_cpu")],
                        help="finished run folders; the first is the competitor (default: %(default)s)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="one table per value (default: 1 2)")
    parser.add_argument("--repeats", type=int, default=7, help="timed repetitions (default: 7)")
    parser.add_argument("--rows", type=int, default=None, help="evaluation rows timed (default: all)")
    parser.add_argument("--data-dir", default=None, help="data folder (default: $DEFTCOMPRESS_DATA_DIR, else the run's)")
    parser.add_argument("--spinning", action="store_true", help="let onnxruntime's idle threads spin (default: off)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/deploy_cpu"),
                        help="writes OUT.md and OUT.json (default: %(default)s)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.repeats < 1 or (args.rows is not None and args.rows < 1) or min(args.threads) < 1:
        parser.error("--repeats, --rows and --threads must be positive")
    # libgomp's idle workers spin after every PyTorch call and take the cores the next artifact needs (a tiny
    # model measured 20 ms a row at 2 threads instead of 0.6); passive waiting, as onnxruntime's spinning is off.
    # It must be set before PyTorch loads, so it is set here, unless given.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    command = command_line(argv)
    env = environment()
    env["OMP_WAIT_POLICY"] = os.environ["OMP_WAIT_POLICY"]
    env["loadavg_before"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    try:
        result = benchmark(args.runs, args.threads, args.repeats, args.rows, args.data_dir, args.spinning,
                           progress=None if args.quiet else lambda s: print(s, file=sys.stderr))
    except BenchmarkError as exc:
        sys.exit(f"deploy_cpu: {exc}")
    env["loadavg_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    result = {"command": command, "environment": env, **result}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    args.out.with_suffix(".md").write_text(text)
    if not args.quiet:
        print(text)
    return result


if __name__ == "__main__":
    main()
