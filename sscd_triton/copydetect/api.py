"""Copy detection on descriptors as two calls, the library behind `sscd-match` and
`sscd-dedup` (also `from sscd_triton import find_copies, dedup`):

    copies = find_copies("runs/queries", "runs/references", k=10, threshold=0.75)
    dups = dedup("runs/photos")              # dups.pairs, dups.groups: pyarrow tables

Every collection argument is one of:
  - a path (str or os.PathLike): an output of `sscd-embed` (a Parquet folder or an .npz),
    read shard by shard;
  - a tuple `(ids, array)`: ids [n] (str, or anything turned into str), float [n, d];
  - a bare 2-d float array [n, d]: its ids are the row numbers as strings ("0", "1", ...);
  - a `search.Embeddings`.
Descriptors are compared by inner product (= cosine: SSCD descriptors are L2-normalised).
Bad input raises `search.SearchInputError` (a ValueError) naming the input and the reason.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np

from sscd_triton.copydetect import search
from sscd_triton.copydetect.dedup import (KEEP, connected_groups, groups_table, largest_keys,
                                          near_duplicate_pairs, pair_counts)
from sscd_triton.copydetect.postprocess import ScoreNorm

COPY_THRESHOLD = 0.75  # upstream: cosine > 0.75 = copy at ~90% precision (sscd_disc_mixup, DISC)
DEDUP_K = 20

SearchInputError = search.SearchInputError


def as_embeddings(source, name: str = "embeddings") -> search.Embeddings:
    """`source` (a path, `(ids, array)`, a 2-d array or an Embeddings) as a
    `search.Embeddings`; SearchInputError naming `name` when it is none of those."""
    if isinstance(source, search.Embeddings):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        return search.Embeddings.open(path, f"{name} {path}")
    if isinstance(source, tuple):
        if len(source) != 2:
            raise SearchInputError(f"{name}: a tuple must be (ids, array), got "
                                   f"{len(source)} items")
        ids, vectors = source
        ids = np.asarray(ids, dtype=object)
        if ids.ndim != 1:
            raise SearchInputError(f"{name}: ids must be 1-d, got shape {ids.shape}")
        ids = np.array([str(i) for i in ids], dtype=object)
        return search.Embeddings.from_arrays(ids, _vectors(vectors, name), name)
    if isinstance(source, (np.ndarray, list)) or hasattr(source, "__array__"):
        vectors = _vectors(source, name)
        ids = np.array([str(i) for i in range(len(vectors))], dtype=object)
        return search.Embeddings.from_arrays(ids, vectors, name)
    raise SearchInputError(f"{name}: expected a path to an sscd-embed output, (ids, array) "
                           f"or a 2-d array, got {type(source).__name__}")


def _vectors(array, name: str) -> np.ndarray:
    """A 2-d finite float32 array [n, d], or SearchInputError."""
    try:
        a = np.asarray(array)
    except Exception as e:  # ragged lists and the like
        raise SearchInputError(f"{name}: not an array ({e})") from None
    if a.ndim != 2:
        raise SearchInputError(f"{name}: embeddings must be a 2-d array [n, d], got shape "
                               f"{a.shape}")
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise SearchInputError(f"{name}: embeddings must be numbers, got dtype {a.dtype}")
    a = np.ascontiguousarray(a, dtype=np.float32)
    bad = ~np.isfinite(a).all(axis=1)
    if bad.any():
        raise SearchInputError(f"{name}: {int(bad.sum())} of {len(a)} rows hold NaN or "
                               f"infinite values (first: row {int(np.argmax(bad))})")
    return a


def check_threshold(threshold, name: str = "threshold", cosine: bool = False) -> None:
    """SearchInputError unless `threshold` is None or a finite number; with `cosine`, one
    in [-1, 1] too (the commands' guard against "75" meant as 75%: without score
    normalisation the scores are cosines; the library takes any, 1.5 keeping nothing)."""
    if threshold is None:
        return
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.number)) \
            or not math.isfinite(float(threshold)):
        raise SearchInputError(f"{name} must be a finite number, got {threshold!r}")
    if cosine and not -1 <= threshold <= 1:
        raise SearchInputError(f"{name} {threshold!r}: the scores are cosines, in [-1, 1] "
                               f"without a background set (upstream's copy threshold is "
                               f"{COPY_THRESHOLD})")


def _background(background, score_norm) -> tuple[np.ndarray | None, ScoreNorm]:
    norm = score_norm if isinstance(score_norm, ScoreNorm) else ScoreNorm.parse(
        score_norm or "1.0[0,2]")
    if background is None:
        return None, norm
    if isinstance(background, np.ndarray) and background.ndim == 2:
        return _vectors(background, "background"), norm
    return as_embeddings(background, "background").load()[1], norm


def _search(queries, references, k, exclude_self, background, score_norm, options):
    bg, norm = _background(background, score_norm)
    return search.topk(queries, references, k, background=bg, score_norm=norm,
                       exclude_self=exclude_self, **options)


def _table(columns: dict):
    import pyarrow as pa

    return pa.table({name: pa.array(values, type) for name, (values, type) in columns.items()})


def find_copies(queries, references, k: int = search.DEFAULT_K, threshold: float | None = None,
                *, background=None, score_norm: str | ScoreNorm = "1.0[0,2]", **options):
    """Each query's k nearest references scoring at least `threshold` (None: all k).

    `queries` [nq, d], `references` [nr, d]: any collection form (see the module).
    `background` (any form, [nb, d]) turns on upstream's score normalisation
    `score_norm` ("BETA[FIRST,LAST]"), which shifts the scores: calibrate `threshold` for
    it. `options` go to `search.topk` (index="ivf"|"hnsw", nprobe, ef_search,
    query_block, reference_block, log, ...).

    Returns a pyarrow Table with one row per (query, reference) kept, at most nq * k:
    `query_id` string, `reference_id` string, `score` float32 (inner product), `rank`
    int32 (1 = the query's best reference); queries in input order, each query's rows
    best first (score descending, then reference order). Queries with no reference above
    `threshold` have no row. Exact search streams (memory: a block of queries and of
    references); raises SearchInputError on bad input.
    """
    import pyarrow as pa

    check_threshold(threshold)
    q = as_embeddings(queries, "queries")
    r = as_embeddings(references, "references")
    result = _search(q, r, k, False, background, score_norm, options)
    q_ids, r_ids, scores, ranks = [], [], [], []
    for block in result.blocks:
        keep = block.positions >= 0  # search.pairs' selection, with the slot as rank
        if threshold is not None:
            keep &= block.scores >= threshold
        rows, slots = np.nonzero(keep)
        q_ids.append(block.query_ids[rows])
        r_ids.append(block.positions[rows, slots])
        scores.append(block.scores[rows, slots])
        ranks.append(slots + 1)
    ref_ids = result.reference_ids
    cat = (lambda xs, dtype: np.concatenate(xs) if xs else np.zeros(0, dtype))
    table = _table({"query_id": (cat(q_ids, object).tolist(), pa.string()),
                    "reference_id": (ref_ids[cat(r_ids, np.int64)].tolist(), pa.string()),
                    "score": (cat(scores, np.float32), pa.float32()),
                    "rank": (cat(ranks, np.int32).astype(np.int32), pa.int32())})
    return table


@dataclass(frozen=True)
class Duplicates:
    """What `dedup` found in a collection of `items` descriptors.

    `pairs`: pyarrow Table `id_a` string, `id_b` string, `score` float32: every
    near-duplicate pair once (id_a before id_b in collection order), best first.
    `groups`: pyarrow Table `group_id` int64, `id` string, `representative` string,
    `group_size` int64: one row per item in a group of two or more; groups numbered from
    0 by size, largest first; rows by group, then collection order. Keep the rows where
    id == representative to keep one per group.
    `unread`: with keep="largest", members whose image file could not be read (counted as
    0 pixels). `stats`: the search's (dims, index, recall, seconds, ...)."""
    pairs: object
    groups: object
    threshold: float
    k: int
    keep: str
    items: int
    unread: int = 0
    stats: dict = field(default_factory=dict, compare=False)

    @property
    def n_groups(self) -> int:
        return len(set(self.groups.column("group_id").to_pylist())) if len(self.groups) else 0

    @classmethod
    def empty(cls, threshold: float, k: int, keep: str, dims: int | None = None,
              index: str = "exact") -> "Duplicates":
        """What an empty collection has: no pairs, no groups."""
        import pyarrow as pa

        pairs = _table({"id_a": ([], pa.string()), "id_b": ([], pa.string()),
                        "score": ([], pa.float32())})
        groups = _table({"group_id": ([], pa.int64()), "id": ([], pa.string()),
                         "representative": ([], pa.string()), "group_size": ([], pa.int64())})
        return cls(pairs, groups, float(threshold), k, keep, 0, 0,
                   {"dims": dims or 0, "index": index})

    def removable(self) -> list[str]:
        """Ids in a group that are not its representative (what keeping one per group
        removes), in the groups' order."""
        g = self.groups.to_pydict()
        return [i for i, rep in zip(g["id"], g["representative"]) if i != rep]


def dedup(embeddings, threshold: float = COPY_THRESHOLD, k: int = DEDUP_K,
          keep: str = "largest", *, background=None,
          score_norm: str | ScoreNorm = "1.0[0,2]", **options) -> Duplicates:
    """Near-duplicate pairs and groups of one collection (any form, [n, d]).

    The collection is searched against itself (itself excluded): each item's `k`
    nearest items scoring at least `threshold` are its pairs; groups are the connected
    components of the pairs. `keep` picks each group's representative: "largest" (the
    largest image by the id's file header, then file size, then most pairs), "most-pairs"
    or "first"; ties go to the first in collection order. An item with more than k
    near-duplicates lists only k of them (groups stay complete where pairs connect them).
    `background`/`score_norm`/`options` as `find_copies`. Returns a `Duplicates`;
    raises SearchInputError on bad input.
    """
    import pyarrow as pa

    if keep not in KEEP:
        raise SearchInputError(f"keep={keep!r}: one of {', '.join(KEEP)}")
    if threshold is None:
        raise SearchInputError("threshold: dedup needs one (upstream's copy threshold is "
                               f"{COPY_THRESHOLD})")
    check_threshold(threshold)
    collection = as_embeddings(embeddings, "embeddings")
    result = _search(collection, collection, k, True, background, score_norm, options)
    a, b, s = near_duplicate_pairs(result, threshold)
    ids = result.reference_ids
    n = len(ids)
    labels = connected_groups(n, a, b)
    prefer, unread = None, 0
    if keep == "largest":
        keys, unread = largest_keys(ids, np.nonzero(labels >= 0)[0])
        prefer = keys + [pair_counts(n, a, b)]
    elif keep == "first":
        prefer = []
    g = groups_table(labels, a, b, prefer)
    pairs = _table({"id_a": (ids[a].tolist(), pa.string()),
                    "id_b": (ids[b].tolist(), pa.string()),
                    "score": (s.astype(np.float32), pa.float32())})
    groups = _table({"group_id": (g["group_id"].astype(np.int64), pa.int64()),
                     "id": (ids[g["member"]].tolist(), pa.string()),
                     "representative": (ids[g["representative"]].tolist(), pa.string()),
                     "group_size": (g["size"].astype(np.int64), pa.int64())})
    return Duplicates(pairs, groups, float(threshold), k, keep, n, unread, dict(result.stats))
