"""`quantize`: int8 / 4-bit weights for the model the pipeline holds.

Backends:
- `torch_int8`: torch.ao dynamic quantization of Linear layers (int8 weights, activations quantized
  per batch; CPU kernels). Usually the fastest option on CPU. The model cannot be trained or
  exported to ONNX afterwards. Saved as int8 codes + scales in safetensors (format `torch_int8`
  of `deftcompress.models.formats`), reloadable by deftcompress.
- `bnb_8bit` / `bnb_4bit`: bitsandbytes LLM.int8 / NF4 (or FP4) layers through
  `deftcompress.quantization.bnb`. They run on CPU but dequantize inside every matmul: smaller in memory,
  usually slower than float32 there (the report's latency column shows it). Saved with
  `save_pretrained` plus a bitsandbytes `quantization_config` (format `bitsandbytes`), so
  `from_pretrained` reloads them.
- `ort_int8`: onnxruntime dynamic quantization (int8 weights per output channel) of the graph an
  `onnx_export` pass wrote; the step is then measured in onnxruntime.

Only plain `nn.Linear` layers are quantized; `targets` / `ignore` choose which (task and LM heads
stay float by default). A quantized model is final: no pass that changes the model may follow.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any, Literal

from deftcompress.core.config import PassConfig, option
from deftcompress.core.protocol import ADAPTER, ONNX_GRAPH, QUANTIZED, SCALES_IN_WEIGHTS, TORCH_INT8, Need, Pass
from deftcompress.core.registry import register_pass
from deftcompress.core.selectors import kept_module_patterns, patterns_problem
from deftcompress.errors import DeftcompressError


class QuantizePassError(DeftcompressError):
    """The model cannot be quantized as configured."""


@dataclass
class QuantizeConfig(PassConfig):
    backend: Literal["torch_int8", "bnb_8bit", "bnb_4bit", "ort_int8"] = option(
        "torch_int8", "torch_int8: torch.ao dynamic int8 (CPU); bnb_8bit / bnb_4bit: bitsandbytes; "
                      "ort_int8: onnxruntime dynamic int8 of the graph an onnx_export pass wrote")
    targets: list[str] = option(["Linear"], "layers to quantize: selectors (class name, module-name component or "
                                            "'re:<regex>' on module names; only plain nn.Linear layers are converted)")
    ignore: list[str] = option(kept_module_patterns(), "layers kept in float, same syntax (default: every family's "
                                                       "task heads, pooler and LM head)")
    per_channel: bool = option(True, "torch_int8: one weight scale per output row (ort_int8 always quantizes per "
                                     "channel); false: one per matrix")
    quant_type: Literal["nf4", "fp4"] = option("nf4", "bnb_4bit: the 4-bit data type")
    double_quant: bool = option(True, "bnb_4bit: also quantize the per-block scales")

    def problem(self) -> str | None:
        if not self.targets:
            return "targets: give at least one class name or 're:<regex>'"
        return patterns_problem(self.targets, "targets") or patterns_problem(self.ignore, "ignore")


@register_pass
class Quantize(Pass):
    name = "quantize"
    Config = QuantizeConfig
    summary = "Quantize Linear weights: torch dynamic int8 (CPU), bitsandbytes 8-bit / 4-bit; reports sizes before and after."

    @classmethod
    def leaves(cls, config: QuantizeConfig) -> dict[str, str]:
        if config.backend == "torch_int8":
            return {QUANTIZED: "torch_int8 layers have no trainable weights", TORCH_INT8: "torch_int8 layers"}
        return {QUANTIZED: "to train on a bitsandbytes base use deft with method: qlora"}

    @classmethod
    def needs(cls, config: QuantizeConfig) -> list[Need]:
        needs = super().needs(config) + [
            Need(ADAPTER, False, "{here}: {earlier} leaves its adapter on the model; quantization needs plain weights: "
                                 "set merge: true there (lora, qlora, ia3)"),
            # measured: DEFT + torch int8 fell to 0.509 accuracy (chance) from 0.807 with the scales in the weights
            Need(SCALES_IN_WEIGHTS, False, "{here}: {earlier} leaves {note}, which quantized weights and activations "
                                           "cannot hold (accuracy collapses to chance); set activation_scale_fold: "
                                           "activation there"),
        ]
        if config.backend == "ort_int8":
            needs.append(Need(ONNX_GRAPH, True, "{here}.backend: ort_int8 quantizes an exported ONNX graph and needs an "
                                                "ONNX export pass before it (onnx_export)"))
        return needs

    def eval_settings(self, base):
        if self.config.backend == "ort_int8":  # the quantized graph is what this step made: measure it
            import dataclasses

            return dataclasses.replace(base, runtime="onnxruntime")
        return base

    @classmethod
    def label(cls, config) -> str:
        return {"torch_int8": "int8", "bnb_8bit": "bnb8", "bnb_4bit": "bnb4", "ort_int8": "ort_int8"}[config.backend]

    def run(self, state) -> dict[str, Any]:
        from torch import nn

        from deftcompress.core.selectors import select_modules
        from deftcompress.measurement.size import count_parameters, state_dict_bytes
        from deftcompress.peft_methods.wrapping import is_wrapped

        c = self.config
        model = state.model
        if c.backend == "ort_int8":
            return self._ort_int8(state)
        if is_wrapped(model):
            raise QuantizePassError("quantize: the model carries a PEFT adapter; merge it first (merge: true on the training pass)")
        t0 = time.perf_counter()
        names = [name for name, m in select_modules(model, c.targets, c.ignore) if type(m) is nn.Linear]
        all_linear = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        if not names:
            raise QuantizePassError(f"quantize: targets {c.targets} (minus ignore {c.ignore}) matched no plain nn.Linear layer")
        size_before = state_dict_bytes(model)
        params_before, _ = count_parameters(model)
        details: dict[str, Any] = {"backend": c.backend}
        if c.backend == "torch_int8":
            details.update(self._torch_int8(state, names))
        else:
            details.update(self._bitsandbytes(state, names, all_linear))
        size_after = state_dict_bytes(state.model)
        params_after, nonzero_after = count_parameters(state.model)
        details.update({
            "layers_quantized": len(names),
            "layers_kept_float": [n for n in all_linear if n not in set(names)],
            "size_bytes_before": size_before,
            "size_bytes_after": size_after,
            "size_ratio": round(size_after / max(size_before, 1), 4),
            "params": params_after,
            "params_before": params_before,
            "nonzero_params": nonzero_after,
            "quantize_seconds": round(time.perf_counter() - t0, 3),
        })
        return details

    def _torch_int8(self, state, names: list[str]) -> dict[str, Any]:
        import torch

        from deftcompress.quantization.torch_int8 import QUANT_ATTR, WEIGHTS_FILE, quantize_dynamic_, quantized_modules

        if state.device.type != "cpu":
            raise QuantizePassError(f"quantize: torch_int8 runs on the CPU only (the model is on {state.device}); set device: cpu")
        quantize_dynamic_(state.model, names, per_channel=self.config.per_channel)
        converted = [n for n, _ in quantized_modules(state.model)]
        if sorted(converted) != sorted(names):
            raise QuantizePassError(f"quantize: torch.ao converted {len(converted)} of {len(names)} layers")
        engine = torch.backends.quantized.engine
        # Recorded on the config: the `torch_int8` format writes it into config.json.
        per_channel = self.config.per_channel
        setattr(state.model.config, QUANT_ATTR, {"backend": "torch_int8", "modules": names, "dtype": "qint8", "engine": engine,
                                                 "per_channel": per_channel})
        return {"engine": engine, "weights": f"int8, {'per output channel' if per_channel else 'per tensor'}; "
                                             "activations quantized dynamically per batch",
                "saved_format": f"torch_int8: config.json (deftcompress_quantization) + {WEIGHTS_FILE}: int8 codes and "
                                "scales; reload with deftcompress.models.formats.load_model"}

    def _ort_int8(self, state) -> dict[str, Any]:
        """onnxruntime dynamic int8 of the exported graph(s): int8 weights (per output channel), activations per batch."""
        import shutil
        from pathlib import Path

        from onnxruntime.quantization import QuantType, quantize_dynamic

        from deftcompress.measurement.size import directory_bytes

        graph = state.onnx
        if graph is None:  # validation rejects it; kept for Python callers that bypass the plan
            raise QuantizePassError("quantize: ort_int8 needs an ONNX export pass before it (onnx_export)")
        t0 = time.perf_counter()
        source = Path(graph.folder)
        target = state.pass_dir(self.name) / "onnx_int8"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.onnx", "*.onnx_data"))
        import logging

        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # onnxruntime logs a pre-processing hint on the root logger for every file
        try:
            for name in graph.files:
                quantize_dynamic(str(source / name), str(target / name), per_channel=True, weight_type=QuantType.QInt8)
        finally:
            root.setLevel(level)
        import dataclasses

        state.onnx = dataclasses.replace(graph, folder=str(target), quantized="ort_int8")
        before, after = directory_bytes(source), directory_bytes(target)
        return {"backend": "ort_int8", "weights": "int8 per output channel (onnxruntime quantize_dynamic); "
                                                  "activations quantized per batch",
                "files": graph.files, "size_bytes_before": before, "size_bytes_after": after,
                "size_ratio": round(after / max(before, 1), 4),
                "quantize_seconds": round(time.perf_counter() - t0, 3),
                "note": "the PyTorch model is unchanged; this step is measured in onnxruntime"}

    def _bitsandbytes(self, state, names: list[str], all_linear: list[str]) -> dict[str, Any]:
        import torch

        from deftcompress.architecture.layout import layout_of
        from deftcompress.quantization.bnb import quantize_linear_layers
        from deftcompress.quantization.torch_int8 import QUANT_ATTR

        c = self.config
        bits = 4 if c.backend == "bnb_4bit" else 8
        if bits == 8:
            _quiet_int8_cast_warning()
        chosen = set(names)
        skip = [f"re:{re.escape(n)}" for n in all_linear if n not in chosen]
        summary = quantize_linear_layers(state.model, bits=bits, quant_type=c.quant_type, skip=skip,
                                         double_quant=c.double_quant, compute_dtype=torch.float32)
        restructured = layout_of(state.model) is not None
        # Recorded on the config: the final save keeps these layers quantized (a QLoRA base it would dequantize).
        setattr(state.model.config, QUANT_ATTR, {"backend": c.backend, "bits": bits, "modules": summary.converted})
        return {"bits": bits, "quant_type": c.quant_type if bits == 4 else "int8 (LLM.int8, no outlier threshold)",
                "layers_converted": len(summary.converted),
                "weight_bytes_before": summary.weight_bytes_before, "weight_bytes_after": summary.weight_bytes_after,
                "saved_format": ("float32, dequantized (the values the quantized layers compute with): the model has "
                                 "structurally pruned widths, which transformers' bitsandbytes loader cannot build"
                                 if restructured else
                                 "bitsandbytes: save_pretrained with a bitsandbytes quantization_config (packed "
                                 "weights); transformers from_pretrained reloads it"),
                "note": "bitsandbytes dequantizes in every matmul on CPU: smaller, usually slower than float32 here"
                        + ("; 8-bit matmuls cast their float32 inputs to float16" if bits == 8 else "")}


class _DropMessage:
    """logging filter: drop records whose message starts with a prefix."""

    def __init__(self, prefix: str):
        self.prefix = prefix

    def filter(self, record) -> bool:
        return not str(record.msg).startswith(self.prefix)


def _quiet_int8_cast_warning() -> None:
    """bitsandbytes logs "inputs will be cast ... to float16" on every 8-bit matmul (hundreds of lines per evaluation).

    The cast is how LLM.int8 works on CPU; the pass's details say so once instead.
    """
    import logging

    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropMessage) for f in logger.filters):
        logger.addFilter(_DropMessage("MatMul8bitLt: inputs will be cast"))


__all__ = ["Quantize", "QuantizeConfig"]
