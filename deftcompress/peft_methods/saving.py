"""Adapters on disk: each library's own format, and loading one back onto a freshly loaded base.

- peft (LoRA, QLoRA, IA3, prompt, prefix): adapter_config.json + adapter_model.safetensors (the trained
  head included, as modules_to_save); `peft.PeftModel.from_pretrained(base, folder)` loads it too;
- adapters (bottleneck): adapters' adapter_config.json + adapter.safetensors, and head.safetensors
  for the classification head;
- beside either: activation_scales.safetensors (DEFT's per-neuron scales the adapter was trained
  with; folded into the base before the adapter is attached) and mlp_bias.safetensors (trained MLP
  biases, keyed by base-model parameter name).

An adapter that needs those extras is wrong on the untouched base, so its folder must not look loadable
by its library alone: its `adapter_config.json` is kept as `deftcompress_adapter_config.json` (peft and
adapters then refuse the folder for want of their config) and a README.md says how to load it.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from deftcompress.architecture import spec_for
from deftcompress.errors import CheckpointError
from deftcompress.peft_methods.wrapping import PeftMethodError, is_adapters_model, is_peft_model, \
    patch_prefix_classification, unwrap_trained_heads
from deftcompress.quantization.bnb import dequantize_linear_layers, dequantized_weight, is_bnb_linear, to_float_linear
from deftcompress.architecture.activation_scale import fold_module_scales_into_weights


def save_adapter(model: nn.Module, folder: str | Path, trained_biases: list[tuple[str, nn.Parameter]] | None = None) -> Path:
    """Save the adapter in its library's own format under `folder`.

    peft: adapter_config.json + adapter_model.safetensors (the trained head included, as
    modules_to_save); load with `PeftModel.from_pretrained(base, folder)`.
    adapters: adapters' adapter_config.json + adapter.safetensors, and head.safetensors for the
    classification head; load with `adapters.init(base); base.load_adapter(folder, use_safetensors=True)`.
    Trained MLP biases (train_mlp_bias) go to mlp_bias.safetensors, keyed by base-model parameter name.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if is_peft_model(model):
        model.save_pretrained(folder, safe_serialization=True)
    elif is_adapters_model(model):
        name = adapters_name(model)
        model.save_adapter(str(folder), name, with_head=False, use_safetensors=True)
        heads = spec_for(model).trained_heads
        head = {f"{n}.{k}": v.detach().cpu().contiguous() for n in heads if isinstance(getattr(model, n, None), nn.Module)
                for k, v in getattr(model, n).state_dict().items()}
        if head:
            save_file(head, str(folder / "head.safetensors"))
    else:
        raise PeftMethodError(f"{type(model).__name__} carries no adapter to save")
    if trained_biases:
        save_file({n: p.detach().cpu().contiguous() for n, p in trained_biases}, str(folder / "mlp_bias.safetensors"))
    return folder


LIBRARY_CONFIG = "adapter_config.json"
OWN_CONFIG = "deftcompress_adapter_config.json"
_README = """# An adapter in deftcompress's own form

It was trained on MLP weights that DEFT changed (per-neuron activation scales and/or trained MLP biases,
saved beside it), so the library alone would attach it to the unchanged base and compute something else.
Its library config is therefore stored as `deftcompress_adapter_config.json`, and plain peft / adapters
refuse this folder. Load it with deftcompress (`deftcompress.load_model` on the run's `model/`, or
`deftcompress.peft_methods.saving.load_adapter_into(base, this_folder, library)`), or use the plain-peft
form beside it (`adapter_plain_peft/`) where the report names one.
"""


def hide_from_plain_loaders(folder: str | Path) -> None:
    """Keep the library's config under deftcompress's own name, so peft / adapters alone refuse the folder."""
    folder = Path(folder)
    if (folder / LIBRARY_CONFIG).is_file():
        (folder / LIBRARY_CONFIG).rename(folder / OWN_CONFIG)
    (folder / "README.md").write_text(_README)


def adapters_name(model: nn.Module) -> str:
    names = list(model.adapters_config.adapters)
    return names[0]


