"""Writing files so that a reader never sees half of one, and refusing unwritable outputs
before any work is done. Every module that writes an artifact, a report or an output
shard goes through here.
"""
from __future__ import annotations

import os
import shutil
from typing import BinaryIO, Callable


class OutputError(ValueError):
    """An output path that cannot be written (the message names it and says why)."""


def _fsync_dir(folder: str) -> None:
    """Make a rename in `folder` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes | str | Callable[[BinaryIO], object],
                 durable: bool = False) -> str:
    """Write `data` (bytes, text, or a function writing into a binary file) to `path`
    through a temporary file in the same folder and a rename: `path` is either the old
    file or the complete new one, never a part. `durable`: fsync the file and the folder
    too (outputs a crash must not lose; artifacts that are simply rebuilt need not).
    Returns `path`; the temporary file is removed on failure."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # name the file the caller asked for, not the temporary one
        if e.filename in (None, tmp):
            e.filename = path
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    if durable:
        _fsync_dir(folder)
    return path


def writer_alive(pid: int) -> bool:
    """Whether process `pid`, which names a temporary file or folder it writes (a build's
    `.partial-PID`, a shared-memory region), still runs: another user's counts as running.
    The leftovers of one that does not are safe to remove."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: alive, another user's
        return True
    return True


def copy_atomic(source: str, dest: str) -> str:
    """Copy `source` to `dest` with `write_atomic`'s guarantee."""
    with open(source, "rb") as src:
        return write_atomic(dest, lambda f: shutil.copyfileobj(src, f))


def check_writable(path: str, flag: str = "", example: str = "") -> None:
    """Raise OutputError unless `path` can be written as a file: not a folder, its folder
    exists and is writable, an existing file is writable. `flag` (e.g. "--output") and
    `example` (a file name to suggest when `path` is a folder) make the message."""
    name = f"{flag} {path}".strip()
    parent = os.path.dirname(os.path.abspath(path)) or "."
    if os.path.isdir(path):
        hint = f"; give a file name such as {os.path.join(path, example)}" if example else ""
        raise OutputError(f"{name} is a directory{hint}")
    if not os.path.isdir(parent):
        raise OutputError(f"{name}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise OutputError(f"{name}: not writable")
