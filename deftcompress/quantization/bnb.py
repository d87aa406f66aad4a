"""bitsandbytes helpers: quantize the Linear layers of an in-memory model, and undo it.

Shared by the `deft` pass (QLoRA: a 4-bit nf4 base under LoRA) and the `quantize` pass. They work
on the model the pipeline holds (which may already be pruned), never by reloading a checkpoint.
bitsandbytes 0.50 runs on the CPU: a layer is quantized when its weight is moved with `.to(device)`,
CPU included.

    from deftcompress.quantization.bnb import quantize_linear_layers, dequantize_linear_layers
    summary = quantize_linear_layers(model, bits=4)          # in place; returns what was converted
    dequantize_linear_layers(model)                          # back to float Linear layers (for saving)

Heads, poolers and LM heads (the architecture table's `kept_modules`) are skipped by default: they
are trained or tied, and peft cannot wrap a quantized head. Skip entries are selectors
(`deftcompress.core.selectors`). `is_bnb_linear` / `is_bnb_weight` are the one way this toolkit
recognises bitsandbytes layers and weights.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Literal

import torch
from torch import nn

from deftcompress.core.selectors import kept_module_patterns, matches
from deftcompress.errors import DeftcompressError

QuantType = Literal["nf4", "fp4"]


class QuantizationError(DeftcompressError):
    """bitsandbytes is missing, or the model cannot be quantized as asked."""


@dataclass
class QuantizationSummary:
    bits: int
    quant_type: str | None
    converted: list[str] = field(default_factory=list)  # full module names now quantized
    skipped: list[str] = field(default_factory=list)  # Linear layers left in float (skip list)
    weight_bytes_before: int = 0
    weight_bytes_after: int = 0

    def to_dict(self) -> dict:
        return {"bits": self.bits, "quant_type": self.quant_type, "converted_layers": len(self.converted),
                "skipped_layers": self.skipped, "weight_bytes_before": self.weight_bytes_before,
                "weight_bytes_after": self.weight_bytes_after}


def require_bitsandbytes():
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise QuantizationError(f"bitsandbytes is not importable ({exc}); pip install 'bitsandbytes>=0.50'") from None
    return bnb


def is_bnb_linear(module: nn.Module) -> bool:
    """True for bitsandbytes 4-bit and 8-bit Linear layers (without importing bitsandbytes if it is not loaded)."""
    return type(module).__module__.startswith("bitsandbytes") and type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def is_bnb_weight(tensor) -> bool:
    """True for bitsandbytes' packed weights (`Params4bit`, `Int8Params`), without importing bitsandbytes."""
    return type(tensor).__module__.startswith("bitsandbytes") and type(tensor).__name__ in ("Params4bit", "Int8Params")


def is_quantized(model: nn.Module) -> bool:
    return any(is_bnb_linear(m) for m in model.modules())


def _weight_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def quantize_linear_layers(model: nn.Module, bits: Literal[4, 8] = 4, quant_type: QuantType = "nf4",
                           skip: tuple[str, ...] | list[str] | None = None, compute_dtype: torch.dtype = torch.float32,
                           double_quant: bool = True, device: torch.device | str | None = None) -> QuantizationSummary:
    """Replace every plain `nn.Linear` of `model` (except `skip`) by a bitsandbytes layer, in place.

    bits=4: `Linear4bit` (nf4 or fp4, blocksize 64, optional double quantization of the scales).
    bits=8: `Linear8bitLt` (LLM.int8 row-wise absmax, no outlier threshold). Weights are frozen.
    `skip`: selectors (`deftcompress.core.selectors`); default: every family's heads, pooler and LM head.
    `device` defaults to where the model's parameters are.
    """
    bnb = require_bitsandbytes()
    if bits not in (4, 8):
        raise QuantizationError(f"bits must be 4 or 8, got {bits!r}")
    if hasattr(model, "peft_config") or hasattr(model, "adapters_config"):
        raise QuantizationError("quantize the base model before wrapping it with a PEFT method (or merge the adapter first)")
    # transformers keeps these in float when it loads a quantized checkpoint (T5's `wo`: its forward casts the
    # activations to the weight's dtype, which would be uint8)
    skip = tuple(kept_module_patterns() if skip is None else skip) + tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    summary = QuantizationSummary(bits=bits, quant_type=quant_type if bits == 4 else "int8")
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if type(child) is not nn.Linear:  # exact type: LoRA / already-quantized layers are subclasses
                continue
            if matches(name, child, skip):
                summary.skipped.append(name)
                continue
            summary.weight_bytes_before += _weight_bytes(child.weight)
            weight = child.weight.data.detach().to("cpu", torch.float32).contiguous()
            has_bias = child.bias is not None
            if bits == 4:
                layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=has_bias, compute_dtype=compute_dtype,
                                          compress_statistics=double_quant, quant_type=quant_type, device="meta")
                layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=double_quant,
                                                 quant_type=quant_type, module=layer)
            else:
                layer = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=has_bias, has_fp16_weights=False,
                                            threshold=0.0, device="meta")
                layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
            if has_bias:
                layer.bias = nn.Parameter(child.bias.data.detach().to("cpu").clone(), requires_grad=False)
            layer = layer.to(device)  # quantizes (bitsandbytes does it on the move, CPU included)
            use_generic_cpu_kernel(layer)
            layer.train(child.training)
            setattr(parent, child_name, layer)
            summary.converted.append(name)
            summary.weight_bytes_after += _weight_bytes(layer.weight.data) + _quant_state_bytes(layer)
    if not summary.converted:
        raise QuantizationError(f"no Linear layer to quantize (skipped: {', '.join(summary.skipped) or 'none'})")
    return summary


