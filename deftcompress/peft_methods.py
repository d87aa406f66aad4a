"""PEFT methods for training passes, through the real libraries.

- ``lora``, ``ia3``, ``prompt``, ``prefix``: peft (`get_peft_model`);
- ``qlora``: the base's Linear layers quantized to 4-bit nf4 in memory (`deftcompress.bnb`), then LoRA
  through peft's bitsandbytes layers;
- ``adapter``: the bottleneck adapter of AdapterHub's `adapters` (`SeqBnConfig`, Pfeiffer placement).

Shared by `deft` and later training passes (ADA-DEFT):

    wrapped = wrap_model(model, arch, task, PeftSettings(method="lora", r=8))
    ...train wrapped.model...
    save_adapter(wrapped.model, folder)        # the library's own format (+ head / trained biases)
    plain = merge(wrapped.model)               # lora / qlora / ia3 only
    save_for_reload(model, folder)             # whatever the model is: a folder that reloads
    model = load_saved_model(folder)           # inverse of save_for_reload

Heavy imports (peft, adapters, bitsandbytes) happen inside the functions.
"""

from __future__ import annotations

import copy
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from .architecture import ArchSpec, mlp_blocks
from .bnb import DEFAULT_SKIP, dequantize_linear_layers, dequantized_weight, is_bnb_linear, is_quantized, marked_as_quantized, \
    quantize_linear_layers, to_float_linear
from .errors import CheckpointError, DeftcompressError
from .tasks import TaskSpec

Method = Literal["lora", "qlora", "adapter", "prompt", "prefix", "ia3"]
METHODS: tuple[str, ...] = ("lora", "qlora", "adapter", "prompt", "prefix", "ia3")
MERGEABLE: tuple[str, ...] = ("lora", "qlora", "ia3")
MANIFEST = "deftcompress_model.json"
HEAD_NAMES = ("classifier", "score")  # classification heads that train with every method (as peft's SEQ_CLS does)


class PeftMethodError(DeftcompressError):
    """A PEFT method cannot be applied to this model as configured."""


@dataclass(frozen=True)
class PeftSettings:
    method: str = "lora"
    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None  # None: from the architecture table
    target_mlp_up: bool = True  # default targets include the MLP up-projection(s)
    reduction_factor: int = 16
    num_virtual_tokens: int = 20
    adapter_name: str | None = None  # None: peft's "default" (saved at the folder's top) / "deft" for adapters
    quantize_skip: tuple[str, ...] = DEFAULT_SKIP


@dataclass
class WrappedModel:
    model: nn.Module
    method: str
    library: Literal["peft", "adapters"]
    adapter_name: str
    target_modules: list[str] | None = None
    quantization: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


# ---- what a model is ---------------------------------------------------------------------------

def is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def is_adapters_model(model: nn.Module) -> bool:
    config = getattr(model, "adapters_config", None)
    return config is not None and len(getattr(config, "adapters", {}) or {}) > 0


def is_wrapped(model: nn.Module) -> bool:
    return is_peft_model(model) or is_adapters_model(model)


def base_transformers_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (adapters models are transformers models themselves)."""
    return model.get_base_model() if is_peft_model(model) else model


def _peft_task_type(arch: ArchSpec, task: TaskSpec):
    from peft import TaskType

    return TaskType.SEQ_2_SEQ_LM if arch.kind == "encoder_decoder" else TaskType.SEQ_CLS


def default_targets(arch: ArchSpec, method: str, include_mlp_up: bool) -> list[str]:
    """peft `target_modules` suffixes: LoRA on query/value (+ MLP up); IA3 on key/value (+ MLP up, output scaling)."""
    if method in ("lora", "qlora"):
        return arch.default_lora_targets(include_mlp_up)
    names: list[str] = []
    for stack in arch.stacks:
        for paths in (stack.attention.k, stack.attention.v):
            for p in paths:
                if p.rsplit(".", 1)[-1] not in names:
                    names.append(p.rsplit(".", 1)[-1])
        if include_mlp_up:
            for p in stack.mlp.up:  # the projection into the activation: IA3 scales the pre-activation per neuron
                short = ".".join(p.split(".")[-2:])
                if short not in names:
                    names.append(short)
    return names


# ---- wrapping ----------------------------------------------------------------------------------

def wrap_model(model: nn.Module, arch: ArchSpec, task: TaskSpec, settings: PeftSettings) -> WrappedModel:
    """Freeze `model` and add the PEFT method's trainable parameters; classification heads train too."""
    if settings.method not in METHODS:
        raise PeftMethodError(f"unknown PEFT method {settings.method!r} (known: {', '.join(METHODS)})")
    if is_wrapped(model):
        raise PeftMethodError("the model already carries a PEFT adapter; merge it first (merge: true on the earlier pass)")
    if settings.method == "adapter":
        return _wrap_adapters(model, arch, task, settings, settings.adapter_name or "deft")
    return _wrap_peft(model, arch, task, settings, settings.adapter_name or "default")


