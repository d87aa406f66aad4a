"""Dynamic int8 quantization of Linear layers (torch.ao, CPU) and its checkpoint format.

`save_pretrained` cannot write these layers (their weights live in packed, non-Parameter
objects), so a quantized model is saved as::

    config.json                  stock config + "deftcompress_quantization": {"backend": "torch_int8", "modules": [...]}
    model.int8.safetensors       per quantized layer: <name>.weight_int8 (int8), <name>.weight_scale,
                                 <name>.weight_zero_point (and <name>.weight_axis if per-channel), <name>.bias;
                                 every other tensor as it is (float)

The file name is deliberately not `model.safetensors`: stock `from_pretrained` then refuses the
folder instead of loading int8 codes into float weights. `deftcompress.models.loading.load_model_and_tokenizer`
reads it (build from config, quantize the same layers, set the stored int8 weights): the reloaded
model computes exactly what the saved one did.

torch 2.13 marks its quantized-tensor constructors (which torch.ao dynamic quantization uses) as
deprecated, for removal in a future release; this backend will need porting then (e.g. to torchao).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deftcompress.errors import CheckpointError

QUANT_ATTR = "deftcompress_quantization"
WEIGHTS_FILE = "model.int8.safetensors"


def quantize_dynamic_(model: nn.Module, names: list[str], per_channel: bool = False) -> nn.Module:
    """Replace the named nn.Linear modules by dynamic int8 ones (weights int8, activations quantized per batch).

    `per_channel`: one weight scale per output row instead of one per matrix (rows scaled by DEFT's
    activation scales, up to ~1000x apart, need it).
    """
    import warnings

    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

    qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
    with warnings.catch_warnings():
        # torch 2.13 flags its quantized-tensor constructors as deprecated on every call; said once in the docstring
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*deprecated")
        return quantize_dynamic(model, qconfig_spec={name: qconfig for name in names}, dtype=torch.qint8, inplace=True)


def is_dynamic_int8(module: nn.Module) -> bool:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return isinstance(module, DynamicLinear)


def quantized_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if is_dynamic_int8(m)]


def int8_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Everything needed to rebuild `model`: int8 codes and scales of quantized layers, other tensors as they are."""
    tensors: dict[str, torch.Tensor] = {}
    for name, module in quantized_modules(model):
        weight = module.weight()
        tensors[f"{name}.weight_int8"] = weight.int_repr().contiguous()
        if weight.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            tensors[f"{name}.weight_scale"] = torch.tensor([weight.q_scale()], dtype=torch.float64)
            tensors[f"{name}.weight_zero_point"] = torch.tensor([weight.q_zero_point()], dtype=torch.int64)
        else:
            tensors[f"{name}.weight_scale"] = weight.q_per_channel_scales().to(torch.float64)
            tensors[f"{name}.weight_zero_point"] = weight.q_per_channel_zero_points().to(torch.int64)
            tensors[f"{name}.weight_axis"] = torch.tensor([weight.q_per_channel_axis()], dtype=torch.int64)
        bias = module.bias()
        if bias is not None:
            tensors[f"{name}.bias"] = bias.detach().contiguous()
    seen: set[tuple[int, int]] = set()
    quantized = tuple(f"{name}." for name, _ in quantized_modules(model))
    for key, value in model.state_dict().items():
        if key.startswith(quantized) or not isinstance(value, torch.Tensor):  # packed params, unused output scale
            continue
        ident = (value.untyped_storage().data_ptr(), value.storage_offset())
        if ident in seen:  # tied weights (T5 embeddings): stored once, re-tied on load
            continue
        seen.add(ident)
        tensors[key] = value.detach().contiguous()
    return tensors


def save_int8_checkpoint(model: nn.Module, folder: str | Path, info: dict[str, Any]) -> dict[str, Any]:
    """Write config.json (with `info` under deftcompress_quantization) and model.int8.safetensors."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(model.config)
    setattr(config, QUANT_ATTR, dict(info))
    config.save_pretrained(folder)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and model.can_generate():
        generation_config.save_pretrained(folder)
    tensors = int8_tensors(model)
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt", QUANT_ATTR: json.dumps(info)})
    return {"file": WEIGHTS_FILE, "bytes": (folder / WEIGHTS_FILE).stat().st_size, "tensors": len(tensors)}


def read_int8_checkpoint(folder: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(folder) / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder}: config.json says torch_int8 but {WEIGHTS_FILE} is missing")
    return load_file(str(path))


def split_int8_tensors(tensors: dict[str, torch.Tensor], modules: list[str]) -> tuple[dict, dict]:
    """(tensors of the int8 layers, every other tensor) of a `model.int8.safetensors` file."""
    prefixes = tuple(f"{name}." for name in modules)
    own = {k: v for k, v in tensors.items() if k.startswith(prefixes)}
    return own, {k: v for k, v in tensors.items() if k not in own}


def load_int8_weights(model: nn.Module, info: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Quantize `info['modules']` of `model` (float weights loaded or not) and set their stored int8 weights.

    Call it after loading the float tensors: quantized modules cannot take part in `load_state_dict`.
    """
    if info.get("backend") != "torch_int8":
        raise CheckpointError(f"{QUANT_ATTR}: unknown backend {info.get('backend')!r}")
    tensors = dict(tensors)
    quantize_dynamic_(model, list(info["modules"]), per_channel=bool(info.get("per_channel", False)))
    for name, module in quantized_modules(model):
        try:
            codes = tensors.pop(f"{name}.weight_int8")
            scale = tensors.pop(f"{name}.weight_scale")
            zero_point = tensors.pop(f"{name}.weight_zero_point")
        except KeyError:
            raise CheckpointError(f"{WEIGHTS_FILE}: no int8 weight for {name}") from None
        axis = tensors.pop(f"{name}.weight_axis", None)
        values = codes.float()
        if axis is None:
            weight = torch.quantize_per_tensor((values - float(zero_point)) * float(scale), float(scale), int(zero_point), torch.qint8)
        else:
            shape = [-1 if d == int(axis) else 1 for d in range(values.dim())]
            real = (values - zero_point.view(shape).float()) * scale.view(shape).float()
            weight = torch.quantize_per_channel(real, scale, zero_point, int(axis), torch.qint8)
        if not torch.equal(weight.int_repr(), codes):
            raise CheckpointError(f"{WEIGHTS_FILE}: int8 weight of {name} does not round-trip")
        module.set_weight_bias(weight, tensors.pop(f"{name}.bias", None))
    if tensors:
        raise CheckpointError(f"{WEIGHTS_FILE}: unexpected tensors {sorted(tensors)[:3]} for int8 layers")
