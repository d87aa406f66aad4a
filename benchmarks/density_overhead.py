"""Overhead of density measurement during evaluation: MiniLM on all of SST-2 dev, density on vs off.

    DEFTCOMPRESS_DATA_DIR=../shared/data python benchmarks/density_overhead.py --repeats 7

Runs alternate (off, on, off, on, ...) in one process so machine noise hits both alike; the figure
is the ratio of medians. Writes benchmarks/results/density_overhead.json and appends nothing else.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from deftcompress.measurement.evaluation import EvalSettings, evaluate
from deftcompress.core.model_refs import resolve_model_ref
from deftcompress.models.loading import load_model_and_tokenizer
from deftcompress.data.tasks import get_task, load_examples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--mode", choices=["masked", "paper"], default="masked")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "density_overhead.json"))
    args = parser.parse_args()

    torch.manual_seed(0)
    task = get_task("glue/sst2")
    model, tok, arch = load_model_and_tokenizer(resolve_model_ref("minilm"), task)
    examples = load_examples(task, "validation")
    times: dict[str, list[float]] = {"off": [], "on": []}
    scores = {}
    evaluate(model, tok, task, examples[:64], arch, EvalSettings(), progress=False)  # warm-up
    for _ in range(args.repeats):
        for label, on in (("off", False), ("on", True)):
            settings = EvalSettings(density_mode=args.mode, measure_density=on)
            t0 = time.perf_counter()
            result = evaluate(model, tok, task, examples, arch, settings, progress=False)
            times[label].append(time.perf_counter() - t0)
            scores[label] = result.task_score
    assert scores["on"] == scores["off"], "density hooks changed the predictions"
    ratio = statistics.median(times["on"]) / statistics.median(times["off"])
    out = {
        "benchmark": "density_overhead",
        "command": f"DEFTCOMPRESS_DATA_DIR=../shared/data python benchmarks/density_overhead.py --repeats {args.repeats} --mode {args.mode}",
        "examples": len(examples), "repeats": args.repeats, "mode": args.mode,
        "seconds_off": times["off"], "seconds_on": times["on"],
        "median_off": statistics.median(times["off"]), "median_on": statistics.median(times["on"]),
        "overhead_ratio": ratio, "target": "<= 1.05", "met": ratio <= 1.05,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"density on/off median ratio: {ratio:.3f} (target <= 1.05) over {args.repeats} alternating repeats of {len(examples)} examples")


if __name__ == "__main__":
    main()
