"""DEFT's per-neuron activation scales as they live in a model: folded into the weights, or kept beside the
activation (`ScaledActivation`), recorded in config.json, saved and loaded.

The scales are trained by `deftcompress.training.activation_scale` (`ActivationScales`); what is here changes the
structure of a model and is read by loading, saving and PEFT folding, so it sits below all of them.
A per-neuron scale s in the up-projection's rows and 1/s in the down-projection's columns leaves the block's
function unchanged (up to the activation's own scale behaviour), so the saved model is a stock checkpoint, or
keeps `ScaledActivation` where the weights cannot hold s (int8, 4-bit).
"""

from __future__ import annotations

import torch
from torch import nn

from deftcompress.architecture.locate import MLPBlock
from deftcompress.errors import DeftcompressError


def _plain_weight(module: nn.Module, where: str) -> tuple[nn.Module, list[nn.Linear], list[nn.Linear]]:
    """(base linear, LoRA A layers, LoRA B layers) of a plain or peft-LoRA-wrapped Linear."""
    base = getattr(module, "base_layer", module)
    if getattr(base, "weight", None) is None or base.weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise DeftcompressError(f"{where}: activation scales fold into float weights only (got {type(base).__name__}); "
                                "set activation_scale: false")
    if getattr(module, "lora_magnitude_vector", None):
        raise DeftcompressError(f"{where}: activation scales do not fold into DoRA layers; set activation_scale: false")
    lora_a = list(getattr(module, "lora_A", {}).values()) if hasattr(module, "lora_A") else []
    lora_b = list(getattr(module, "lora_B", {}).values()) if hasattr(module, "lora_B") else []
    return base, lora_a, lora_b


def scale_rows(module: nn.Module, s: torch.Tensor, where: str) -> None:
    base, _, lora_b = _plain_weight(module, where)
    base.weight.mul_(s.to(base.weight.dtype)[:, None])
    if base.bias is not None:
        base.bias.mul_(s.to(base.bias.dtype))
    for layer in lora_b:
        layer.weight.mul_(s.to(layer.weight.dtype)[:, None])


def scale_columns(module: nn.Module, inv: torch.Tensor, where: str) -> None:
    base, lora_a, _ = _plain_weight(module, where)
    base.weight.mul_(inv.to(base.weight.dtype)[None, :])
    for layer in lora_a:
        layer.weight.mul_(inv.to(layer.weight.dtype)[None, :])


FOLDS = ("weights", "activation", "module")
SCALED_ACT_ATTR = "deftcompress_activation_scales"  # config record: these layers carry a ScaledActivation


class ScaledActivation(nn.Module):
    """act(pre_scale * x) * inverse_scale, per neuron: DEFT's scales kept beside the activation, out of the weights.

    Without `pre_scale` the up-projection holds s (int8 after DEFT); with it no weight holds either
    (4-bit qlora bases). Zeros stay exactly where `act` makes them (1/s is finite and nonzero), so
    density is unchanged; the density meter and the ONNX export see this module in the activation's place.
    """

    def __init__(self, act: nn.Module, inverse_scale: torch.Tensor, pre_scale: torch.Tensor | None = None):
        super().__init__()
        self.act = act
        self.register_buffer("inverse_scale", inverse_scale.detach().clone())
        self.pre_scale: torch.Tensor | None
        if pre_scale is not None:
            self.register_buffer("pre_scale", pre_scale.detach().clone())
        else:
            self.pre_scale = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_scale is not None:
            x = x * self.pre_scale.to(x.dtype)
        return self.act(x) * self.inverse_scale.to(x.dtype)


def wrap_activation(model: nn.Module, block: MLPBlock, inverse_scale: torch.Tensor,
                    pre_scale: torch.Tensor | None = None) -> ScaledActivation:
    """Put a ScaledActivation in the place of `block`'s activation module (found by its full name in `model`)."""
    name = block.names["act"]
    wrapped = ScaledActivation(model.get_submodule(name), inverse_scale, pre_scale)
    model.set_submodule(name, wrapped)
    block.act = wrapped
    return wrapped


def record_scaled_activations(model: nn.Module, labels: list[str], pre_scale: bool) -> None:
    """Note in the model's config which MLPs carry a ScaledActivation, so a reload rebuilds them."""
    from deftcompress.architecture.locate import model_config

    # format 1 (no pre_scale key) is what int8 runs before qlora scales wrote: it still loads
    setattr(model_config(model), SCALED_ACT_ATTR, {"format": 2, "layers": list(labels), "pre_scale": pre_scale})