def _wrap_peft(model: nn.Module, arch: ArchSpec, task: TaskSpec, settings: PeftSettings, name: str) -> WrappedModel:
    import peft

    task_type = _peft_task_type(arch, task)
    method = settings.method
    targets = list(settings.target_modules) if settings.target_modules else None
    quantization = None
    notes: list[str] = []
    if method in ("lora", "qlora", "ia3"):
        targets = targets or default_targets(arch, method, settings.target_mlp_up)
        _check_targets(model, targets)
    if method in ("lora", "qlora"):
        config = peft.LoraConfig(task_type=task_type, r=settings.r, lora_alpha=settings.lora_alpha,
                                 lora_dropout=settings.lora_dropout, target_modules=targets)
    elif method == "ia3":
        config = peft.IA3Config(task_type=task_type, target_modules=targets, feedforward_modules=[])
    elif method == "prompt":
        config = peft.PromptTuningConfig(task_type=task_type, num_virtual_tokens=settings.num_virtual_tokens)
    else:
        config = peft.PrefixTuningConfig(task_type=task_type, num_virtual_tokens=settings.num_virtual_tokens)
    if method == "qlora":
        summary = quantize_linear_layers(model, bits=4, quant_type="nf4", skip=settings.quantize_skip)
        quantization = summary.to_dict()
        with marked_as_quantized(model, 4):
            wrapped = peft.get_peft_model(model, config, adapter_name=name)
    else:
        wrapped = peft.get_peft_model(model, config, adapter_name=name)
    if method == "prefix" and patch_prefix_classification(wrapped):
        notes.append("prefix tuning on a pooler-less classifier (RoBERTa): backbone cache output dropped so peft "
                     "classifies the sequence output")
    return WrappedModel(wrapped, method, "peft", name, targets, quantization, notes)


def _check_targets(model: nn.Module, targets: list[str]) -> None:
    names = [n for n, _ in model.named_modules()]
    if not any(n == t or n.endswith("." + t) for t in targets for n in names):
        raise PeftMethodError(f"target_modules {targets} match no module of {type(model).__name__}")


def _wrap_adapters(model: nn.Module, arch: ArchSpec, task: TaskSpec, settings: PeftSettings, name: str) -> WrappedModel:
    import adapters

    adapters.init(model)
    model.add_adapter(name, config=adapters.SeqBnConfig(reduction_factor=settings.reduction_factor))
    model.train_adapter(name)  # freezes everything but the adapter, and activates it
    for name in HEAD_NAMES:
        head = getattr(model, name, None)
        if isinstance(head, nn.Module) and arch.kind != "encoder_decoder":
            head.requires_grad_(True)
    return WrappedModel(model, "adapter", "adapters", name)


def patch_prefix_classification(model: nn.Module) -> bool:
    """Make peft prefix tuning classify correctly with pooler-less backbones (RoBERTa); True if patched.

    peft calls the backbone itself and takes output[1] as the pooled output. A backbone without a
    pooler returns (sequence, cache) there, and the classifier receives the cache. Dropping the cache
    from the backbone's output makes peft fall back to output[0], the sequence, which RoBERTa's
    classification head pools itself (first token).
    """
    backbone_name = getattr(model, "transformer_backbone_name", None)
    base = model.get_base_model() if is_peft_model(model) else None
    if backbone_name is None or base is None or "past_key_values" in inspect.signature(base.forward).parameters:
        return False
    backbone = base.get_submodule(backbone_name)
    if getattr(backbone, "pooler", None) is not None:
        return False

    def drop_cache(module, args, output):
        if getattr(output, "past_key_values", None) is None:
            return output
        return type(output)(last_hidden_state=output.last_hidden_state, hidden_states=output.hidden_states,
                            attentions=output.attentions)

    backbone._deftcompress_prefix_hook = backbone.register_forward_hook(drop_cache)
    return True


