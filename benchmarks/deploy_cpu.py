"""The yardstick: the deployed graph of `recipes/deploy_cpu.yaml` against the competitor's, side by side.

The competitor is `recipes/peft_to_onnx_int8.yaml` (plain LoRA, merged, exported, onnxruntime int8). Both
runs must have finished; their deployed graphs (report.json `final.onnx`) are loaded into one process and
timed alternately (competitor, candidate, competitor, ...) on the same fixed workloads: batch 1 over the
first `--rows` dev rows and batches of 32 over the same rows, each batch padded to its longest row. For each
thread count a table gives the median ms per row, its interquartile range over `--repeats` rounds, the ratio
to the competitor, the graph's size (the .onnx files a deployer ships with the tokenizer, which both share,
left out), the RSS the session added once loaded and warm, and the accuracy the run measured in onnxruntime on
every dev row. The verdict lines check the targets of issue 24.

    DEFTCOMPRESS_DATA_DIR=../shared/data python benchmarks/deploy_cpu.py runs/peft_to_onnx_int8 runs/deploy_cpu
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

TARGETS = {"ms_b1": 0.5, "ms_b32": 0.8, "size": 1.0}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def deployed(run: Path) -> dict:
    report = json.loads((run / "report.json").read_text())
    onnx = (report.get("final") or {}).get("onnx")
    if not onnx:
        sys.exit(f"{run}: its final step is not an ONNX graph (report.json final.onnx missing)")
    folder = run / onnx["folder"]
    files = [f for f in onnx["files"]] + [p.name for p in folder.glob("*.onnx_data")]
    last = report["steps"][-1]
    return {"name": report["name"], "run": str(run), "folder": str(folder), "file": onnx["files"][0],
            "size_bytes": sum((folder / f).stat().st_size for f in set(files)), "accuracy": last["task_score"],
            "metric": last["task_metric"], "eval_rows": last["eval_examples"], "task": report["task"]}


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return q[0], statistics.median(values), q[2]


def measure(artifacts: list[dict], threads: int, rows: int, repeats: int, data_dir: str | None) -> list[dict]:
    from deftcompress.data.tasks import get_task, load_examples
    from deftcompress.measurement.speed import fixed_batches
    from deftcompress.models.loading import load_tokenizer
    from deftcompress.architecture import spec_for_model_type
    from deftcompress.runtime.onnxruntime import onnx_forward

    task = get_task(artifacts[0]["task"])
    examples = load_examples(task, "validation", data_dir, rows)
    tokenizer = load_tokenizer(artifacts[0]["folder"])
    config = json.loads((Path(artifacts[0]["folder"]) / "config.json").read_text())
    arch = spec_for_model_type(config["model_type"].removeprefix("deftcompress-"))
    workloads = {b: fixed_batches(tokenizer, task, arch, examples, b) for b in (1, 32)}
    forwards, memory = [], []
    primer = onnx_forward(artifacts[0]["folder"], artifacts[0]["file"], threads=threads, spinning=False)
    primer(workloads[1][0])  # onnxruntime's one-time allocations, so that no artifact's RSS figure carries them
    del primer
    for a in artifacts:
        before = rss_bytes()
        forward = onnx_forward(a["folder"], a["file"], threads=threads, spinning=False)
        for batch in workloads[32][:1] + workloads[1][:4]:  # warm-up: first-call allocations out of the timing
            forward(batch)
        memory.append(rss_bytes() - before)
        forwards.append(forward)
    times = {(i, b): [] for i in range(len(artifacts)) for b in workloads}
    for _ in range(repeats):
        for b, batches in workloads.items():
            for i, forward in enumerate(forwards):  # alternating: a drift of the machine hits every artifact alike
                start = time.perf_counter()
                for batch in batches:
                    forward(batch)
                times[(i, b)].append(1000 * (time.perf_counter() - start) / rows)
    out = []
    for i, a in enumerate(artifacts):
        row = {**a, "threads": threads, "rss_added_bytes": memory[i]}
        for b in workloads:
            q1, med, q3 = quartiles(times[(i, b)])
            row[f"ms_b{b}"], row[f"iqr_b{b}"] = med, (q1, q3)
        out.append(row)
    for row in out:
        for key in ("ms_b1", "ms_b32"):
            row[f"ratio_{key}"] = row[key] / out[0][key]
        row["ratio_size"] = row["size_bytes"] / out[0]["size_bytes"]
    return out


def verdicts(rows: list[dict]) -> list[str]:
    base, lines = rows[0], []
    for row in rows[1:]:
        for key, limit in TARGETS.items():
            ratio = row[f"ratio_{key}"]
            lines.append(f"{row['name']} vs {base['name']}, {key.replace('ms_', 'latency ')} <= {limit}x at "
                         f"{row['threads']} thread(s): {'met' if ratio <= limit else 'missed'} ({ratio:.3f}x)")
        drop = 100 * (base["accuracy"] - row["accuracy"])
        lines.append(f"{row['name']} vs {base['name']}, {row['metric']} >= competitor - 1 point: "
                     f"{'met' if drop <= 1.0 else 'missed'} ({-drop:+.2f} points)")
    return lines


def markdown(results: dict[int, list[dict]], command: str, args) -> str:
    lines = ["# Deployed graph against the competitor, side by side", "", f"Command: `{command}`", "",
             f"One process, sessions loaded together and timed alternately; {args.repeats} rounds over the first "
             f"{args.rows} dev rows (batch 1, and batches of 32), median ms per row and its interquartile range. "
             "Size: the .onnx files (tokenizer left out: both ship the same one). RSS: what the session added once "
             "loaded and warm. Accuracy: measured by each run in onnxruntime on all its eval rows.", ""]
    for threads, rows in results.items():
        lines += [f"## {threads} thread{'s' if threads > 1 else ''}", "",
                  "| run | accuracy | size MB | size ratio | b1 ms/row (IQR) | b1 ratio | b32 ms/row (IQR) | b32 ratio | RSS added MB |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['name']} | {r['accuracy']:.4f} | {r['size_bytes'] / 1e6:.1f} | {r['ratio_size']:.3f}x | "
                         f"{r['ms_b1']:.3f} ({r['iqr_b1'][0]:.3f}-{r['iqr_b1'][1]:.3f}) | {r['ratio_ms_b1']:.3f}x | "
                         f"{r['ms_b32']:.3f} ({r['iqr_b32'][0]:.3f}-{r['iqr_b32'][1]:.3f}) | {r['ratio_ms_b32']:.3f}x | "
                         f"{r['rss_added_bytes'] / 1e6:.1f} |")
        lines += ["", *[f"- {v}" for v in verdicts(rows)], ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", type=Path, default=[Path("runs/peft_to_onnx_int8"), Path("runs/deploy_cpu")],
                        help="finished run folders; the first is the competitor")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/deploy_cpu"))
    args = parser.parse_args(argv)
    artifacts = [deployed(r) for r in args.runs]
    if len({(a["task"], a["metric"]) for a in artifacts}) > 1:
        sys.exit("the runs are of different tasks or metrics: nothing to compare")
    results = {t: measure(artifacts, t, args.rows, args.repeats, args.data_dir) for t in args.threads}
    command = "python benchmarks/deploy_cpu.py " + " ".join(sys.argv[1:] if argv is None else argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"command": command, "results": results}, indent=1) + "\n")
    text = markdown(results, command, args)
    args.out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
