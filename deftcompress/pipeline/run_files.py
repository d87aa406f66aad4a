"""The files a run wrote, with their digests: what resume may trust and what a run may delete.

Every commit records in `progress.json` each file the run wrote (path relative to the run folder,
size and sha256). Resume verifies the digests of what it reuses before trusting it; `--restart` and
the clean-up of an interrupted pass delete only what the record lists (or a folder the record names
as the one a running pass was writing), never by pattern, and never through a symbolic link: a run
folder holding a link, a fifo or a device is refused before anything is read or touched.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

from deftcompress.errors import DeftcompressError

CHUNK = 1 << 20


class RunFolderError(DeftcompressError):
    """The output folder is not one this program may write, trust or replace."""

    exit_code = 2


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _as_recorded(path: Path, entry: dict[str, Any]) -> bool:
    """The file still holds what the run recorded (size first: cheap; then the digest)."""
    return path.stat().st_size == entry["bytes"] and sha256_of(path) == entry["sha256"]


def first_odd_entry(folder: Path) -> tuple[Path, str] | None:
    """The first symbolic link or non-regular file under `folder` (never followed), with what it is; None if none."""
    for root, dirs, files in os.walk(folder, followlinks=False):
        for name in sorted(dirs) + sorted(files):
            path = Path(root) / name
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                return path, f"a symbolic link to {os.readlink(path)}"
            if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                return path, "not a regular file or folder"
    return None


def refuse_odd_entries(folder: Path) -> None:
    """A run writes only regular files and folders; anything else inside it was put there by someone else."""
    odd = first_odd_entry(folder)
    if odd is not None:
        path, what = odd
        raise RunFolderError(f"{path}: {what}; a run folder holds only what the run wrote (move the whole run "
                             "folder instead of linking parts of it), so nothing was touched")


def checked_relative(name: Any, where: str) -> PurePosixPath:
    """A recorded path: relative, inside the run folder, no `..` (a tampered record cannot point outside)."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise RunFolderError(f"{where}: a recorded path is not a file name ({str(name)[:60]!r})")
    rel = PurePosixPath(name)
    if rel.is_absolute() or ".." in rel.parts or rel.parts[0] in (".", ""):
        raise RunFolderError(f"{where}: a recorded path leaves the run folder ({name[:80]!r})")
    return rel


def record_files(folder: Path, tops: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file under the given top-level names of `folder` (files or folders)."""
    files: dict[str, dict[str, Any]] = {}
    for top in tops:
        start = folder / top
        if not start.exists():
            continue
        if start.is_dir():
            refuse_odd_entries(start)
        paths = [start] if start.is_file() else [Path(r) / f for r, _, fs in os.walk(start) for f in fs]
        for path in sorted(paths):
            rel = path.relative_to(folder).as_posix()
            files[rel] = {"bytes": path.stat().st_size, "sha256": sha256_of(path)}
    return files


def check_record(files: Any, where: str) -> dict[str, dict[str, Any]]:
    """The `files` record of a progress file, checked field by field (it may have been edited by hand)."""
    if not isinstance(files, dict):
        raise RunFolderError(f"{where}: files: not a mapping; use --restart to start this run again")
    for name, entry in files.items():
        checked_relative(name, where)
        if not (isinstance(entry, dict) and isinstance(entry.get("bytes"), int) and isinstance(entry.get("sha256"), str)
                and len(entry["sha256"]) == 64):
            raise RunFolderError(f"{where}: files: {name[:80]}: not a size and sha256; use --restart to start this run again")
    return files


def changed_file(folder: Path, files: dict[str, dict[str, Any]], under: Iterable[str]) -> str | None:
    """The first recorded file under one of `under` (relative prefixes) that is missing or differs, with why."""
    prefixes = tuple(under)
    for name, entry in sorted(files.items()):
        if not any(name == p or name.startswith(p.rstrip("/") + "/") for p in prefixes):
            continue
        path = folder / name
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return f"{name}: missing"
        if not stat.S_ISREG(mode):
            return f"{name}: no longer a regular file"
        if not _as_recorded(path, entry):
            return f"{name}: changed since the run wrote it (sha256 differs)"
    return None


def foreign_files(folder: Path, files: dict[str, dict[str, Any]], tops: Iterable[str]) -> list[str]:
    """Files under the given top-level names that the record does not list, or whose content differs."""
    found = []
    for top in tops:
        start = folder / top
        if not start.exists():
            continue
        paths = [start] if not start.is_dir() else [Path(r) / f for r, _, fs in os.walk(start) for f in fs]
        for path in sorted(paths):
            rel = path.relative_to(folder).as_posix()
            entry = files.get(rel)
            if entry is None or not _as_recorded(path, entry):
                found.append(rel)
    return found


def remove_recorded(folder: Path, files: dict[str, dict[str, Any]], names: Iterable[str]) -> None:
    """Delete the recorded files among `names` (those still as the run wrote them), then the folders they leave empty."""
    emptied: set[Path] = set()
    for name in names:
        entry = files.get(name)
        path = folder / checked_relative(name, "progress.json")
        if entry is None or not path.is_file() or path.is_symlink():
            continue
        if _as_recorded(path, entry):
            path.unlink()
            emptied.update(p for p in path.parents if p != folder and folder in p.parents)
    for directory in sorted(emptied, key=lambda p: len(p.parts), reverse=True):
        try:
            directory.rmdir()  # only when empty: a file the run did not write keeps its folder
        except OSError:
            pass


def remove_own_folder(folder: Path, rel: str) -> None:
    """Delete a folder the record names as one a running pass was writing (created by this run), without links."""
    path = folder / checked_relative(rel, "progress.json")
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_dir():
        raise RunFolderError(f"{path}: expected the folder an interrupted pass was writing, found something else; "
                             "nothing was touched")
    refuse_odd_entries(path)
    for root, dirs, names in os.walk(path, topdown=False):
        for name in names:
            os.unlink(Path(root) / name)
        for name in dirs:
            os.rmdir(Path(root) / name)
    path.rmdir()
