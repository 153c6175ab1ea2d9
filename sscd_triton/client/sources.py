"""Lazy enumeration of the inputs to embed: files, directories, globs, list files, stdin.

`iter_inputs(args)` yields `(id, problem)` pairs, one per input, without ever holding
the whole collection: `id` is the path as given (or joined onto the directory given),
`problem` is None or a sentence saying why the input cannot be read at all (a folder
that cannot be listed, a pattern that matched nothing). Rules:

- an existing directory is walked recursively: files with an image extension
  (`spec.IMAGE_EXTENSIONS`, any case) are inputs; other regular files are inputs when
  their first bytes are an image signature (JPEG, PNG, GIF, BMP, TIFF, WebP); a file
  that cannot even be opened to check is an input too (it then fails with the reason:
  reported, never silently dropped). A directory named like an image (`x.jpg/`) is
  itself an input (it fails: "is a directory") and is walked as well. Symbolic links
  are followed, each directory visited once; `exclude` folders (the output) are skipped.
- `@FILE`, or an existing `*.txt` / `*.lst` file: a list, one path per line.
- `-`: paths from standard input, one per line.
- an argument with glob characters that names no existing path: a pattern
  (`**` recursive; Python's glob follows links to folders, even in cycles: give the
  folder itself for a cycle-safe walk); each match is handled as if given alone.
- anything else: one input, as given (a missing file then fails with "no such file").
"""
from __future__ import annotations

import glob
import io
import os
import stat
import sys
from typing import Iterable, Iterator, TextIO

from sscd_triton import spec

LIST_SUFFIXES = (".txt", ".lst")
_EXTENSIONS = tuple(e.lower() for e in spec.IMAGE_EXTENSIONS)


def has_image_extension(path: str) -> bool:
    return path.lower().endswith(_EXTENSIONS)


def is_image_signature(head: bytes) -> bool:
    """True when `head` (a file's first 12+ bytes) starts like a supported image."""
    return (head.startswith(b"\xff\xd8\xff")  # JPEG
            or head.startswith(b"\x89PNG\r\n\x1a\n")
            or head[:6] in (b"GIF87a", b"GIF89a")
            or (head.startswith(b"BM") and len(head) >= 14)
            or head[:4] in (b"II*\x00", b"MM\x00*")  # TIFF
            or (head.startswith(b"RIFF") and head[8:12] == b"WEBP"))


def looks_complete(data: bytes) -> bool:
    """Whether an encoded image visibly ends where its format says it ends.

    Requests pad every row with zeros to the longest one, and zeros after a *truncated*
    file can let a decoder finish it (a JPEG cut to a third decodes once ~200 KB of zeros
    follow it). Files that fail this check are sent alone, unpadded, so the verdict is the
    one on their exact bytes, whatever their neighbours. Garbage fails it too, so it
    never costs a batch a split.
    """
    tail = data.rstrip(b"\x00")
    if data.startswith(b"\xff\xd8\xff"):
        return tail.endswith(b"\xff\xd9")
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return tail.endswith(b"IEND\xaeB`\x82")
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return tail.endswith(b";")
    if data.startswith(b"BM") and len(data) >= 14:
        declared = int.from_bytes(data[2:6], "little")
        return 26 <= declared <= len(data)
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return int.from_bytes(data[4:8], "little") + 8 <= len(data)
    return False  # TIFF (no end marker) or not an image: alone


def sniff(path: str) -> bool | None:
    """Whether the file at `path` starts with an image signature; None if unreadable."""
    try:
        with open(path, "rb") as f:
            return is_image_signature(f.read(16))
    except OSError:
        return None


def is_list_file(arg: str) -> bool:
    return arg.startswith("@") or (arg.lower().endswith(LIST_SUFFIXES) and os.path.isfile(arg))


def list_path(arg: str) -> str:
    return arg[1:] if arg.startswith("@") else arg


def check_args(args: Iterable[str]) -> list[str]:
    """Usage problems found before any work: missing list files, stdin named twice."""
    problems = []
    args = list(args)
    if args.count("-") > 1:
        problems.append("'-' (standard input) given more than once")
    for arg in args:
        if arg.startswith("@") and not os.path.isfile(list_path(arg)):
            problems.append(f"list file {list_path(arg)!r} does not exist")
    return problems


