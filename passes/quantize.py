"""`quantize`: int8 / 4-bit weights for the model the pipeline holds.

Backends:
- `torch_int8`: torch.ao dynamic quantization of Linear layers (int8 weights, activations quantized
  per batch; CPU kernels). Usually the fastest option on CPU. The model cannot be trained or
  exported to ONNX afterwards. Saved as int8 codes + scales in safetensors (`deftcompress.int8`),
  reloadable by deftcompress.
- `bnb_8bit` / `bnb_4bit`: bitsandbytes LLM.int8 / NF4 (or FP4) layers through
  `deftcompress.bnb`. They run on CPU but dequantize inside every matmul: smaller in memory,
  usually slower than float32 there (the report's latency column shows it). Saved with
  `save_pretrained` plus a bitsandbytes `quantization_config`, so `from_pretrained` reloads them.
- `ort_int8`: onnxruntime dynamic quantization of an exported ONNX graph. It needs an ONNX export
  pass before it, which deftcompress does not have yet: rejected at validation.

Only plain `nn.Linear` layers are quantized; `targets` / `ignore` choose which (task and LM heads
stay float by default). A quantized model is final: no pass that changes the model may follow.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any, Literal

from deftcompress.config import PassConfig, option
from deftcompress.errors import DeftcompressError, RecipeError
from deftcompress.registry import Pass, register_pass
from deftcompress.targets import patterns_problem

DEFAULT_IGNORE = ["re:.*classifier.*", "re:.*pooler.*", "re:.*lm_head.*", r"re:(.*\.)?score"]


class QuantizePassError(DeftcompressError):
    """The model cannot be quantized as configured."""


@dataclass
class QuantizeConfig(PassConfig):
    backend: Literal["torch_int8", "bnb_8bit", "bnb_4bit", "ort_int8"] = option(
        "torch_int8", "torch_int8: torch.ao dynamic int8 (CPU); bnb_8bit / bnb_4bit: bitsandbytes; "
                      "ort_int8: onnxruntime on an exported graph (needs an ONNX export pass first)")
    targets: list[str] = option(["Linear"], "layers to quantize: class names or 're:<regex>' on module names "
                                            "(only plain nn.Linear layers are converted)")
    ignore: list[str] = option(list(DEFAULT_IGNORE), "layers kept in float, same syntax (default: task and LM heads)")
    quant_type: Literal["nf4", "fp4"] = option("nf4", "bnb_4bit: the 4-bit data type")
    double_quant: bool = option(True, "bnb_4bit: also quantize the per-block scales")

    def check(self) -> str | None:
        if not self.targets:
            return "targets: give at least one class name or 're:<regex>'"
        return patterns_problem(self.targets, "targets") or patterns_problem(self.ignore, "ignore")


@register_pass
class Quantize(Pass):
    name = "quantize"
    Config = QuantizeConfig
    summary = "Quantize Linear weights: torch dynamic int8 (CPU), bitsandbytes 8-bit / 4-bit; reports sizes before and after."

    @classmethod
    def check_plan(cls, plan, position, recipe) -> None:
        here = plan[position]
        backend = here.config.backend
        if backend == "ort_int8":
            raise RecipeError(f"{here.where}.backend: ort_int8 quantizes an exported ONNX graph and needs an ONNX export "
                              "pass before it; deftcompress has none yet (use torch_int8 for int8 on CPU)")
        for earlier in plan[:position]:
            if earlier.cls.trains and not getattr(earlier.config, "merge", False):
                raise RecipeError(f"{here.where}: {earlier.where} leaves its adapter on the model; quantization needs "
                                  "plain weights: set merge: true there (lora, qlora, ia3)")
        for later in plan[position + 1:]:
            if backend == "torch_int8" and ("onnx" in later.name or later.name.startswith("export")):
                raise RecipeError(f"{later.where}: torch_int8 layers cannot be exported to ONNX; export the float model "
                                  "and quantize the graph with ort_int8 instead")
            if later.cls.trains:
                why = ("torch_int8 layers have no trainable weights" if backend == "torch_int8" else
                       "to train on a bitsandbytes base use deft with method: qlora")
                raise RecipeError(f"{later.where}: cannot train after {here.where} ({why}); train first, then quantize")
            if later.cls.changes_model:
                raise RecipeError(f"{later.where}: {here.where} must come after every pass that changes the model")

    def run(self, state) -> dict[str, Any]:
        from torch import nn

        from deftcompress.models import count_parameters, state_dict_bytes
        from deftcompress.targets import select_modules

        c = self.config
        model = state.model
        if hasattr(model, "peft_config") or hasattr(model, "adapters_config"):
            raise QuantizePassError("quantize: the model carries a PEFT adapter; merge it first (merge: true on the training pass)")
        if c.backend == "ort_int8":  # validation rejects it; kept for Python callers that bypass the plan
            raise QuantizePassError("quantize: ort_int8 needs an ONNX export pass before it, which deftcompress does not have yet")
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

        from deftcompress.int8 import WEIGHTS_FILE, quantize_dynamic_, quantized_modules, save_int8_checkpoint

        if state.device.type != "cpu":
            raise QuantizePassError(f"quantize: torch_int8 runs on the CPU only (the model is on {state.device}); set device: cpu")
        quantize_dynamic_(state.model, names)
        converted = [n for n, _ in quantized_modules(state.model)]
        if sorted(converted) != sorted(names):
            raise QuantizePassError(f"quantize: torch.ao converted {len(converted)} of {len(names)} layers")
        engine = torch.backends.quantized.engine
        info = {"backend": "torch_int8", "modules": names, "dtype": "qint8", "engine": engine}
        saved: dict[str, Any] = {}

        def save(folder) -> None:
            saved.update(save_int8_checkpoint(state.model, folder, info))

        state.artifacts["save_model"] = save
        state.artifacts["quantization"] = info
        return {"engine": engine, "weights": "int8, per-tensor symmetric; activations quantized dynamically per batch",
                "saved_format": f"config.json (deftcompress_quantization) + {WEIGHTS_FILE}: int8 codes and scales; "
                                "reload with deftcompress.models.load_model_and_tokenizer"}

    def _bitsandbytes(self, state, names: list[str], all_linear: list[str]) -> dict[str, Any]:
        import torch

        from deftcompress.bnb import quantize_linear_layers

        c = self.config
        bits = 4 if c.backend == "bnb_4bit" else 8
        if bits == 8:
            _quiet_int8_cast_warning()
        chosen = set(names)
        skip = [f"re:{re.escape(n)}" for n in all_linear if n not in chosen]
        summary = quantize_linear_layers(state.model, bits=bits, quant_type=c.quant_type, skip=skip,
                                         double_quant=c.double_quant, compute_dtype=torch.float32)
        skipped = [n for n in all_linear if n not in set(summary.converted)]

        def quantization_config():
            from transformers import BitsAndBytesConfig

            if bits == 4:
                return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=c.quant_type,
                                          bnb_4bit_use_double_quant=c.double_quant, bnb_4bit_compute_dtype=torch.float32,
                                          llm_int8_skip_modules=skipped)
            return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0, llm_int8_skip_modules=skipped)

        from deftcompress.structure import layout_of

        restructured = layout_of(state.model) is not None

        def save(folder) -> None:
            if restructured:
                # transformers' bitsandbytes loader cannot build non-stock widths: save what the layers compute with
                import copy

                from deftcompress.bnb import dequantize_linear_layers

                clone = copy.deepcopy(state.model)
                dequantize_linear_layers(clone)
                clone.save_pretrained(folder, safe_serialization=True)
                return
            # The quantization_config makes from_pretrained read the packed weights back as bitsandbytes layers.
            config = state.model.config
            had = "quantization_config" in vars(config)
            old = getattr(config, "quantization_config", None)
            config.quantization_config = quantization_config()
            try:
                state.model.save_pretrained(folder, safe_serialization=True)
            finally:
                if had:
                    config.quantization_config = old
                else:
                    del config.quantization_config

        state.artifacts["save_model"] = save
        state.artifacts["quantization"] = {"backend": c.backend, "bits": bits, "modules": summary.converted}
        return {"bits": bits, "quant_type": c.quant_type if bits == 4 else "int8 (LLM.int8, no outlier threshold)",
                "weight_bytes_before": summary.weight_bytes_before, "weight_bytes_after": summary.weight_bytes_after,
                "saved_format": ("float32, dequantized (the values the quantized layers compute with): the model has "
                                 "structurally pruned widths, which transformers' bitsandbytes loader cannot build"
                                 if restructured else
                                 "save_pretrained with a bitsandbytes quantization_config (packed weights); "
                                 "transformers from_pretrained reloads it"),
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
