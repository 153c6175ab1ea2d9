"""A compact set of input ids, for de-duplicating tens of millions of paths.

Each id is kept as a 96-bit BLAKE2b digest of its normalised path (12 bytes; chance of
any collision among 50 million ids about 1e-14), in a few sorted numpy arrays plus a
small Python set of recent ones, merged as they grow (a log-structured set). 50 million
ids take about 0.6 GB instead of the ~5 GB a Python set of strings would. Resuming a
partitioned input needs one only per unfinished partition (sscd_triton.client.job).
"""
from __future__ import annotations

import hashlib
import os
from typing import Iterable

import numpy as np

DIGEST = 12
_DTYPE = f"S{DIGEST}"


def storable(id_: str) -> str:
    """`id_` as valid UTF-8 text (what Parquet stores): a path that is not UTF-8 (read
    with surrogateescape) gets its odd bytes written as `\\xNN`."""
    try:
        id_.encode("utf-8")
        return id_
    except UnicodeEncodeError:
        try:
            raw = id_.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            raw = id_.encode("utf-8", "surrogatepass")
        return raw.decode("utf-8", "backslashreplace")


def digest(id_: str) -> bytes:
    """The key of an id: `./a.jpg`, `a.jpg` and its absolute path, `dir//x` and `dir/x`
    are the same input (a relative path is read from the working directory, so it names
    the file that absolute path names), and so are an input and its stored form
    (`storable`)."""
    norm = os.path.abspath(storable(id_))
    return hashlib.blake2b(norm.encode("utf-8"), digest_size=DIGEST).digest()


class IdSet:
    def __init__(self, buffer: int = 200_000):
        self._recent: set[bytes] = set()
        self._runs: list[np.ndarray] = []  # sorted, unique, decreasing sizes
        self._buffer = buffer
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def _in_runs(self, keys: np.ndarray) -> np.ndarray:
        found = np.zeros(len(keys), dtype=bool)
        for run in self._runs:
            pos = np.minimum(np.searchsorted(run, keys), len(run) - 1)
            found |= run[pos] == keys
        return found

    def _flush(self) -> None:
        run = np.unique(np.array(list(self._recent), dtype=_DTYPE))
        self._recent = set()
        # Merge with the previous runs while they are not much larger (logarithmic count).
        while self._runs and len(self._runs[-1]) <= 2 * len(run):
            run = np.union1d(self._runs.pop(), run)
        self._runs.append(run)

    def add_new(self, ids: Iterable[str]) -> list[bool]:
        """Add each id; for each, True when it was not in the set before (nor earlier in
        `ids`): the caller keeps those and drops the others as duplicates."""
        ids = list(ids)
        keys = [digest(i) for i in ids]
        fresh = [k not in self._recent for k in keys]
        # duplicates inside the batch itself
        seen_here: set[bytes] = set()
        for j, k in enumerate(keys):
            if fresh[j]:
                if k in seen_here:
                    fresh[j] = False
                seen_here.add(k)
        if self._runs and any(fresh):
            idx = [j for j, f in enumerate(fresh) if f]
            hit = self._in_runs(np.array([keys[j] for j in idx], dtype=_DTYPE))
            for j, h in zip(idx, hit):
                if h:
                    fresh[j] = False
        for j, k in enumerate(keys):
            if fresh[j]:
                self._recent.add(k)
                self._count += 1
        if len(self._recent) >= self._buffer:
            self._flush()
        return fresh

    def __contains__(self, id_: str) -> bool:
        k = digest(id_)
        return k in self._recent or bool(self._in_runs(np.array([k], dtype=_DTYPE))[0])
