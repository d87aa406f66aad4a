"""Run folders: recognisably ours, never a user's folder, one writer at a time.

`apply` replaces its output folder with the new run's outputs. It only ever replaces a folder that
it created itself: every run folder carries a marker file (`.deftcompress-run`) from its creation,
and holds nothing but the outputs a run writes. Anything else (a source tree, a checkpoint, a data
folder, a run folder with a user's own files added) is refused with a one-line error before any
work starts. A lock file beside the run folder makes a second concurrent run into the same folder
fail at once instead of silently overwriting the first.
"""

from __future__ import annotations

import json
import os
import stat
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from deftcompress.core.files import write_atomic
from deftcompress.pipeline.run_files import RunFolderError, refuse_odd_entries

MARKER = ".deftcompress-run"
# What a run writes into its folder; anything else found there was put in by someone else.
RUN_ENTRIES = frozenset({MARKER, "progress.json", "report.json", "report.md", "density.png", "recipe.resolved.yaml", "model.partial",
                         "model", "passes", "state", "deploy", "deploy.partial"})


def is_run_entry(name: str) -> bool:
    """A file or folder a run writes (or a temporary one a killed atomic write left: `.<name>.tmp-<pid>`)."""
    return name in RUN_ENTRIES or (name.startswith(".") and ".tmp-" in name and name[1:].split(".tmp-")[0] in RUN_ENTRIES)


def is_run_folder(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def write_marker(folder: Path) -> None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("deftcompress")
    except PackageNotFoundError:  # running from a source tree that is not installed
        ours = "unknown"
    info = {"created_by": "deftcompress", "version": ours, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_atomic(folder / MARKER, json.dumps(info) + "\n")


def _inside(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
        return True
    except ValueError:
        return False


def check_output_dir(out: Path, protected: dict[str, Path]) -> None:
    """Refuse an output folder that is not ours to replace, or that holds the run's own inputs.

    `protected` maps a label ("model", "data") to an input path; the output folder may neither be
    that path nor contain it.
    """
    out_abs = Path(os.path.abspath(out))
    too_long = [part for part in out_abs.parts if len(part.encode()) > 255]
    if too_long:
        raise RunFolderError(f"{str(out)[:80]}...: a folder name of {len(too_long[0].encode())} bytes (at most 255)")
    ancestor = out_abs.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise RunFolderError(f"{out}: {ancestor} is a file, not a folder; choose another output folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise RunFolderError(f"{out}: {ancestor} is not writable; choose another output folder")
    resolved = out_abs.resolve()
    for label, path in protected.items():
        p = Path(path).resolve()
        if resolved == p or _inside(p, resolved):
            raise RunFolderError(f"{out}: output folder {'is' if resolved == p else 'contains'} the {label} "
                                 f"({path}); choose another output folder")
    if not out_abs.exists() and not out_abs.is_symlink():
        return
    if out_abs.is_symlink() or not out_abs.is_dir():
        raise RunFolderError(f"{out}: exists and is not a folder; choose another output folder")
    entries = sorted(p.name for p in out_abs.iterdir())
    if not entries:
        return  # an empty folder: nothing to lose
    if not is_run_folder(out_abs):
        raise RunFolderError(f"{out}: exists and is not a deftcompress run folder (no {MARKER} marker); refusing to "
                             "replace it: choose another output folder or empty it yourself")
    foreign = [e for e in entries if not is_run_entry(e)]
    if foreign:
        raise RunFolderError(f"{out}: run folder holds files a run did not write ({', '.join(foreign[:3])}); "
                             "move them out or choose another output folder")
    refuse_odd_entries(out_abs)  # a link inside would let a resume write or delete outside the run folder


@contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """An exclusive lock on `<parent>/.<name>.lock` for the whole run; a second run into `out` fails at once.

    Parent folders created for the lock are removed again if the run leaves them empty (it failed
    before writing anything).
    """
    created = []
    parent = Path(os.path.abspath(out)).parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _locked(out):
            yield
    finally:
        for folder in created:  # innermost first
            try:
                folder.rmdir()  # only if empty
            except OSError:
                break


@contextmanager
def _locked(out: Path) -> Iterator[None]:
    path = out.parent / f".{out.name}.lock"
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, as before
        yield
        return
    while True:
        try:  # never through a link: a planted lock link would have the PID written over its target
            fd = os.open(path, os.O_CREAT | os.O_RDWR | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as exc:
            raise RunFolderError(f"{path}: cannot use this lock file ({exc.strerror}); a lock must be a plain file "
                                 "that deftcompress created: remove it") from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
            os.close(fd)
            raise RunFolderError(f"{path}: not a plain lock file (a hard link or special file); remove it")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunFolderError(f"{out}: another deftcompress run is writing this folder (lock {path}); wait for it "
                                 "or choose another output folder") from None
        # The previous holder may have removed the file between our open and our lock: lock the live file.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        os.close(fd)


def usual_permissions(folder: Path) -> None:
    """Give what a run wrote the modes the user's umask gives new files (some writers, e.g. safetensors, use 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    for path in [folder, *folder.rglob("*")]:
        if path.is_symlink():
            continue
        try:
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)
        except OSError:  # a file another process just replaced: it gets its mode at the next commit
            pass