def use_generic_cpu_kernel(model_or_layer: nn.Module) -> int:
    """Keep bitsandbytes 4-bit layers on the generic kernel: no AVX512-BF16 weight repacking on CPU.

    On CPUs with AVX512-BF16, an eval-mode `Linear4bit` repacks its weight on first use into a bf16
    format. That path crashes for shapes it cannot tile (output width not a multiple of 32, input
    width not a multiple of the 64-value block: pruned widths, small models), fails on a bias that
    requires grad, and computes in bf16, so evaluation would not match training. Returns how many
    layers were switched.
    """
    switched = 0
    for module in model_or_layer.modules():
        if is_bnb_linear(module) and getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            switched += 1
    return switched


def _quant_state_bytes(layer: nn.Module) -> int:
    state = getattr(layer.weight, "quant_state", None)
    total = 0
    if state is not None:
        for t in (getattr(state, "absmax", None), getattr(state, "code", None)):
            if isinstance(t, torch.Tensor):
                total += _weight_bytes(t)
        nested = getattr(state, "state2", None)
        if nested is not None:
            for t in (getattr(nested, "absmax", None), getattr(nested, "code", None)):
                if isinstance(t, torch.Tensor):
                    total += _weight_bytes(t)
    scb = getattr(layer.weight, "SCB", None)
    if scb is None:
        scb = getattr(getattr(layer, "state", None), "SCB", None)
    if isinstance(scb, torch.Tensor):
        total += _weight_bytes(scb)
    return total


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The float32 weight a bitsandbytes (or plain) Linear layer computes with."""
    if not is_bnb_linear(layer):
        return layer.weight.data.float()
    bnb = require_bitsandbytes()
    weight = layer.weight
    if type(layer).__name__ == "Linear4bit":
        state = weight.quant_state if getattr(weight, "quant_state", None) is not None else layer.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            # bitsandbytes may repack CPU weights for its kernels; undo that before dequantizing
            from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

            data, state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
            return bnb.functional.dequantize_4bit(data, state).float()
        return bnb.functional.dequantize_4bit(weight.data, state).float()
    # 8-bit: int8 codes times the per-row absmax / 127
    codes = weight.data if weight.data.dtype == torch.int8 else getattr(layer.state, "CB", None)
    scb = getattr(weight, "SCB", None)
    if scb is None:
        scb = layer.state.SCB
    if codes is None or codes.dtype != torch.int8:
        codes = layer.state.CB
    return codes.float() * (scb.float().unsqueeze(1) / 127.0)


def dequantize_linear_layers(model: nn.Module) -> int:
    """Replace every bitsandbytes Linear layer of `model` by a float32 `nn.Linear` (in place); returns the count."""
    count = 0
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if not is_bnb_linear(child):
                continue
            setattr(parent, child_name, to_float_linear(child))
            count += 1
    return count


def to_float_linear(layer: nn.Module, weight: torch.Tensor | None = None) -> nn.Linear:
    """A float32 nn.Linear computing what `layer` computes (or with `weight` instead, e.g. a merged one)."""
    weight = dequantized_weight(layer) if weight is None else weight
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=layer.bias is not None, device=weight.device)
    linear.weight = nn.Parameter(weight.detach().float().contiguous(), requires_grad=False)
    if layer.bias is not None:
        linear.bias = nn.Parameter(layer.bias.detach().float().clone(), requires_grad=layer.bias.requires_grad)
    linear.train(layer.training)
    return linear


def quantization_config_for(model: nn.Module):
    """The transformers `BitsAndBytesConfig` describing the bitsandbytes layers of `model` (read off the layers)."""
    from transformers import BitsAndBytesConfig

    layers = [(name, m) for name, m in model.named_modules() if is_bnb_linear(m)]
    if not layers:
        raise QuantizationError("the model has no bitsandbytes layers")
    kinds = {type(m).__name__ for _, m in layers}
    if len(kinds) != 1:
        raise QuantizationError(f"the model mixes bitsandbytes layer types {sorted(kinds)}; one config cannot describe it")
    quantized = {name for name, _ in layers}
    kept = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name not in quantized]
    first = layers[0][1]
    if kinds == {"Linear4bit"}:
        weight = first.weight
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=getattr(weight, "quant_type", "nf4"),
                                  bnb_4bit_use_double_quant=bool(getattr(weight, "compress_statistics", True)),
                                  bnb_4bit_compute_dtype=getattr(first, "compute_dtype", None) or torch.float32,
                                  llm_int8_skip_modules=kept)
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=float(first.state.threshold), llm_int8_skip_modules=kept)


@contextmanager
def marked_as_quantized(model: nn.Module, bits: int) -> Iterator[None]:
    """Tell peft the base is 4/8-bit while it wraps it (it then uses its bitsandbytes LoRA layers, which merge correctly).

    transformers sets these flags when it loads a quantized checkpoint; we quantized in memory, so we
    set them only for the wrapping and remove them again (transformers' save path reads them).
    """
    attr = "is_loaded_in_4bit" if bits == 4 else "is_loaded_in_8bit"
    had = attr in vars(model)
    old = getattr(model, attr, None)
    setattr(model, attr, True)
    try:
        yield
    finally:
        if had:
            setattr(model, attr, old)
        else:
            delattr(model, attr)
