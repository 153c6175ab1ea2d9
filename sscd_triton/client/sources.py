"""Lazy enumeration of the inputs to embed: files, directories, globs, list files, stdin.

`iter_inputs(args)` yields `(id, problem)` pairs, one per input, without ever holding
the whole collection. `problem` is None or a sentence saying why the input cannot be
embedded at all (a folder that cannot be listed, a pattern that matched nothing, a file
of a type that is not accepted). Ids: a file found on the file system (a file, folder or
glob argument) is named by `canonical`, its resolved absolute path, however it was
spelled (`dir`, `./dir`, `/abs/dir`, a symbolic link to it: one id); lines of list files
and stdin are kept as given. Rules:

- an existing directory is walked recursively and every file in it is an input: files
  with an image extension (`spec.IMAGE_EXTENSIONS`, any case), and other files whose
  first bytes are an image signature (JPEG, PNG, GIF, BMP, TIFF, WebP), are embedded;
  any other file comes with the problem `unaccepted` (recorded as a failure with that
  reason, never silently dropped); a file that cannot be opened to check, a FIFO or a
  broken link is an input that fails with its reason. A directory named like an image
  (`x.jpg/`) is itself an input (it fails: "is a directory") and is walked as well.
  Symbolic links are followed, each directory visited once; `exclude` folders (the
  output) are skipped.
- `@FILE`, or an existing `*.txt` / `*.lst` file: a list, one path per line.
- `-`: paths from standard input, one per line.
- an argument with glob characters that names no existing path: a pattern
  (`**` recursive; Python's glob follows links to folders, even in cycles: give the
  folder itself for a cycle-safe walk); each match is handled as if given alone.
- anything else: one input (its `canonical` id). A path that does not exist is a usage error
  (`check_args`: exit 2 before anything runs); one that vanishes later fails with "no
  such file".

Partitions (`iter_partitions`): when every argument is a listing (list files, `-`), the
inputs are cut into partitions of `size` consecutive lines of one listing. A partition's
key is stable across runs (the listing as named, and its number), its fingerprint is a
hash of its lines: a later run skips a finished partition after checking the fingerprint,
without reading its results.
"""
from __future__ import annotations

import glob
import hashlib
import itertools
import os
import re
import stat
import sys
from dataclasses import dataclass
from typing import Iterable, Iterator, TextIO

from sscd_triton import images, spec

LIST_SUFFIXES = (".txt", ".lst")
_EXTENSIONS = tuple(e.lower() for e in spec.IMAGE_EXTENSIONS)


def has_image_extension(path: str) -> bool:
    return path.lower().endswith(_EXTENSIONS)


def is_image_signature(head: bytes) -> bool:
    """True when `head` (a file's first 16 bytes) starts like a supported image."""
    return images.sniff_format(head) is not None


def sniff(path: str) -> bool | None:
    """Whether the file at `path` starts with an image signature; None if unreadable."""
    try:
        with open(path, "rb") as f:
            return is_image_signature(f.read(16))
    except OSError:
        return None


NOT_ACCEPTED = "not an accepted image type"


def file_type(path: str) -> str:
    """What the summary counts a file of a type not accepted under: its extension."""
    ext = os.path.splitext(os.path.basename(path))[1].lower()
    return ext or "no extension"


def unaccepted(path: str) -> str:
    """The problem of a file found in a folder that is not an accepted image."""
    return (f"{NOT_ACCEPTED} ({file_type(path)}): its first bytes are not those of "
            f"{', '.join(images.FORMATS)}")


def canonical(path: str) -> str:
    """The id of a file named on the file system: its resolved absolute path (symbolic
    links resolved), so that every spelling of a file is one id. A path that resolves
    to nothing (a broken link, a file gone) keeps its own absolute path, so that its
    failure names what was given."""
    real = os.path.realpath(path)
    return real if os.path.exists(real) else os.path.abspath(path)


def is_list_file(arg: str) -> bool:
    return arg.startswith("@") or (arg.lower().endswith(LIST_SUFFIXES) and os.path.isfile(arg))


def list_path(arg: str) -> str:
    return arg[1:] if arg.startswith("@") else arg


def check_args(args: Iterable[str]) -> list[str]:
    """Usage problems found before any work: missing or unreadable list files, inputs
    that do not exist (glob patterns aside), stdin named twice."""
    problems = []
    args = list(args)
    if args.count("-") > 1:
        problems.append("'-' (standard input) given more than once")
    for arg in args:
        if arg == "-":
            continue
        if arg.startswith("@"):
            if not os.path.isfile(list_path(arg)):
                problems.append(f"list file {list_path(arg)!r} does not exist")
            elif not os.access(list_path(arg), os.R_OK):
                problems.append(f"list file {list_path(arg)!r} is not readable")
        elif not os.path.lexists(arg) and not glob.has_magic(arg):
            problems.append(f"{arg}: no such file or directory")
    return problems


def is_listing(arg: str) -> bool:
    """A list file or standard input: inputs that can be cut into partitions."""
    return arg == "-" or is_list_file(arg)