def load_adapter_into(base: nn.Module, folder: str | Path, library: str, adapter_name: str | None = None) -> nn.Module:
    """Attach an adapter saved by `save_adapter` to a freshly loaded base model (inverse of `save_adapter`)."""
    folder = Path(folder)
    if (folder / OWN_CONFIG).is_file() and not (folder / LIBRARY_CONFIG).is_file():
        import shutil
        import tempfile

        with tempfile.TemporaryDirectory(prefix="deftcompress-adapter-") as tmp:  # the library reads its own name
            copy_dir = Path(tmp) / folder.name
            shutil.copytree(folder, copy_dir)
            (copy_dir / OWN_CONFIG).rename(copy_dir / LIBRARY_CONFIG)
            return load_adapter_into(base, copy_dir, library, adapter_name)
    from safetensors.torch import load_file

    from deftcompress.architecture.activation_scale import SAVED_SCALES_FILE, apply_saved_scales

    if (folder / SAVED_SCALES_FILE).is_file():  # the adapter was trained on rescaled MLPs: rescale the base first
        apply_saved_scales(base, load_file(str(folder / SAVED_SCALES_FILE)))
    if (folder / "mlp_bias.safetensors").is_file():
        with torch.no_grad():
            for name, value in load_file(str(folder / "mlp_bias.safetensors")).items():
                base.get_parameter(name).copy_(value)
    if library == "peft":
        import peft

        model = peft.PeftModel.from_pretrained(base, str(folder), adapter_name=adapter_name or "default")
        if model.active_peft_config.peft_type == peft.PeftType.PREFIX_TUNING and \
                spec_for(base).prefix_tuning_drops_backbone_cache:
            patch_prefix_classification(model)
    else:
        import adapters

        adapters.init(base)
        base.load_adapter(str(folder), load_as=adapter_name or "deft", set_active=True, use_safetensors=True)
        if (folder / "head.safetensors").is_file():
            missing = base.load_state_dict(load_file(str(folder / "head.safetensors")), strict=False)
            if missing.unexpected_keys:
                raise CheckpointError(f"{folder}/head.safetensors: keys {missing.unexpected_keys[:3]} do not fit the model")
        model = base
    model.eval()
    return model


def merged_float_copy(model: nn.Module) -> nn.Module:
    """A float32 plain copy with LoRA / IA3 folded in; quantized bases are dequantized first (exact, no re-rounding)."""
    clone = copy.deepcopy(model)
    if is_peft_model(clone):
        from peft.tuners.lora import LoraLayer

        for name, module in list(clone.named_modules()):
            if isinstance(module, LoraLayer) and is_bnb_linear(module.get_base_layer()):
                base = module.get_base_layer()
                weight = dequantized_weight(base)
                for adapter in module.active_adapters:
                    weight = weight + module.get_delta_weight(adapter).float()
                clone.set_submodule(name, to_float_linear(base, weight))
        unwrap_trained_heads(clone)
        clone = clone.merge_and_unload()
    dequantize_linear_layers(clone)
    fold_module_scales_into_weights(clone)  # QLoRA-DEFT's scales sat beside the activation only for the 4-bit weights
    return clone


def plain_base_copy(model: nn.Module, head: str = "trained") -> nn.Module:
    """A copy of the transformers model under a peft wrapper or an adapters model, adapter removed (not merged).

    `head="trained"` keeps peft's trained classification head in the base (the base alone then
    classifies as trained); `head="original"` keeps the head peft wrapped, so base + adapter reload
    to exactly the wrapped model (the adapter holds the trained head).
    """
    if is_peft_model(model) and not model.active_peft_config.is_prompt_learning:
        clone = copy.deepcopy(model)
        unwrap_trained_heads(clone, keep=head)
        return clone.unload()  # LoRA / IA3 layers back to their base layers, deltas dropped
    if is_peft_model(model):
        base = copy.deepcopy(model.get_base_model())
        unwrap_trained_heads(base, keep=head)  # drop the wrapper
        for module in base.modules():  # the hook added by patch_prefix_classification is peft-specific
            handle = module.__dict__.pop("_deftcompress_prefix_hook", None)
            if handle is not None:
                handle.remove()
        return base
    base = copy.deepcopy(model)
    for name in list(base.adapters_config.adapters):
        base.delete_adapter(name)
    return base
