"""Converting a GGUF alias (``smollm2``) once into a float safetensors folder that every loader reads.

transformers reads GGUF files through the `gguf` package and dequantizes them to float. Doing that on every load
takes about 20 s for SmolLM2-135M, so the result (model and tokenizer) is saved once under the cache folder
(`core.model_refs.cache_dir()`, $DEFTCOMPRESS_CACHE or ~/.cache/deftcompress), written to a temporary folder
and renamed, so a killed conversion leaves nothing half-written that a later load would trust.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from deftcompress.core.model_refs import gguf_alias_of, gguf_source
from deftcompress.errors import CheckpointError


def materialise(ref: str) -> str:
    """`ref` itself; for a GGUF alias's folder that does not exist yet, convert the GGUF file into it first."""
    alias = gguf_alias_of(ref)
    folder = Path(ref)
    if alias is None or (folder / "config.json").is_file():
        return ref
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_source(alias)
    print(f"converting {source.name} (model alias {alias!r}) once into {folder}", file=sys.stderr)
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
        model.save_pretrained(work, safe_serialization=True)
        tokenizer.save_pretrained(work)
        vocab = work / "tokenizer.model"  # the slow tokenizer's file is the whole GGUF again; tokenizer.json suffices
        if vocab.is_file() and vocab.read_bytes()[:4] == b"GGUF" and (work / "tokenizer.json").is_file():
            vocab.unlink()
        work.chmod(0o755)  # mkdtemp makes it private; a model folder gets the usual modes
        if folder.exists():  # another process converted it meanwhile
            shutil.rmtree(work)
        else:
            work.rename(folder)
    except (OSError, ValueError, RuntimeError, KeyError, ImportError) as exc:
        shutil.rmtree(work, ignore_errors=True)
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise CheckpointError(f"model alias {alias!r}: converting {source.name} failed ({first})") from None
    return ref