@torch.no_grad()
def load_scaled_activations(model: nn.Module, folder) -> int:
    """Rebuild the recorded ScaledActivation modules of a model transformers loaded, and read their scales from
    the checkpoint's safetensors files (transformers skips these keys). Returns how many were rebuilt."""
    from safetensors import safe_open

    count = wrap_recorded_activations(model)
    if not count:
        return 0
    buffers = {name: buf for name, buf in model.named_buffers() if name.endswith((".pre_scale", ".inverse_scale"))}
    found = set()
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if key in buffers:
                    buffers[key].copy_(f.get_tensor(key).to(buffers[key].device))
                    found.add(key)
    missing = sorted(set(buffers) - found)
    if missing:
        raise DeftcompressError(f"{folder}: the config records activation scales but {missing[0]} is not in its "
                                "weights")
    return count


def wrap_recorded_activations(model: nn.Module) -> int:
    """Rebuild the ScaledActivation modules a saved config records (scales 1; loading the weights sets them)."""
    from deftcompress.architecture.locate import mlp_blocks, model_config

    record = getattr(model_config(model), SCALED_ACT_ATTR, None)
    if not record:
        return 0
    wanted = set(record.get("layers", []))
    count = 0
    for block in mlp_blocks(model):
        if block.label in wanted and not isinstance(block.act, ScaledActivation):
            ones = torch.ones(int(block.down.in_features), device=next(block.down.parameters()).device)
            wrap_activation(model, block, ones, pre_scale=ones if record.get("pre_scale") else None)
            count += 1
    return count


SAVED_SCALES_FILE = "activation_scales.safetensors"


@torch.no_grad()
def apply_saved_scales(model: nn.Module, scales: dict[str, torch.Tensor]) -> str:
    """Put scales saved beside an adapter into a fresh copy of its base model (before attaching the adapter).

    Float weights take them (`weights` fold: a stock model); 4-bit weights cannot, so the activations
    carry both (`module` fold). Returns the fold used.
    """
    from deftcompress.architecture.locate import mlp_blocks

    blocks = mlp_blocks(model)
    where = "weights" if all(_is_float_linear(b.up) and _is_float_linear(b.down) for b in blocks) else "module"
    for b in blocks:
        key = f"{b.label}.scale"
        if key not in scales:
            raise DeftcompressError(f"{SAVED_SCALES_FILE}: no scale for MLP {b.label}; saved for another model?")
        s = scales[key].to(next(b.down.parameters()).device)
        if where == "weights":
            scale_rows(b.up, s, b.names.get("up", "up"))
            scale_columns(b.down, 1.0 / s, b.names.get("down", "down"))
        else:
            wrap_activation(model, b, 1.0 / s, pre_scale=s)
    if where == "module":
        record_scaled_activations(model, [b.label for b in blocks], pre_scale=True)
    return where


@torch.no_grad()
def fold_module_scales_into_weights(model: nn.Module, every: bool = False) -> int:
    """Where float weights now hold what 4-bit ones could not (a dequantized QLoRA model), move the `module`
    fold's scales into them (s into up rows, 1/s into down columns) and restore the bare activation, so the
    model is a stock checkpoint again. `every=True` folds the `activation` form's 1/s too (what int8 needs
    kept apart). Returns how many MLPs changed."""
    from deftcompress.architecture.locate import mlp_blocks, model_config

    changed = []
    for b in mlp_blocks(model):
        act = b.act
        if isinstance(act, ScaledActivation) and (every or act.pre_scale is not None) and _is_float_linear(b.up) \
                and _is_float_linear(b.down):
            if act.pre_scale is not None:
                scale_rows(b.up, act.pre_scale, b.names.get("up", "up"))
            scale_columns(b.down, act.inverse_scale, b.names.get("down", "down"))
            model.set_submodule(b.names["act"], act.act)
            b.act = act.act
            changed.append(b.label)
    config = model_config(model)
    record = getattr(config, SCALED_ACT_ATTR, None)
    if changed and record:
        left = [label for label in record.get("layers", []) if label not in changed]
        if left:
            record["layers"] = left
        else:
            delattr(config, SCALED_ACT_ATTR)
    return len(changed)


def _is_float_linear(module: nn.Module) -> bool:
    weight = getattr(getattr(module, "base_layer", module), "weight", None)
    return weight is not None and weight.dtype in (torch.float32, torch.float16, torch.bfloat16)