def enable_mlp_bias(model: nn.Module, arch: ArchSpec) -> list[tuple[str, nn.Parameter]]:
    """Make the bias of every MLP up-projection trainable (a per-neuron threshold); returns (canonical name, param)."""
    base = base_transformers_model(model)
    out = []
    for block in mlp_blocks(base, arch):
        layer = block.up.get_base_layer() if hasattr(block.up, "get_base_layer") else block.up
        bias = getattr(layer, "bias", None)
        if bias is None:
            raise PeftMethodError(f"train_mlp_bias: {block.names['up']} has no bias ({arch.family} MLPs are bias-free)")
        bias.requires_grad_(True)
        out.append((f"{block.names['up']}.bias", bias))
    return out


def trainable_parameter_count(model: nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


# ---- saving and loading ------------------------------------------------------------------------

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
        name = _adapters_name(model)
        model.save_adapter(str(folder), name, with_head=False, use_safetensors=True)
        head = {f"{n}.{k}": v.detach().cpu().contiguous() for n in HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module)
                for k, v in getattr(model, n).state_dict().items()}
        if head:
            save_file(head, str(folder / "head.safetensors"))
    else:
        raise PeftMethodError(f"{type(model).__name__} carries no adapter to save")
    if trained_biases:
        save_file({n: p.detach().cpu().contiguous() for n, p in trained_biases}, str(folder / "mlp_bias.safetensors"))
    return folder


def _adapters_name(model: nn.Module) -> str:
    names = list(model.adapters_config.adapters)
    return names[0]


