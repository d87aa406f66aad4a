"""Sparse int8 MLP blocks against the dense int8 block of the same runtime (PyTorch), one token at a time.

Dense int8: PyTorch's dynamic int8 linear layers (fbgemm, weights int8 per output channel, activations
quantized per call) for every projection. Sparse int8: the same dense int8 layer for the projection that
makes the activation (its output decides what is zero), then the project's compiled kernels on int8 weights
with one scale per output feature (`runtime.sparse_kernels.down_int8` / `gate_int8`): only the rows of the
active neurons are read. The activation is a ReLU whose threshold is set on 256 random inputs so that the
wanted fraction of neurons is nonzero (a relufied or DEFT-trained MLP); gated blocks multiply it with the
gate projection. Each cell: 64 single-token calls (tokens cycled from a pool of 256), repeated alternately,
median of the repeats; `block` is the whole MLP, `down` the down-projection alone. Weights are random (speed
does not depend on their values). Accuracy: the sparse block's largest error against fp32 is compared with
the dense int8 block's (the int8 model's own tolerance).

    DEFTCOMPRESS_DATA_DIR=../shared/data python benchmarks/sparse_mlp_int8.py          # ~3 min, run it alone
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

SHAPES = [("non-gated, MiniLM (384x1536)", 384, 1536, False),
          ("non-gated, BERT-base (768x3072)", 768, 3072, False),
          ("gated, 1B-class (2048x8192)", 2048, 8192, True)]
DENSITIES = (0.02, 0.05, 0.10, 0.25, 0.50)


def timed(fns: dict, repeats: int, calls: int) -> dict[str, float]:
    """Median seconds per call of each function, the functions alternating (one warm-up round first)."""
    times = {k: [] for k in fns}
    for r in range(repeats + 1):
        for k, fn in fns.items():
            start = time.perf_counter()
            for i in range(calls):
                fn(i)
            if r:
                times[k].append((time.perf_counter() - start) / calls)
    return {k: statistics.median(v) for k, v in times.items()}


def block(torch, d_model: int, d_ff: int, gated: bool, density: float, seed: int):
    from torch import nn
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    from deftcompress.runtime.sparse_kernels import quantize_rows

    torch.manual_seed(seed)
    up, down = nn.Linear(d_model, d_ff), nn.Linear(d_ff, d_model)
    gate = nn.Linear(d_model, d_ff) if gated else None
    pool = torch.randn(256, d_model)
    with torch.no_grad():
        threshold = torch.quantile(up(pool).flatten(), 1 - density).item()
    dense = quantize_dynamic(nn.ModuleDict({"up": up, "down": down, **({"gate": gate} if gated else {})}),
                             qconfig_spec={nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)
    q_down, s_down = quantize_rows(down.weight)
    q_gate, s_gate = quantize_rows(gate.weight) if gated else (None, None)
    return {"fp32": (up, gate, down), "dense": dense, "pool": pool, "threshold": threshold,
            "down_int8": (q_down.t().contiguous(), s_down, down.bias.detach()),
            "gate_int8": (q_gate, s_gate, gate.bias.detach()) if gated else None}


def forwards(torch, b):
    from deftcompress.runtime.sparse_kernels import down_int8, down_int8_or_dense, gate_int8, sparse_enough

    pool, thr, dense = b["pool"], b["threshold"], b["dense"]
    gated = b["gate_int8"] is not None

    def act(x):
        return torch.relu(dense["up"](x) - thr)

    def dense_block(x):
        a = act(x)
        return dense["down"](a * dense["gate"](x) if gated else a)

    def sparse_block(x):
        a = act(x)
        h = a * gate_int8(x, a, *b["gate_int8"]) if gated else a
        return down_int8(h, *b["down_int8"])

    def auto_block(x):  # what a runtime would run: sparse where the compiled count says it pays, else dense int8
        a = act(x)
        if not gated:
            return down_int8_or_dense(a, *b["down_int8"], dense["down"])
        if sparse_enough(a):
            return down_int8(a * gate_int8(x, a, *b["gate_int8"]), *b["down_int8"])
        return dense["down"](a * dense["gate"](x))

    def fp32_block(x):
        up, gate, down = b["fp32"]
        a = torch.relu(up(x) - thr)
        return down(a * gate(x) if gated else a)

    acts = [act(pool[i:i + 1]) for i in range(pool.shape[0])]  # the down-projection's inputs, precomputed
    return {
        "dense block": lambda i: dense_block(pool[i % 256:i % 256 + 1]),
        "sparse block": lambda i: sparse_block(pool[i % 256:i % 256 + 1]),
        "auto block": lambda i: auto_block(pool[i % 256:i % 256 + 1]),
        "dense down": lambda i: dense["down"](acts[i % 256]),
        "sparse down": lambda i: down_int8(acts[i % 256], *b["down_int8"]),
        "count": lambda i: sparse_enough(acts[i % 256]),  # what the choice adds to a block that stays dense
    }, dense_block, sparse_block, fp32_block


def run(args) -> dict:
    import torch

    from deftcompress.runtime.sparse_kernels import load, why_not

    torch.set_num_threads(args.threads)
    if load() is None:
        raise SystemExit(f"the kernels did not build: {why_not()}")
    rows = []
    with torch.no_grad():
        for s, (label, d_model, d_ff, gated) in enumerate(SHAPES):
            for density in DENSITIES:
                b = block(torch, d_model, d_ff, gated, density, seed=s)
                fns, dense_block, sparse_block, fp32_block = forwards(torch, b)
                t = timed(fns, args.repeats, args.calls)
                x = b["pool"][:64]
                measured = float((torch.relu(b["fp32"][0](x) - b["threshold"]) != 0).float().mean())
                err_sparse = float((sparse_block(x) - fp32_block(x)).abs().max())
                err_dense = float((dense_block(x) - fp32_block(x)).abs().max())
                rows.append({"block": label, "gated": gated, "density": density, "measured_density": round(measured, 4),
                             "dense_block_us": round(1e6 * t["dense block"], 2),
                             "sparse_block_us": round(1e6 * t["sparse block"], 2),
                             "block_speedup": round(t["dense block"] / t["sparse block"], 3),
                             "auto_block_speedup": round(t["dense block"] / t["auto block"], 3),
                             "dense_down_us": round(1e6 * t["dense down"], 2),
                             "sparse_down_us": round(1e6 * t["sparse down"], 2),
                             "down_speedup": round(t["dense down"] / t["sparse down"], 3),
                             "count_us": round(1e6 * t["count"], 2),
                             "max_error_sparse_int8": err_sparse, "max_error_dense_int8": err_dense})
                print(f"{label} density {density}: block {rows[-1]['block_speedup']}x, down {rows[-1]['down_speedup']}x",
                      file=sys.stderr)
    from deftcompress.runtime.sparse_kernels import INT8_MAX_DENSITY

    return {"command": " ".join(["python benchmarks/sparse_mlp_int8.py", *sys.argv[1:]]), "threads": args.threads,
            "max_density": INT8_MAX_DENSITY,
            "repeats": args.repeats, "calls": args.calls, "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "rows": rows}


def render(data: dict) -> str:
    lines = ["# Sparse int8 MLP blocks against dense int8 (PyTorch), one token", "",
             f"Command: `{data['command']}` ({data['threads']} thread(s), torch {data['torch']}, median of "
             f"{data['repeats']} alternating repetitions of {data['calls']} single-token calls).", "",
             "Speed-up = dense int8 time / sparse int8 time (above 1: the sparse path is faster). Error: largest "
             "absolute difference to the fp32 block on 64 tokens; the sparse path keeps activations in float, so its "
             "error is the weights' rounding only.", "",
             f"Chosen: the block as a runtime would run it, sparse where one compiled count (`sparse_enough`) finds at most "
             f"{data.get('max_density', 0.2):g} of the activations nonzero, else the dense int8 layers. Count: the time of "
             "that count alone, what the choice adds where the block stays dense (the chosen column's distance from "
             "1.00x beyond it is the spread of the measurement).", "",
             "| block | density | block: dense / sparse us | block speed-up | chosen speed-up | count us (of the dense block) "
             "| down: dense / sparse us | down speed-up | error sparse int8 | error dense int8 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['block']} | {r['density']:.2f} ({r['measured_density']:.3f}) | {r['dense_block_us']:.1f} / "
                     f"{r['sparse_block_us']:.1f} | {r['block_speedup']:.2f}x | {r['auto_block_speedup']:.2f}x | "
                     f"{r['count_us']:.2f} ({r['count_us'] / r['dense_block_us']:.1%}) | "
                     f"{r['dense_down_us']:.1f} / "
                     f"{r['sparse_down_us']:.1f} | {r['down_speedup']:.2f}x | {r['max_error_sparse_int8']:.2e} | "
                     f"{r['max_error_dense_int8']:.2e} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--calls", type=int, default=64)
    p.add_argument("--out", default=str(HERE / "results" / "sparse_mlp_int8"))
    args = p.parse_args(argv)
    data = run(args)
    Path(args.out + ".json").write_text(json.dumps(data, indent=2) + "\n")
    Path(args.out + ".md").write_text(render(data))
    print(render(data))


if __name__ == "__main__":
    main()
