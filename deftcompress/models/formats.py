"""Saving and loading any model a pass leaves, through one dispatcher keyed by a format name on disk.

Every folder written here carries `deftcompress_model.json`: ``{"format": <name>, "auto_class": ...,
"load": <how to load it without deftcompress, where possible>, ...}``. `save_model` picks the format
that describes the model in memory; `load_model` reads the name back and rebuilds the same kind of
model. Formats (each one's code lives with the library it concerns):

| format         | when                                   | on disk                                                    |
|----------------|----------------------------------------|------------------------------------------------------------|
| `plain`        | a float transformers model             | `save_pretrained` (safetensors)                            |
| `restructured` | float, with pruned widths or DEFT's    | the same, plus the record in config.json                   |
|                | 1/s kept after the activation          | (`deftcompress_layout`, `deftcompress_activation_scales`)  |
| `torch_int8`   | torch.ao dynamic int8 layers           | config.json + model.int8.safetensors (codes and scales)    |
| `bitsandbytes` | bitsandbytes 4-bit / 8-bit layers      | `save_pretrained` with a `quantization_config`             |
| `base_adapter` | an unmerged PEFT adapter on the model  | `base/` (any format above) + `adapter/` (library format)   |

`save_model(model, folder, merge_adapters=True)` (a run's final `model/`) folds LoRA / IA3 adapters
into float weights first (QLoRA bases dequantized: exact), so transformers alone loads the result;
bitsandbytes layers that no quantize pass asked for (a merged QLoRA base) are saved dequantized too;
`merge_adapters=False` (the state after a pass) keeps the adapter separate, so loading gives back
exactly the wrapped model that the next pass would have seen. DEFT's activation scales are folded
into the base weights before a pass hands the model on, so `base/` already holds them.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from deftcompress.core.model_refs import SAVED_MODEL_MANIFEST as MANIFEST
from deftcompress.errors import CheckpointError

FORMATS = ("plain", "restructured", "torch_int8", "bitsandbytes", "base_adapter")


def format_of(model: nn.Module) -> str:
    """The name of the format that describes `model` as it is in memory."""
    from deftcompress.architecture.layout import layout_of
    from deftcompress.peft_methods.wrapping import is_wrapped
    from deftcompress.quantization.bnb import is_quantized
    from deftcompress.quantization.torch_int8 import quantized_modules

    if is_wrapped(model):
        return "base_adapter"
    if quantized_modules(model):
        return "torch_int8"
    if is_quantized(model):
        return "bitsandbytes"
    from deftcompress.architecture.activation import needs_rebuild

    config = getattr(model, "config", None)
    if layout_of(model) is not None or getattr(config, "deftcompress_activation_scales", None) or needs_rebuild(config):
        return "restructured"
    return "plain"


def quantized_on_purpose(model: nn.Module) -> bool:
    """True when a quantize pass recorded the model's quantization (not a QLoRA training base)."""
    from deftcompress.quantization.torch_int8 import QUANT_ATTR

    return getattr(getattr(model, "config", None), QUANT_ATTR, None) is not None


def auto_class_name(model: nn.Module) -> str:
    from deftcompress.architecture import spec_for

    if spec_for(model).text_to_text:
        return "AutoModelForSeq2SeqLM"
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "AutoModelForCausalLM" if type(base).__name__.endswith("ForCausalLM") else "AutoModelForSequenceClassification"


