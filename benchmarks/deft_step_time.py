"""DEFT's training step time against plain PEFT, measured side by side in one process.

    DEFTCOMPRESS_DATA_DIR=../shared/data python benchmarks/deft_step_time.py --methods lora,adapter --rounds 4

For each method, short training runs of the same recipe with `density_weight: 0` (PEFT) and with the
`deft` defaults (DEFT) alternate in ABBA order (PEFT, DEFT, DEFT, PEFT, ...), each through the real
`deft` pass and training loop on the same rows, batches and seed. A run's figure is the median of its
optimizer-step times (the loop times optimisation only: no evaluation, no loading); the ratio is the
median of DEFT's run medians over the median of PEFT's. Short runs keep the density schedule's
shape (the target ramps over the first half of the steps, as in a long run). Run it alone: it times.
Writes `results/deft_step_time_<task>.{json,md}` (read by `deft_vs_peft.py --summarize`).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing
sys.path.insert(0, str(HERE))

from deft_vs_peft import METHOD_SETTINGS  # noqa: E402  (both benchmarks train with the same per-method settings)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="glue/sst2")
    p.add_argument("--methods", default="lora,adapter")
    p.add_argument("--rounds", type=int, default=4, help="ABBA rounds: each round runs PEFT and DEFT once")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-seq-length", type=int, default=64)
    p.add_argument("--breakdown", action="store_true",
                   help="instead: forward+backward of one fixed LoRA batch (no optimizer), PEFT vs + activation scales vs "
                        "+ scales and density term, alternating, to see where DEFT's extra time goes")
    p.add_argument("--tokens", type=int, default=40, help="--breakdown: sequence length of the fixed batch")
    p.add_argument("--out", default=None, help="default: results/deft_step_time_<task> (.json and .md)")
    return p.parse_args(argv)


def time_run(method: str, density: bool, args, work: Path, index: int) -> float:
    from deftcompress import Recipe, run_recipe

    options = {"method": method, "max_steps": args.steps, "max_train_samples": args.steps * args.batch_size,
               "batch_size": args.batch_size, **METHOD_SETTINGS.get(method, {})}
    if not density:
        options["density_weight"] = 0.0
    recipe = Recipe.build(name=f"{method}_{'deft' if density else 'peft'}_{index}", model="minilm", task=args.task,
                          seed=0, max_eval_samples=16, max_seq_length=args.max_seq_length, passes=[{"deft": options}])
    report = run_recipe(recipe, output_dir=work / recipe.name, quiet=True)
    return report.steps[-1].details["median_seconds_per_step"]


def breakdown(args) -> dict:
    """Median forward+backward seconds of one fixed batch: PEFT, + activation scales' hooks, + the density term."""
    import torch

    from deftcompress.architecture import mlp_blocks
    from deftcompress.core.model_refs import resolve_model_ref
    from deftcompress.data.tasks import get_task
    from deftcompress.models.loading import load_model_and_tokenizer
    from deftcompress.peft_methods.wrapping import wrap_model
    from deftcompress.training.activation_scale import ActivationScales
    from deftcompress.training.density_loss import DensityLoss
    from deftcompress.training.options import DensityOptions
    from deftcompress.peft_methods.settings import PeftSettings

    task = get_task(args.task)
    model, _, arch = load_model_and_tokenizer(resolve_model_ref("minilm"), task)
    model = wrap_model(model, arch, task, PeftSettings(method="lora", r=8)).model.train()
    torch.manual_seed(0)
    ids = torch.randint(1000, 20000, (args.batch_size, args.tokens))
    mask, labels = torch.ones_like(ids), torch.randint(0, 2, (args.batch_size,))
    blocks = mlp_blocks(model, arch)
    scales = ActivationScales(blocks)
    model.add_module("deftcompress_activation_scales", scales)
    density = DensityLoss(blocks, DensityOptions(density_ramp_ratio=0.0).density_loss_settings("masked"))
    density.scale_only = scales.scale_of
    times: dict[str, list[float]] = {"peft": [], "+ scales": [], "+ scales + density term": []}
    for _ in range(2 + args.rounds * 2):  # the first two rounds warm up
        for kind in times:
            if kind != "peft":
                scales.attach()
            with density if kind.endswith("term") else nullcontext():
                density.begin_step({"encoder": mask}, 1, 10)
                start = time.perf_counter()
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
                if kind.endswith("term"):
                    loss = loss + density.end_step()[0]
                loss.backward()
                times[kind].append(time.perf_counter() - start)
            density._active = False
            model.zero_grad(set_to_none=True)
            scales.detach_hooks()
    medians = {k: statistics.median(v[2:]) for k, v in times.items()}
    return {"batch": [args.batch_size, args.tokens], "seconds": {k: v[2:] for k, v in times.items()},
            "median": medians, "ratio": {k: v / medians["peft"] for k, v in medians.items()}}


