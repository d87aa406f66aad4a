"""Reaching the Hugging Face hub for data: fail in seconds, in one line, when it cannot be reached."""

from __future__ import annotations

import os

from deftcompress.errors import DataError


def check_hub_reachable(what: str, timeout: float = 3.0) -> None:
    """Fail in seconds, in one line, when data must come from the hub and the hub cannot be reached.

    Without this, `datasets` retries for over a minute before its own error. In offline mode
    (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) the local cache answers and nothing is checked.
    """
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("", "0"):
        return
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        raise DataError(f"{what}: no local data (set DEFTCOMPRESS_DATA_DIR or the recipe's data_dir) and the hub "
                        f"({host}) cannot be reached ({exc.strerror or type(exc).__name__})") from None
