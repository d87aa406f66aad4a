"""Greedy decoding at batch 1: dense PyTorch, the sparse MLP runtime and onnxruntime, side by side.

    DEFTCOMPRESS_DATA_DIR=../shared/data python benchmarks/decode_speed.py runs/smollm2_lora_short \\
        runs/smollm2_lora_reference --threads 1

For each run folder given (its `model/`, a causal LM of a language-modelling run): the model is exported to
ONNX with past key values (optimum, as the `onnx_export` pass does, into a temporary folder), then greedy
generation of `--new-tokens` tokens after each of `--prompts` prompts of `--prompt-tokens` tokens (the first
validation rows of the run's task that are long enough) is timed in the three runtimes, which take turns
within one process (order alternating), median of `--repeats` repetitions (`deftcompress.measurement.
decoding`, the code behind `evaluate`'s `decode_speed`). The same model in three runtimes: the tokens should
be identical (the table says for how many prompts they are, and where they first differ).

Where the time goes: one more dense generation of the first prompt with forward hooks around the MLP blocks,
the attention blocks (and their projections) and the output layer: each one's share of the generation's time
(the hooks add a little to every share; the rest is norms, the cache and generation's own Python).

Density: the sparse runtime's own count of nonzero activations over every MLP call of the timed generations
(prompt and decode steps), the mean over layers. Run it alone. Writes results/decode_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders (their model/ is timed)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-onnx", action="store_true", help="time PyTorch dense and sparse only")
    p.add_argument("--out", default=str(HERE / "results" / "decode_speed"))
    return p.parse_args(argv)


def time_run(run: Path, args) -> dict:
    from deftcompress.data.tasks import get_task, load_examples, take_examples
    from deftcompress.export.onnx import export_onnx
    from deftcompress.measurement.decoding import compare_decoding, decode_prompts, greedy
    from deftcompress.models.formats import load_model
    from deftcompress.pipeline.recipe import Recipe
    from deftcompress.reporting.report import Report
    from deftcompress.runtime.onnxruntime import SessionSettings, ort_greedy
    from deftcompress.runtime.sparse_mlp import SparseMLPRuntime

    recipe = Recipe.from_file(run / "recipe.resolved.yaml")
    task = get_task(recipe.task)
    model, tokenizer, arch = load_model(run / "model", task)
    model.eval()
    rows = take_examples(load_examples(task, "validation", recipe.data_dir), "validation", None, recipe.seed)
    prompts = decode_prompts(tokenizer, rows, args.prompt_tokens, args.prompts)
    runtime = SparseMLPRuntime(model, arch)
    generators = {"torch": greedy(model, args.new_tokens),
                  "sparse": greedy(model, args.new_tokens, around=lambda: runtime)}
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_onnx:
            export_onnx(model, tokenizer, arch, Path(tmp) / "onnx")
            generators["onnxruntime"] = ort_greedy(str(Path(tmp) / "onnx"), args.new_tokens,
                                                   SessionSettings(threads=args.threads, spinning=False))
        result = compare_decoding(generators, prompts, args.new_tokens, args.repeats, progress=True)
    shares = time_shares(model, arch, prompts[0], args.new_tokens)
    layers = runtime.layer_report()
    gate_or_down = [r for r in layers if r["role"] == "down" and r["density"] is not None]
    report = Report.load(run)
    return {"run": str(run), "name": report.name, "model": report.model, "task": report.task,
            "score": {report.steps[-1].task_metric: report.steps[-1].task_score},
            "density_in_decoding": round(statistics.mean(r["density"] for r in gate_or_down), 4) if gate_or_down else None,
            "sparse_paths": {p: sum(r["paths"][p] for r in layers) for p in ("dense", "per_token", "union")},
            "fused_block_calls": sum(r.get("fused_block_calls", 0) for r in layers),
            "dense_time_shares": shares,
            **result.to_dict()}


def time_shares(model, arch, prompt, new_tokens: int) -> dict:
    """Each module kind's share of one dense greedy generation (forward hooks around each module)."""
    import time

    from deftcompress.architecture import attention_blocks, mlp_blocks
    from deftcompress.measurement.decoding import greedy

    spent: dict[str, float] = {}
    handles = []

    def timed(module, kind):
        def before(m, args):
            m._deftcompress_t0 = time.perf_counter()

        def after(m, args, out):
            spent[kind] = spent.get(kind, 0.0) + time.perf_counter() - m._deftcompress_t0
        handles.extend([module.register_forward_pre_hook(before), module.register_forward_hook(after)])

    for block in mlp_blocks(model, arch):
        timed(block.block, "mlp")
    for block in attention_blocks(model, arch):
        timed(block.module, "attention")
    head = model.get_output_embeddings()
    if head is not None:
        timed(head, "output layer")
    generate = greedy(model, new_tokens)
    generate(prompt)
    spent.clear()
    start = time.perf_counter()
    generate(prompt)
    total = time.perf_counter() - start
    for h in handles:
        h.remove()
    return {"ms_per_token": round(1000 * total / new_tokens, 2),
            "shares": {k: round(v / total, 3) for k, v in spent.items()}}


def markdown(results: list[dict], command: str, threads: int) -> str:
    lines = ["# Greedy decoding at batch 1: dense PyTorch, sparse MLP runtime, onnxruntime", "",
             f"Produced by `{command}` ({threads} thread(s); runtimes alternate within one process per run; median "
             "tokens/s of the repetitions). x torch: the ratio to the dense PyTorch model of the same run, timed in "
             "the same process. identical: prompts whose generated tokens equal the dense model's. density: nonzero "
             "MLP activations the sparse runtime counted over the timed generations (mean over layers).", "",
             "| run | score | density | runtime | tokens/s | IQR | x torch | identical | first difference | other load |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        metric, score = next(iter(r["score"].items()))
        for name, t in r["runtimes"].items():
            lines.append(f"| {r['name']} | {metric} {score:.2f} | {r['density_in_decoding']} | {name} | "
                         f"{t['tokens_per_second']:.2f} | {t['iqr'][0]:.2f}-{t['iqr'][1]:.2f} | {t['speedup']:.2f}x | "
                         f"{t['identical_prompts']}/{r['workload']['prompts']} | "
                         f"{'-' if t['first_difference'] is None else t['first_difference']} | "
                         f"{r['workload']['others_load']} |")
    lines += ["", "Where dense generation's time goes (one more generation of the first prompt, forward hooks around "
              "each module):", "", "| run | ms per token | MLP | attention | output layer | rest |", "|---|---|---|---|---|---|"]
    for r in results:
        d = r["dense_time_shares"]
        sh = d["shares"]
        rest = 1 - sum(sh.values())
        lines.append(f"| {r['name']} | {d['ms_per_token']} | {sh.get('mlp', 0):.0%} | {sh.get('attention', 0):.0%} | "
                     f"{sh.get('output layer', 0):.0%} | {rest:.0%} |")
    w = results[0]["workload"]
    lines += ["", f"Workload: {w['prompts']} prompts of {w['prompt_tokens']} tokens, {w['new_tokens']} new tokens each, "
              f"greedy with the key-value cache, end of sequence ignored; {w['repeats']} repetitions.", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    results = [time_run(Path(run), args) for run in args.runs]
    out = Path(args.out)
    command = "python benchmarks/decode_speed.py " + " ".join(sys.argv[1:] if argv is None else argv)
    out.with_suffix(".json").write_text(json.dumps({"command": command, "threads": args.threads, "results": results},
                                                   indent=1))
    out.with_suffix(".md").write_text(markdown(results, command, args.threads))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