def save_model(model: nn.Module, folder: str | os.PathLike, merge_adapters: bool = True, tokenizer: Any = None) -> dict[str, Any]:
    """Write `model` (and `tokenizer`, if given) to `folder` in its format; returns the manifest."""
    from deftcompress.peft_methods.wrapping import is_peft_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merged_from = None
    if merge_adapters and is_peft_model(model) and not model.active_peft_config.is_prompt_learning:
        from deftcompress.peft_methods.saving import merged_float_copy

        merged_from = str(model.active_peft_config.peft_type.value).lower()
        model = merged_float_copy(model)
    note = None
    if merge_adapters and format_of(model) == "bitsandbytes" and not quantized_on_purpose(model):
        # QLoRA's 4-bit base is a training device: the final model is its float32 value, as the user did not
        # ask for quantization (a quantize pass records that it did)
        from deftcompress.quantization.bnb import dequantize_linear_layers

        from deftcompress.architecture.activation_scale import fold_module_scales_into_weights

        model = copy.deepcopy(model)
        dequantize_linear_layers(model)
        fold_module_scales_into_weights(model)  # float weights hold what the 4-bit ones could not
        note = "bitsandbytes layers of a QLoRA base saved as their float32 values"
    name = format_of(model)
    manifest: dict[str, Any] = {"format": name, "auto_class": auto_class_name(model)}
    if note:
        manifest["note"] = note
    manifest.update(_SAVERS[name](model, folder, merge_adapters))
    if merged_from:
        manifest["merged_adapter"] = merged_from
        manifest["note"] = "adapter folded into the weights (quantized layers dequantized to float32)"
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a saved folder; a folder without one is a plain (or restructured) checkpoint."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return {"format": "plain"}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") not in FORMATS:
        got = manifest.get("format") if isinstance(manifest, dict) else manifest
        raise CheckpointError(f"{path}: unknown model format {got!r} (known: {', '.join(FORMATS)})")
    return manifest


def load_model(folder: str | os.PathLike, task=None, device="cpu", tokenizer_ref: str | None = None):
    """Load what `save_model` wrote: (model, tokenizer, arch). `task=None` keeps the saved heads."""
    from deftcompress.models.loading import load_model_and_tokenizer

    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest["format"] != "base_adapter":
        # plain, restructured, torch_int8 and bitsandbytes all describe themselves in config.json
        return load_model_and_tokenizer(str(folder), task, device, tokenizer_ref=tokenizer_ref)
    from deftcompress.peft_methods.saving import load_adapter_into

    # the tokenizer sits beside base/ and adapter/ (it may differ from the base's: e.g. its padding side)
    base, tokenizer, arch = load_model(folder / manifest["base"], task, device, tokenizer_ref=tokenizer_ref or str(folder))
    model = load_adapter_into(base, folder / manifest["adapter"], manifest["library"], manifest.get("adapter_name"))
    return model, tokenizer, arch


# ---- one saver per format -----------------------------------------------------------------------

def _save_pretrained(model: nn.Module, folder: Path, merge_adapters: bool) -> dict[str, Any]:
    model.save_pretrained(folder, safe_serialization=True)
    return {"load": f"transformers.{auto_class_name(model)}.from_pretrained(folder)"}


STOCK_REFUSES = ("deftcompress.load_model(folder); stock transformers refuses this folder (its config.json names the "
                 "model type {marked} and an activation after deftcompress) because it would build a model that "
                 "computes something else")


def refuse_stock_loading(folder: Path) -> dict[str, Any]:
    """Mark config.json so that stock `from_pretrained` refuses the folder loudly instead of silently dropping what
    it cannot build: an unknown model type naming deftcompress (Auto classes, pipeline()) and an MLP activation
    named after deftcompress (a concrete model class, which ignores the model type, fails building it). The
    replaced values are kept in config.json; `models.loading.load_config` reads the mark back."""
    from deftcompress.architecture import spec_for_model_type
    from deftcompress.core.model_refs import STOCK_REFUSED_PREFIX, unmarked_model_type
    from deftcompress.models.loading import STOCK_ACTIVATION, STOCK_VALUES_KEY

    path = folder / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    kept = dict(config.get(STOCK_VALUES_KEY) or {})
    # the family's activation field, and T5's activation derived from it (saved too, and read over it)
    for key in (spec_for_model_type(unmarked_model_type(config["model_type"])).activation_attr, "dense_act_fn"):
        if key and config.get(key) != STOCK_ACTIVATION and (key in config or key != "dense_act_fn"):
            kept[key] = config.get(key)
            config[key] = STOCK_ACTIVATION
    if kept:
        config[STOCK_VALUES_KEY] = kept
    if not config["model_type"].startswith(STOCK_REFUSED_PREFIX):
        config["model_type"] = STOCK_REFUSED_PREFIX + config["model_type"]
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return {"load": STOCK_REFUSES.format(marked=config["model_type"]), "stock_loading": "refused"}


def _save_restructured(model: nn.Module, folder: Path, merge_adapters: bool) -> dict[str, Any]:
    model.save_pretrained(folder, safe_serialization=True)  # the record rides in config.json
    return refuse_stock_loading(folder)