def main(argv=None) -> None:
    import torch

    args = parse_args(argv)
    if args.breakdown:
        result = breakdown(args)
        command = "DEFTCOMPRESS_DATA_DIR=../shared/data python benchmarks/deft_step_time.py " + " ".join(sys.argv[1:])
        path = HERE / "results" / "deft_step_breakdown"
        path.with_suffix(".json").write_text(json.dumps({"command": command, **result,
                                                        "threads": torch.get_num_threads()}, indent=2) + "\n")
        lines = [f"# Where DEFT's step time goes (MiniLM + LoRA r=8, one batch of {args.batch_size} x {args.tokens} tokens, "
                 "forward + backward, no optimizer)", "", f"Produced by `{command}`; medians of {args.rounds * 2} "
                 "alternating repetitions after warm-up.", "", "| configuration | s (median) | ratio to PEFT |",
                 "|---|---|---|"]
        lines += [f"| {k} | {v:.4f} | {result['ratio'][k]:.3f} |" for k, v in result["median"].items()]
        path.with_suffix(".md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        return
    results = []
    with tempfile.TemporaryDirectory(prefix="deft_step_time_") as tmp:
        for method in args.methods.split(","):
            times: dict[str, list[float]] = {"peft": [], "deft": []}
            for r in range(args.rounds):
                order = (False, True) if r % 2 == 0 else (True, False)  # ABBA: drifts in load hit both alike
                for density in order:
                    seconds = time_run(method, density, args, Path(tmp), len(times["peft"]) + len(times["deft"]))
                    times["deft" if density else "peft"].append(seconds)
                    print(f"{method} {'deft' if density else 'peft'} round {r + 1}: {seconds:.4f} s/step", flush=True)
            ratio = statistics.median(times["deft"]) / statistics.median(times["peft"])
            results.append({"method": method, "peft_seconds": times["peft"], "deft_seconds": times["deft"],
                            "median_peft": statistics.median(times["peft"]), "median_deft": statistics.median(times["deft"]),
                            "ratio": ratio, "met": ratio <= 1.10})
    command = "DEFTCOMPRESS_DATA_DIR=../shared/data python benchmarks/deft_step_time.py " + " ".join(sys.argv[1:])
    out = {"benchmark": "deft_step_time", "command": command, "task": args.task, "rounds": args.rounds,
           "steps": args.steps, "batch_size": args.batch_size, "results": results, "torch": torch.__version__,
           "threads": torch.get_num_threads(), "python": platform.python_version()}
    path = Path(args.out or HERE / "results" / f"deft_step_time_{args.task.split('/')[-1]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [f"# DEFT step time against PEFT ({args.task}, MiniLM, batch {args.batch_size})", "",
             f"Produced by `{command}`: {args.rounds} ABBA rounds of {args.steps}-step runs per method, one process, "
             f"{out['threads']} threads; a run's figure is its median step time, the ratio is median over median.", "",
             "| method | PEFT s/step (runs) | DEFT s/step (runs) | ratio | target <= 1.10 |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['method']} | {r['median_peft']:.4f} ({', '.join(f'{t:.3f}' for t in r['peft_seconds'])}) | "
                     f"{r['median_deft']:.4f} ({', '.join(f'{t:.3f}' for t in r['deft_seconds'])}) | {r['ratio']:.3f} | "
                     f"{'met' if r['met'] else 'missed'} |")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