def load_adapter_into(base: nn.Module, folder: str | Path, library: str, adapter_name: str | None = None) -> nn.Module:
    """Attach an adapter saved by `save_adapter` to a freshly loaded base model (inverse of `save_adapter`)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    from .activation_scale import SAVED_SCALES_FILE, apply_saved_scales

    if (folder / SAVED_SCALES_FILE).is_file():  # the adapter was trained on rescaled MLPs: rescale the base first
        apply_saved_scales(base, load_file(str(folder / SAVED_SCALES_FILE)))
    if (folder / "mlp_bias.safetensors").is_file():
        with torch.no_grad():
            for name, value in load_file(str(folder / "mlp_bias.safetensors")).items():
                base.get_parameter(name).copy_(value)
    if library == "peft":
        import peft

        model = peft.PeftModel.from_pretrained(base, str(folder), adapter_name=adapter_name or "default")
        if model.active_peft_config.peft_type == peft.PeftType.PREFIX_TUNING:
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


def merge(model: nn.Module) -> nn.Module:
    """Fold a LoRA / IA3 adapter into the base weights and return the plain transformers model.

    A QLoRA base stays 4-bit: peft dequantizes, adds the LoRA product and quantizes again (so the
    merged model differs from the adapter model by that rounding).
    """
    if not is_peft_model(model) or model.active_peft_config.is_prompt_learning:
        raise PeftMethodError("only LoRA, QLoRA and IA3 adapters can be merged into the weights")
    _unwrap_trained_heads(model)
    return model.merge_and_unload()


def _unwrap_trained_heads(model: nn.Module) -> None:
    """Replace peft's modules_to_save wrappers (the trained head) by the trained module, in place.

    peft's IA3 unload copies `.weight` from the wrapper and fails on heads that are not a single
    Linear (RoBERTa's classification head); with the wrappers gone, merge_and_unload has nothing to copy.
    """
    from peft.utils import ModulesToSaveWrapper

    for name, module in list(model.named_modules()):
        if isinstance(module, ModulesToSaveWrapper):
            parent_name, _, child = name.rpartition(".")
            trained = module.modules_to_save[module.active_adapters[0]]
            setattr(model.get_submodule(parent_name) if parent_name else model, child, trained)


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
                parent_name, _, child = name.rpartition(".")
                setattr(clone.get_submodule(parent_name) if parent_name else clone, child, to_float_linear(base, weight))
        _unwrap_trained_heads(clone)
        clone = clone.merge_and_unload()
    dequantize_linear_layers(clone)
    return clone


def _plain_base_copy(model: nn.Module) -> nn.Module:
    """A copy of the transformers model under a prompt-learning peft wrapper or an adapters model, adapter removed."""
    if is_peft_model(model):
        base = copy.deepcopy(model.get_base_model())
        _unwrap_trained_heads(base)  # keep the trained head, drop the wrapper
        for module in base.modules():  # the hook added by patch_prefix_classification is peft-specific
            handle = module.__dict__.pop("_deftcompress_prefix_hook", None)
            if handle is not None:
                handle.remove()
        return base
    base = copy.deepcopy(model)
    for name in list(base.adapters_config.adapters):
        base.delete_adapter(name)
    return base


def save_for_reload(model: nn.Module, folder: str | Path, auto_class: str | None = None) -> dict[str, Any]:
    """Save any model this toolkit produces so that it reloads (`load_saved_model`); returns the manifest.

    - plain model: `save_pretrained` (safetensors);
    - LoRA / IA3 / QLoRA (peft tuner) or a bitsandbytes-quantized model: merged, dequantized float32
      copy, loadable by transformers alone;
    - prompt / prefix (peft) and bottleneck adapters: `base/` (the frozen model with the trained head
      and biases) + `adapter/` (the library's format); transformers alone cannot run those.
    A `deftcompress_model.json` manifest says which, and how to load it.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    auto_class = auto_class or _auto_class_name(model)
    manifest: dict[str, Any] = {"auto_class": auto_class}
    if is_peft_model(model) and not model.active_peft_config.is_prompt_learning:
        merged_float_copy(model).save_pretrained(folder, safe_serialization=True)
        manifest.update(format="merged", method=str(model.active_peft_config.peft_type.value).lower(),
                        note="adapter folded into the weights (quantized layers dequantized to float32)",
                        load=f"transformers.{auto_class}.from_pretrained(folder)")
    elif is_wrapped(model):
        library = "peft" if is_peft_model(model) else "adapters"
        _plain_base_copy(model).save_pretrained(folder / "base", safe_serialization=True)
        save_adapter(model, folder / "adapter")
        name = model.active_adapter if library == "peft" else _adapters_name(model)
        manifest.update(format="base+adapter", library=library, adapter_name=name, base="base", adapter="adapter",
                        load="deftcompress.peft_methods.load_saved_model(folder)" + (
                            f" or peft.PeftModel.from_pretrained(transformers.{auto_class}.from_pretrained(folder/'base'), "
                            "folder/'adapter')" if library == "peft" else
                            f" or: m = transformers.{auto_class}.from_pretrained(folder/'base'); adapters.init(m); "
                            "m.load_adapter(folder/'adapter', set_active=True, use_safetensors=True)"))
    elif is_quantized(model):
        clone = copy.deepcopy(model)
        dequantize_linear_layers(clone)
        clone.save_pretrained(folder, safe_serialization=True)
        manifest.update(format="dequantized", note="bitsandbytes layers saved as their float32 values",
                        load=f"transformers.{auto_class}.from_pretrained(folder)")
    else:
        model.save_pretrained(folder, safe_serialization=True)
        manifest.update(format="plain", load=f"transformers.{auto_class}.from_pretrained(folder)")
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _auto_class_name(model: nn.Module) -> str:
    base = base_transformers_model(model)
    return "AutoModelForSeq2SeqLM" if getattr(base.config, "is_encoder_decoder", False) else "AutoModelForSequenceClassification"


def load_saved_model(folder: str | Path) -> nn.Module:
    """Load what `save_for_reload` wrote (a plain checkpoint folder works too)."""
    import transformers

    folder = Path(folder)
    manifest = json.loads((folder / MANIFEST).read_text()) if (folder / MANIFEST).is_file() else {}
    auto = getattr(transformers, manifest.get("auto_class", "AutoModelForSequenceClassification"))
    if manifest.get("format") != "base+adapter":
        return auto.from_pretrained(folder, use_safetensors=True).eval()
    base = auto.from_pretrained(folder / manifest["base"], use_safetensors=True)
    return load_adapter_into(base, folder / manifest["adapter"], manifest["library"], manifest.get("adapter_name"))


__all__ = ["METHODS", "MERGEABLE", "PeftSettings", "WrappedModel", "wrap_model", "enable_mlp_bias", "save_adapter",
           "load_adapter_into", "merge", "merged_float_copy", "save_for_reload", "load_saved_model", "is_wrapped",
           "is_peft_model", "is_adapters_model", "trainable_parameter_count", "default_targets"]