def _lines(stream: TextIO) -> Iterator[str]:
    for line in stream:
        line = line.rstrip("\r\n")
        if line.strip():
            yield line


def _key(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def walk(top: str, exclude: set[tuple[int, int]]) -> Iterator[tuple[str, str | None]]:
    """Inputs under directory `top`, lazily (files stream in directory order)."""
    seen: set[tuple[int, int]] = set()
    stack = [top]
    while stack:
        folder = stack.pop()
        try:
            st = os.stat(folder)
        except OSError as e:
            yield folder, f"cannot open the folder: {e.strerror.lower()}"
            continue
        if _key(st) in seen or _key(st) in exclude:
            continue
        seen.add(_key(st))
        subdirs = []
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    path = os.path.join(folder, entry.name)
                    try:
                        is_dir = entry.is_dir()
                        is_file = not is_dir and entry.is_file()
                    except OSError:
                        is_dir = is_file = False
                    if is_dir:
                        subdirs.append(path)
                        if has_image_extension(entry.name):
                            yield path, None  # fails as "a directory": reported, and walked
                    elif has_image_extension(entry.name):
                        yield path, None
                    elif is_file:
                        if sniff(path) is not False:  # an image, or unreadable: report it
                            yield path, None
                    elif entry.is_symlink() and sniff(path) is None:
                        yield path, None  # broken link without an extension: report it
        except OSError as e:
            yield folder, f"cannot list the folder: {e.strerror.lower()}"
        stack.extend(sorted(subdirs, reverse=True))


def _expand(arg: str, exclude) -> Iterator[tuple[str, str | None]]:
    if os.path.isdir(arg):
        yield from walk(arg, exclude)
    else:
        yield arg, None


def iter_inputs(args: Iterable[str], stdin: TextIO | None = None,
                exclude: Iterable[str] = ()) -> Iterator[tuple[str, str | None]]:
    """Every input named by `args`, lazily, as `(id, problem)` (see the module doc)."""
    excluded = set()
    for path in exclude:
        try:
            excluded.add(_key(os.stat(path)))
        except OSError:
            pass
    for arg in args:
        if arg == "-":
            if stdin is not None:
                yield from ((line, None) for line in _lines(stdin))
                continue
            # bytes as given, like list files: a non-UTF-8 path must not stop the run
            text = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="surrogateescape")
            try:
                for line in _lines(text):
                    yield line, None
            finally:
                text.detach()  # leave sys.stdin open
        elif is_list_file(arg):
            try:
                with open(list_path(arg), encoding="utf-8", errors="surrogateescape") as f:
                    for line in _lines(f):
                        yield line, None
            except OSError as e:
                yield arg, f"cannot read the list file: {e.strerror.lower()}"
        elif not os.path.lexists(arg) and glob.has_magic(arg):
            matched = False
            for match in glob.iglob(arg, recursive=True):
                matched = True
                yield from _expand(match, excluded)
            if not matched:
                yield arg, "the pattern matched no files"
        else:
            yield from _expand(arg, excluded)


def read_problem(path: str, max_bytes: int) -> tuple[bytes | None, str | None]:
    """Read a whole input file: `(data, None)`, or `(None, reason)` for a person."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            try:
                target = os.readlink(path)
            except OSError:
                target = "?"
            return None, f"broken symbolic link: its target {target!r} does not exist"
        return None, "no such file (it may have been moved or deleted since it was listed)"
    except PermissionError:
        return None, "permission denied: a folder on its path cannot be entered"
    except OSError as e:
        return None, f"cannot read the file: {e.strerror.lower()}"
    if stat.S_ISDIR(st.st_mode):
        return None, "it is a directory, not an image file"
    if not stat.S_ISREG(st.st_mode):
        return None, "it is not a regular file (a FIFO, socket or device)"
    if st.st_size > max_bytes:
        return None, (f"the file is too large: {st.st_size} bytes, over the limit of "
                      f"{max_bytes} (--max-file-bytes)")
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        return None, "the file vanished while it was being read"
    except PermissionError:
        return None, "permission denied: the file is not readable by this user"
    except OSError as e:
        return None, f"cannot read the file: {e.strerror.lower()}"
    if not data:
        return None, "the file is empty (0 bytes)"
    if len(data) > max_bytes:
        return None, (f"the file is too large: over the limit of {max_bytes} bytes "
                      "(--max-file-bytes)")
    return data, None
