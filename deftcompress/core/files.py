"""Writing files without following links or clobbering what is not ours (torch-free).

Every file deftcompress writes into a run or compare folder goes through `write_atomic`: the text
goes to a new temporary file beside the target (created with O_EXCL | O_NOFOLLOW, so a planted link
of that name is never followed), then the temporary file is renamed over the target (a rename
replaces a link at the target itself, never what it points to). A kill leaves either the old file or
the new one, never half of one.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def write_new_file(path: Path, data: bytes) -> None:
    """Create `path` with `data`: never through a link, never over an existing file (O_EXCL | O_NOFOLLOW)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write `data` (text is UTF-8) to a new temporary file beside `path`, then rename it over `path`.

    The rename replaces a link at `path` itself, never what it points to; the temporary file is
    created exclusively, so a planted link of that name is not followed either.
    """
    if isinstance(data, str):
        data = data.encode("utf-8")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        write_new_file(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