def _save_torch_int8(model: nn.Module, folder: Path, merge_adapters: bool) -> dict[str, Any]:
    from deftcompress.quantization.torch_int8 import QUANT_ATTR, quantized_modules, save_int8_checkpoint

    info = dict(getattr(model.config, QUANT_ATTR, None) or {"backend": "torch_int8"})
    info["modules"] = [name for name, _ in quantized_modules(model)]
    saved = save_int8_checkpoint(model, folder, info)
    return {"weights": saved, **refuse_stock_loading(folder)}


def _save_bitsandbytes(model: nn.Module, folder: Path, merge_adapters: bool) -> dict[str, Any]:
    from deftcompress.architecture.layout import layout_of
    from deftcompress.quantization.bnb import dequantize_linear_layers, quantization_config_for

    if layout_of(model) is not None:
        # transformers' bitsandbytes loader cannot build pruned widths: save what the layers compute with
        clone = copy.deepcopy(model)
        dequantize_linear_layers(clone)
        out = _save_restructured(clone, folder, merge_adapters)
        out["note"] = ("bitsandbytes layers saved as their float32 values: transformers cannot load pruned widths "
                       "into bitsandbytes layers")
        return out
    config = model.config
    had = "quantization_config" in vars(config)
    old = getattr(config, "quantization_config", None)
    config.quantization_config = quantization_config_for(model)  # from_pretrained reads packed weights back
    try:
        model.save_pretrained(folder, safe_serialization=True)
    finally:
        if had:
            config.quantization_config = old
        else:
            del config.quantization_config
    from deftcompress.models.loading import restructured

    if restructured(config):  # a relufied activation or DEFT's scales beside it: stock loading would drop them
        return refuse_stock_loading(folder)
    return {"load": f"transformers.{auto_class_name(model)}.from_pretrained(folder) (needs bitsandbytes)"}


def _save_base_adapter(model: nn.Module, folder: Path, merge_adapters: bool) -> dict[str, Any]:
    from deftcompress.peft_methods.saving import adapters_name, plain_base_copy, save_adapter
    from deftcompress.peft_methods.wrapping import is_peft_model

    library = "peft" if is_peft_model(model) else "adapters"
    # The state after a pass (merge_adapters=False) must reload exactly: the base keeps the head peft wrapped.
    base = plain_base_copy(model, head="trained" if merge_adapters else "original")
    base_manifest = save_model(base, folder / "base", merge_adapters=merge_adapters)
    save_adapter(model, folder / "adapter")
    name = model.active_adapter if library == "peft" else adapters_name(model)
    auto = auto_class_name(model)
    how = (f"peft.PeftModel.from_pretrained(transformers.{auto}.from_pretrained(folder/'base'), folder/'adapter')"
           if library == "peft" else
           f"m = transformers.{auto}.from_pretrained(folder/'base'); adapters.init(m); "
           "m.load_adapter(folder/'adapter', set_active=True, use_safetensors=True)")
    out = {"library": library, "adapter_name": name, "base": "base", "base_format": base_manifest["format"],
           "adapter": "adapter", "load": f"deftcompress.models.formats.load_model(folder), or {how}"}
    if base_manifest.get("stock_loading") == "refused":  # base/ needs deftcompress: so does the adapter on it
        out.update(load="deftcompress.models.formats.load_model(folder); stock transformers refuses base/ (see its "
                        "deftcompress_model.json)", stock_loading="refused")
    if merge_adapters:  # a final model/ that could not be merged: say why
        out["not_merged_because"] = _why_not_merged(model, library)
    return out


def _why_not_merged(model: nn.Module, library: str) -> str:
    if library == "adapters":
        return ("a bottleneck adapter is a small network of its own (down-projection, activation, up-projection) "
                "inserted after each layer: it has no weights to fold into")
    kind = str(model.active_peft_config.peft_type.value).lower()
    return (f"{kind} tuning adds trained virtual tokens at the input (or key/value prefixes): they are not a change "
            "of any weight, so nothing can be folded; load base/ and adapter/ with peft")


_SAVERS = {"plain": _save_pretrained, "restructured": _save_restructured, "torch_int8": _save_torch_int8,
           "bitsandbytes": _save_bitsandbytes, "base_adapter": _save_base_adapter}
