"""An adapter that plain peft loads onto the base a DEFT pass started from, with no deftcompress import.

DEFT's activation scales (and trained MLP biases) change base weights: the up-projection rows take s
and the down-projection columns 1/s. The adapter in the library format (`passes/NN_deft/adapter/`)
was trained on those changed weights, so `PeftModel.from_pretrained(original_base, adapter_dir)` alone
computes something else; deftcompress applies `activation_scales.safetensors` first. This module
writes a second form, `adapter_plain_peft/`, that needs nothing but peft:

- the MLP up- and down-projections whose weights changed ride along as full layers (peft's
  `modules_to_save`), with any adapter on them merged in and scales that a `ScaledActivation` held
  folded into their float weights;
- every other adapter layer, prompt and head stays what it was (LoRA / IA3 layers, virtual tokens).

    base = AutoModelForSequenceClassification.from_pretrained(<base>, num_labels=2)
    model = PeftModel.from_pretrained(base, "runs/x/passes/01_deft/adapter_plain_peft")

The price is size: the full MLP layers (MiniLM: about 28 MB against about 0.3 MB for LoRA alone).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from torch import nn

from deftcompress.measurement.size import directory_bytes
from deftcompress.peft_methods.wrapping import PeftMethodError, is_peft_model

PLAIN_PEFT_DIR = "adapter_plain_peft"


def save_plain_peft_adapter(model: nn.Module, folder: str | Path, mlp_layer_names: list[str]) -> dict[str, Any]:
    """Write `model`'s adapter with the named base layers (full names in the transformers model) as
    `modules_to_save`; returns {dir, bytes, modules_to_save}. `model` is a peft model in float weights."""
    import peft
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    from deftcompress.peft_methods.saving import plain_base_copy
    from deftcompress.architecture.activation_scale import fold_module_scales_into_weights

    if not is_peft_model(model):
        raise PeftMethodError(f"{type(model).__name__}: a plain-peft adapter needs a peft model")
    work = copy.deepcopy(model)
    inner = work.get_base_model()
    fold_module_scales_into_weights(inner, every=True)  # plain peft knows no ScaledActivation
    for name in mlp_layer_names:
        layer = inner.get_submodule(name)
        if isinstance(layer, BaseTunerLayer):  # an adapter on a layer that travels whole: fold it in
            layer.merge()
            inner.set_submodule(name, layer.get_base_layer())
    config = copy.deepcopy(work.active_peft_config)
    if not config.is_prompt_learning:
        # full names: a suffix list like ["query", "value", "intermediate.dense"] would wrap the whole layers again
        config.target_modules = sorted(n for n, m in inner.named_modules() if isinstance(m, BaseTunerLayer))
    config.modules_to_save = list(dict.fromkeys(list(config.modules_to_save or []) + list(mlp_layer_names)))
    trained = get_peft_model_state_dict(work)
    base = plain_base_copy(work, head="trained")  # adapter layers removed; their weights are in `trained`
    plain = peft.get_peft_model(base, config)  # wraps copies of the changed MLP layers and the trained head
    rebuilt = get_peft_model_state_dict(plain)  # the whole MLP layers as copied, then the trained weights
    missing = sorted(set(trained) - set(rebuilt))
    if missing:
        raise PeftMethodError(f"plain-peft adapter: {missing[0]} found no place in the rebuilt adapter")
    set_peft_model_state_dict(plain, {**rebuilt, **trained})
    folder = Path(folder)
    plain.save_pretrained(folder, safe_serialization=True)
    return {"dir": folder.name, "bytes": directory_bytes(folder),
            "modules_to_save": len(mlp_layer_names)}
