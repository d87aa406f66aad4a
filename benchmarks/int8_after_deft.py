"""int8 after DEFT: why it collapsed, and what keeps it within a point (all SST-2 dev rows).

Takes a finished DEFT run (LoRA, activation scales folded into the weights, e.g.
`deftcompress apply recipes/deft_lora_sst2.yaml -o runs/deft_lora_sst2`) and evaluates its model:

- fp32, as saved (s folded into the up-projection rows and 1/s into the down-projection columns);
- torch dynamic int8, per-tensor and per-channel weights, on that model;
- onnxruntime int8 (per-channel) on the exported graph of that model;
- the same three after moving 1/s out of the down-projection into a per-neuron multiply after the
  activation (`activation_scale_fold: activation`, rebuilt exactly from the scales saved beside the
  adapter), which is what the deft pass now does when asked.

    DEFTCOMPRESS_DATA_DIR=../shared/data python benchmarks/int8_after_deft.py runs/deft_lora_sst2
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished DEFT run folder (model/ and passes/*_deft/adapter/)")
    parser.add_argument("--rows", type=int, default=None, help="evaluation rows (default: all)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "int8_after_deft")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger().setLevel(logging.ERROR)

    from safetensors.torch import load_file

    from deftcompress.architecture import mlp_blocks
    from deftcompress.data.tasks import get_task, load_examples
    from deftcompress.export.onnx import export_onnx
    from deftcompress.measurement.evaluation import EvalSettings, evaluate
    from deftcompress.models.loading import load_model_and_tokenizer
    from deftcompress.quantization.torch_int8 import quantize_dynamic_
    from deftcompress.runtime.onnxruntime import SessionSettings, evaluate_onnx
    from deftcompress.architecture.activation_scale import wrap_activation

    task = get_task("glue/sst2")
    rows = load_examples(task, "validation", None, args.rows)
    scales_file = next(args.run.glob("passes/*_deft/adapter/activation_scales.safetensors"))
    scales = load_file(str(scales_file))
    results = []

    def record(variant: str, fold: str, ev) -> None:
        results.append({"variant": variant, "fold": fold, "accuracy": round(ev.task_score, 4),
                        "density": round(ev.density.encoder, 4) if ev.density and ev.density.encoder is not None else None})
        print(f"{fold:>22} | {variant:<32} accuracy {ev.task_score:.4f}", flush=True)

    for fold in ("weights (s and 1/s)", "activation (1/s apart)"):
        model, tokenizer, arch = load_model_and_tokenizer(str(args.run / "model"), task)
        if fold.startswith("activation"):
            with torch.no_grad():
                for block in mlp_blocks(model, arch):
                    s = scales[f"{block.label}.scale"]
                    block.down.weight.mul_(s[None, :])  # undo the 1/s folded into the columns ...
                    wrap_activation(model, block, 1.0 / s)  # ... and keep it after the activation instead
        record("PyTorch fp32", fold, evaluate(model, tokenizer, task, rows, arch, EvalSettings(), progress=False))
        names = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear
                 and not any(h in n.split(".") for h in arch.kept_modules)]
        for per_channel in (False, True):
            quantized = quantize_dynamic_(copy.deepcopy(model), names, per_channel=per_channel)
            record(f"torch int8 ({'per-channel' if per_channel else 'per-tensor'} weights)", fold,
                   evaluate(quantized, tokenizer, task, rows, arch, EvalSettings(), progress=False))
        with tempfile.TemporaryDirectory() as tmp:
            graph = export_onnx(model, tokenizer, arch, Path(tmp) / "onnx", density_outputs=True)
            record("onnxruntime fp32", fold, evaluate_onnx(graph, tokenizer, task, rows, arch, EvalSettings(), SessionSettings()))
            from onnxruntime.quantization import QuantType, quantize_dynamic

            path = Path(graph.folder) / "model.onnx"
            quantize_dynamic(str(path), str(path.with_suffix(".int8.onnx")), per_channel=True, weight_type=QuantType.QInt8)
            os.replace(path.with_suffix(".int8.onnx"), path)
            record("onnxruntime int8 (per-channel)", fold,
                   evaluate_onnx(graph, tokenizer, task, rows, arch, EvalSettings(), SessionSettings()))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps({"run": str(args.run), "rows": len(rows), "results": results}, indent=1))
    lines = ["# int8 after DEFT (MiniLM, LoRA, SST-2 dev)", "",
             f"Command: `DEFTCOMPRESS_DATA_DIR=../shared/data python benchmarks/int8_after_deft.py {args.run}`"
             f"{f' --rows {args.rows}' if args.rows else ''} ({len(rows)} rows; the run from `recipes/deft_lora_sst2.yaml`)", "",
             "| where the activation scales go | runtime | accuracy | exact density |", "|---|---|---|---|"]
    lines += [f"| {r['fold']} | {r['variant']} | {r['accuracy']:.4f} | {r['density'] if r['density'] is not None else '-'} |"
              for r in results]
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}.md and .json")


if __name__ == "__main__":
    main()
