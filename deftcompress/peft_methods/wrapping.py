"""PEFT methods for training passes, through the real libraries.

- ``lora``, ``ia3``, ``prompt``, ``prefix``: peft (`get_peft_model`);
- ``qlora``: the base's Linear layers quantized to 4-bit nf4 in memory (`deftcompress.quantization.bnb`), then LoRA
  through peft's bitsandbytes layers;
- ``adapter``: the bottleneck adapter of AdapterHub's `adapters` (`SeqBnConfig`, Pfeiffer placement).

Shared by `deft` and later training passes (ADA-DEFT):

    wrapped = wrap_model(model, arch, task, PeftSettings(method="lora", r=8))
    ...train wrapped.model...
    plain = merge(wrapped.model)               # lora / qlora / ia3 only

Saving an adapter and loading it back: `deftcompress.peft_methods.saving`.

Heavy imports (peft, adapters, bitsandbytes) happen inside the functions.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from deftcompress.architecture import ArchSpec, mlp_blocks
from deftcompress.data.tasks import TaskSpec
from deftcompress.errors import DeftcompressError
from deftcompress.quantization.bnb import marked_as_quantized, quantize_linear_layers
from deftcompress.peft_methods.settings import MERGEABLE, METHODS, PeftSettings  # noqa: F401  (torch-free)


class PeftMethodError(DeftcompressError):
    """A PEFT method cannot be applied to this model as configured."""


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

    if task.kind == "language_modeling":
        return TaskType.CAUSAL_LM
    return TaskType.SEQ_2_SEQ_LM if arch.text_to_text else TaskType.SEQ_CLS


def default_targets(arch: ArchSpec, method: str, include_mlp_up: bool) -> list[str]:
    """peft `target_modules` suffixes from the architecture table: LoRA on query/value, IA3 on key/value (+ MLP up)."""
    if method in ("lora", "qlora"):
        return arch.default_lora_targets(include_mlp_up)
    return arch.default_ia3_targets(include_mlp_up)


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
    if method == "prefix" and arch.prefix_tuning_drops_backbone_cache and patch_prefix_classification(wrapped):
        notes.append(f"prefix tuning on a pooler-less {arch.family} classifier: backbone cache output dropped so peft "
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
    for head_name in arch.trained_heads:  # peft trains these as modules_to_save; adapters needs telling
        head = getattr(model, head_name, None)
        if isinstance(head, nn.Module):
            head.requires_grad_(True)
    return WrappedModel(model, "adapter", "adapters", name)


def patch_prefix_classification(model: nn.Module) -> bool:
    """Make peft prefix tuning classify correctly with pooler-less backbones; True if patched.

    For families whose record sets `prefix_tuning_drops_backbone_cache` (RoBERTa).

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


def merge(model: nn.Module) -> nn.Module:
    """Fold a LoRA / IA3 adapter into the base weights and return the plain transformers model.

    A QLoRA base stays 4-bit: peft dequantizes, adds the LoRA product and quantizes again (so the
    merged model differs from the adapter model by that rounding).
    """
    if not is_peft_model(model) or model.active_peft_config.is_prompt_learning:
        raise PeftMethodError("only LoRA, QLoRA and IA3 adapters can be merged into the weights")
    unwrap_trained_heads(model)
    return model.merge_and_unload()


def unwrap_trained_heads(model: nn.Module, keep: Literal["trained", "original"] = "trained") -> None:
    """Replace peft's modules_to_save wrappers by the trained head (or the original one), in place.

    peft's IA3 unload copies `.weight` from the wrapper and fails on heads that are not a single
    Linear (RoBERTa's classification head); with the wrappers gone, merge_and_unload has nothing to copy.
    `keep="original"` gives the base exactly as peft found it (the adapter holds the trained head).
    """
    from peft.utils import ModulesToSaveWrapper

    for name, module in list(model.named_modules()):
        if isinstance(module, ModulesToSaveWrapper):
            head = module.modules_to_save[module.active_adapters[0]] if keep == "trained" else module.original_module
            model.set_submodule(name, head)
