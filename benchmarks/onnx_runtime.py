"""PyTorch vs onnxruntime, fp32 vs int8, for the DEFT MiniLM model: latency ratios, score, density, size.

Takes a finished DEFT run (e.g. `deftcompress apply recipes/deft_lora_sst2.yaml -o runs/deft_lora_sst2`),
keeps 1/s of its activation scales after the activation (as `activation_scale_fold: activation`
does, rebuilt from the scales saved beside the adapter) and compares, in one process:

- PyTorch eager fp32, PyTorch dynamic int8 (per-channel weights);
- onnxruntime fp32 and onnxruntime dynamic int8 (per-channel) of the exported graph, with and without
  the density outputs (which cost extra passes over the activations and keep the activation unfused).

Latency: the same length-sorted batches of the dev rows, at batch 1 and batch 32; each variant runs
in turn, `--repeats` rounds, and the table gives the median per variant as a ratio to PyTorch fp32
(ratios within one run, because this machine is noisy). Score and density on all dev rows.

    DEFTCOMPRESS_DATA_DIR=../shared/data python benchmarks/onnx_runtime.py runs/deft_lora_sst2 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--threads", type=int, default=1, help="threads for torch and onnxruntime alike")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--latency-rows", type=int, default=128, help="dev rows timed per repeat (score uses all)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "onnx_runtime")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger().setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)

    from onnxruntime.quantization import QuantType, quantize_dynamic
    from safetensors.torch import load_file

    from deftcompress.architecture import mlp_blocks
    from deftcompress.data.features import encode_inputs, pad_inputs
    from deftcompress.data.tasks import get_task, load_examples
    from deftcompress.export.onnx import export_onnx
    from deftcompress.measurement.evaluation import EvalSettings, evaluate
    from deftcompress.measurement.size import state_dict_bytes
    from deftcompress.models.loading import load_model_and_tokenizer
    from deftcompress.quantization.torch_int8 import quantize_dynamic_
    from deftcompress.runtime.onnxruntime import SessionSettings, classifier_outputs, evaluate_onnx, session

    task = get_task("glue/sst2")
    rows = load_examples(task, "validation", None)
    model, tokenizer, arch = load_model_and_tokenizer(str(args.run / "model"), task)
    scales = load_file(str(next(args.run.glob("passes/*_deft/adapter/activation_scales.safetensors"))))
    from deftcompress.architecture.activation_scale import wrap_activation

    with torch.no_grad():
        for block in mlp_blocks(model, arch):
            s = scales[f"{block.label}.scale"]
            block.down.weight.mul_(s[None, :])
            wrap_activation(model, block, 1.0 / s)
    names = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear
             and not any(h in n.split(".") for h in arch.kept_modules)]
    int8_model = quantize_dynamic_(copy.deepcopy(model), names, per_channel=True)
    tmp = tempfile.TemporaryDirectory()
    graph = export_onnx(model, tokenizer, arch, Path(tmp.name) / "fp32", density_outputs=True)
    plain = export_onnx(model, tokenizer, arch, Path(tmp.name) / "fp32_plain", density_outputs=False)

    def int8_of(source, name):
        target = copy.deepcopy(source)
        target.folder = str(Path(tmp.name) / name)
        Path(target.folder).mkdir()
        for f in Path(source.folder).iterdir():
            if f.suffix != ".onnx":
                (Path(target.folder) / f.name).write_bytes(f.read_bytes())
        quantize_dynamic(f"{source.folder}/model.onnx", f"{target.folder}/model.onnx", per_channel=True,
                         weight_type=QuantType.QInt8)
        return target

    options = SessionSettings(threads=args.threads)
    variants = {"PyTorch fp32": ("torch", model), "PyTorch int8": ("torch", int8_model),
                "onnxruntime fp32": ("ort", graph), "onnxruntime int8": ("ort", int8_of(graph, "int8")),
                "onnxruntime fp32, no density outputs": ("ort", plain),
                "onnxruntime int8, no density outputs": ("ort", int8_of(plain, "int8_plain"))}
    sizes = {name: state_dict_bytes(obj) if kind == "torch" else os.path.getsize(f"{obj.folder}/model.onnx")
             for name, (kind, obj) in variants.items()}
    quality = {}
    for name, (kind, obj) in variants.items():
        ev = (evaluate(obj, tokenizer, task, rows, arch, EvalSettings(), progress=False) if kind == "torch" else
              evaluate_onnx(obj, tokenizer, task, rows, arch, EvalSettings(), options))
        quality[name] = {"accuracy": round(ev.task_score, 4),
                         "density": round(ev.density.encoder, 4) if ev.density is not None else None}
        print(name, quality[name], flush=True)

    features = encode_inputs(tokenizer, task, arch, rows[: args.latency_rows], 128)
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    sessions = {name: session(f"{obj.folder}/model.onnx", options) for name, (kind, obj) in variants.items() if kind == "ort"}
    latency = {}
    for batch_size in (1, 32):
        batches = [pad_inputs(tokenizer, [features[i] for i in order[s:s + batch_size]])
                   for s in range(0, len(order), batch_size)]
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name, (kind, obj) in variants.items():  # interleaved: each round times every variant
                start = time.perf_counter()
                for batch in batches:
                    if kind == "torch":
                        with torch.no_grad():
                            obj(**batch)
                    else:
                        classifier_outputs(sessions[name], batch)
                times[name].append((time.perf_counter() - start) / len(order))
        base = statistics.median(times["PyTorch fp32"])
        latency[batch_size] = {name: {"ms_per_row": round(1000 * statistics.median(t), 3),
                                      "ratio": round(statistics.median(t) / base, 3)} for name, t in times.items()}
        print(f"batch {batch_size}", latency[batch_size], flush=True)

    result = {"run": str(args.run), "threads": args.threads, "repeats": args.repeats, "latency_rows": len(order),
              "quality": quality, "latency": latency, "bytes": sizes}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(result, indent=1))
    lines = ["# PyTorch vs onnxruntime, fp32 vs int8 (DEFT MiniLM, SST-2 dev)", "",
             f"Command: `DEFTCOMPRESS_DATA_DIR=../shared/data python benchmarks/onnx_runtime.py {args.run} "
             f"--threads {args.threads} --repeats {args.repeats}` (score on all {len(rows)} rows; latency on "
             f"{len(order)} length-sorted rows, median of {args.repeats} interleaved rounds, ratio to PyTorch fp32)", "",
             "| variant | accuracy | density | size MB | batch 1 ms/row | batch 1 ratio | batch 32 ms/row | batch 32 ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for name in variants:
        b1, b32 = latency[1][name], latency[32][name]
        density = f"{quality[name]['density']:.4f}" if quality[name]["density"] is not None else "-"
        lines.append(f"| {name} | {quality[name]['accuracy']:.4f} | {density} | "
                     f"{sizes[name] / 1e6:.1f} | {b1['ms_per_row']} | {b1['ratio']}x | {b32['ms_per_row']} | {b32['ratio']}x |")
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}.md")
    tmp.cleanup()


if __name__ == "__main__":
    main()