@dataclass(eq=False)
class Partition:
    """`lines` [index * size, ...) of the listing `source` (a list file as named, or `-`)."""

    source: str
    index: int
    lines: list[str]
    size: int

    @property
    def key(self) -> str:
        if self.source == "-":
            slug = "stdin"
        else:
            name = re.sub(r"[^A-Za-z0-9_.]+", "_", os.path.basename(list_path(self.source)))[:40]
            # the file, not how it was typed: ./list.txt, list.txt and another working
            # directory name the same partitions (else a rerun would embed everything again)
            where = os.path.realpath(list_path(self.source))
            digest = hashlib.sha1(where.encode("utf-8", "surrogateescape")).hexdigest()
            slug = f"{name}.{digest[:8]}"
        return f"{slug}.{self.index:05d}"

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for line in self.lines:
            h.update(line.encode("utf-8", "surrogateescape") + b"\n")
        return h.hexdigest()[:32]

    def describe(self) -> str:
        start = self.index * self.size + 1
        name = "standard input" if self.source == "-" else list_path(self.source)
        return f"{name} lines {start}-{start + len(self.lines) - 1}"

    def marker(self) -> dict:
        """What the partition's done-marker records."""
        return {"source": self.source, "index": self.index, "size": self.size,
                "lines": len(self.lines), "fingerprint": self.fingerprint}


def _listing_lines(arg: str, stdin: TextIO | None) -> Iterator[str]:
    if arg == "-":
        if stdin is not None:
            yield from _lines(stdin)
            return
        # A reader of its own on fd 0, not sys.stdin.buffer: this runs on the enumerating
        # (daemon) thread, and a daemon blocked inside sys.stdin's buffer lock aborts the
        # interpreter at exit ("could not acquire lock for <stdin>", status 134).
        with open(sys.stdin.fileno(), encoding="utf-8", errors="surrogateescape",
                  closefd=False) as text:
            yield from _lines(text)
        return
    with open(list_path(arg), encoding="utf-8", errors="surrogateescape") as f:
        yield from _lines(f)


def iter_partitions(args: Iterable[str], size: int,
                    stdin: TextIO | None = None) -> Iterator[Partition]:
    """The listings `args` (every one `is_listing`) as partitions of `size` lines, lazily;
    a list file named twice (`@a.txt a.txt`) is read once."""
    named = {}
    for arg in args:
        named.setdefault(arg if arg == "-" else list_path(arg), arg)
    for arg in named.values():
        lines = _listing_lines(arg, stdin)
        for index in itertools.count():
            chunk = list(itertools.islice(lines, size))
            if not chunk:
                break
            yield Partition(arg, index, chunk, size)


def _lines(stream: TextIO) -> Iterator[str]:
    for line in stream:
        line = line.rstrip("\r\n")
        if line.strip():
            yield line


def _key(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def walk(top: str, exclude: set[tuple[int, int]],
         resolve: bool = True) -> Iterator[tuple[str, str | None]]:
    """Inputs under directory `top` (a `canonical` path), lazily (files stream in
    directory order); their ids are canonical too, with a path resolution only for
    symbolic links (`resolve` False: joined onto `top` as given, as older runs did)."""
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
                        link = entry.is_symlink()
                        is_dir = entry.is_dir()
                        is_file = not is_dir and entry.is_file()
                    except OSError:
                        link, is_dir, is_file = True, False, False
                    if link and resolve:
                        path = canonical(path)
                    if is_dir:
                        subdirs.append(path)
                        if has_image_extension(entry.name):
                            yield path, None  # fails as "a directory": reported, and walked
                    elif has_image_extension(entry.name) or not is_file:
                        yield path, None  # a FIFO, a broken link: fails with its reason
                    elif sniff(path) is False:
                        yield path, unaccepted(path)
                    else:  # an image, or unreadable: it fails with the reason
                        yield path, None
        except OSError as e:
            yield folder, f"cannot list the folder: {e.strerror.lower()}"
        stack.extend(sorted(subdirs, reverse=True))


def _expand(arg: str, exclude, resolve: bool) -> Iterator[tuple[str, str | None]]:
    if os.path.isdir(arg):
        yield from walk(os.path.realpath(arg) if resolve else arg, exclude, resolve)
    else:
        yield canonical(arg) if resolve else arg, None


def iter_inputs(args: Iterable[str], stdin: TextIO | None = None, exclude: Iterable[str] = (),
                resolve: bool = True) -> Iterator[tuple[str, str | None]]:
    """Every input named by `args`, lazily, as `(id, problem)` (see the module doc);
    `resolve` False: file ids as given, as before ids were resolved (--ray continuing an
    output of those, whose partitions are made of them)."""
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
            yield from ((line, None) for line in _listing_lines(arg, None))
        elif is_list_file(arg):
            try:
                yield from ((line, None) for line in _listing_lines(arg, None))
            except OSError as e:
                yield arg, f"cannot read the list file: {e.strerror.lower()}"
        elif not os.path.lexists(arg) and glob.has_magic(arg):
            matched = False
            for match in glob.iglob(arg, recursive=True):
                matched = True
                yield from _expand(match, excluded, resolve)
            if not matched:
                yield arg, "the pattern matched no files"
        else:
            yield from _expand(arg, excluded, resolve)


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
