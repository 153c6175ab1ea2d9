"""Nearest-neighbour search over SSCD descriptors with faiss: the engine of match.py and
dedup.py.

    queries = Embeddings.open("runs/queries")          # any embed.py output, or arrays
    refs = Embeddings.open("runs/references")
    result = topk(queries, refs, k=10)                 # exact inner product, streamed
    for q_ids, r_ids, scores in result: ...            # per query block: [n], [n, k], [n, k]

Similarity is the inner product (= cosine: descriptors are L2-normalised), higher is more
similar.

**Exact search (the default) is memory-bounded.** Queries are taken a block at a time
(`query_block` rows, gathered from whole shards); for each query block every reference
shard is read in turn (sliced to `reference_block` rows), searched with `faiss.knn`, and
merged into the block's running top-k. Memory is one query block, one reference block,
the block's top-k and the reference ids (strings; never the reference vectors), so a
reference set larger than RAM works. References are read once per query block (once for
most query sets: 65,536 queries by default).

**Approximate search** (`index="ivf"` or `"hnsw"`) holds every reference vector in RAM
(one faiss index over all of them: 2 KiB per 512-d descriptor, plus HNSW's graph), for
reference sets where exact search is too slow. `IndexIVFFlat` (inner product, `nlist`
≈ sqrt(N) lists, `nprobe` searched) or `IndexHNSWFlat(d, 32, inner product)`
(`ef_search`). Its recall@k against exact search is measured on a sample of queries and
reported (`Result.recall`).

**Score normalisation** (upstream's `--score_norm 1.0[0,2]`, `postprocess.ScoreNorm`):
with a background set B (held in RAM), a query's scores become
`q.r - beta * mean(top-(first..last) of q.B)`. The adjustment is computed by
`postprocess.score_normalization` (the same code as the library transform) for each
query block and added to that query's scores: the same numbers as searching the
extended vectors, without re-indexing the references. It never changes a query's own
ranking, only the global order and the thresholds.

Ranking is deterministic: by score descending, then by reference position (the order of
the reference shards), in blocked and unblocked search alike.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from sscd_triton.copydetect.postprocess import ScoreNorm, score_normalization

DEFAULT_K = 10
DEFAULT_QUERY_BLOCK = 65536
DEFAULT_REFERENCE_BLOCK = 65536
DEFAULT_NPROBE = 16
DEFAULT_EF_SEARCH = 128
DEFAULT_RECALL_SAMPLE = 1000
HNSW_M = 32
INDEXES = ("exact", "ivf", "hnsw")


class SearchInputError(ValueError):
    """Unusable input (missing, empty, mismatched dimensions): one line naming it."""


def _faiss():
    import faiss

    return faiss


# --- sources of descriptors -------------------------------------------------------------

class Embeddings:
    """A re-iterable set of descriptors: `blocks()` yields `(ids, float32 [n, d])` chunks.

    `Embeddings.open(path)` reads any embed.py output lazily (a Parquet folder shard by
    shard; an `.npz` is read whole once, as it is small by design);
    `Embeddings.from_arrays(ids, vectors)` wraps arrays already in memory."""

    def __init__(self, name: str, chunks: Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]):
        self.name = name
        self._chunks = chunks
        self._dims: int | None = None

    @classmethod
    def open(cls, path: str, name: str | None = None) -> "Embeddings":
        from sscd_triton.client import io

        name = name or path
        if not os.path.exists(path):
            if io.is_npz(path) and os.path.isdir(io.work_dir(path)):
                raise SearchInputError(f"{name} is not finished: rerun the embed.py command "
                                       f"that writes it")
            raise SearchInputError(f"{name}: no such file or folder")
        if io.is_npz(path) or os.path.isfile(path):
            try:
                with np.load(path, allow_pickle=False) as z:
                    ids, vectors = z["ids"], z["embeddings"]
            except Exception as e:  # not an npz, or not ours
                raise SearchInputError(f"{name}: not an embeddings .npz (arrays 'ids' and "
                                       f"'embeddings'): {e}") from None
            return cls.from_arrays(ids, vectors, name)
        try:
            manifest = io.read_manifest(path)
        except io.OutputError as e:
            raise SearchInputError(f"{name}: {e}") from None
        if manifest is None:
            raise SearchInputError(f"{name}: no {io.MANIFEST}; not an embeddings folder "
                                   f"written by embed.py")

        def chunks():
            try:
                yield from io.iter_shards(path)
            except io.OutputError as e:
                raise SearchInputError(str(e)) from None

        return cls(name, chunks)

    @classmethod
    def from_arrays(cls, ids, vectors, name: str = "embeddings") -> "Embeddings":
        vectors = np.asarray(vectors)
        if vectors.ndim != 2:
            raise SearchInputError(f"{name}: embeddings must be a 2-d array, got shape "
                                   f"{vectors.shape}")
        ids = np.asarray(ids).astype(object)
        if len(ids) != len(vectors):
            raise SearchInputError(f"{name}: {len(ids)} ids for {len(vectors)} embeddings")
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        out = cls(name, lambda: iter([(ids, vectors)]))
        if len(vectors):
            out._dims = vectors.shape[1]
        return out

    def blocks(self, rows: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Chunks of at most `rows` rows (the source's own chunks when None); empty
        chunks are skipped. SearchInputError when chunks differ in width."""
        for ids, vectors in self._chunks():
            vectors = np.ascontiguousarray(vectors, dtype=np.float32)
            if vectors.ndim != 2:
                raise SearchInputError(f"{self.name}: embeddings of shape {vectors.shape}")
            if len(vectors) == 0:
                continue
            if self._dims is None:
                self._dims = vectors.shape[1]
            elif vectors.shape[1] != self._dims:
                raise SearchInputError(f"{self.name}: shards of {self._dims} and "
                                       f"{vectors.shape[1]} dimensions")
            step = rows or max(len(vectors), 1)
            for start in range(0, len(vectors), step):
                yield ids[start:start + step], vectors[start:start + step]

    def gathered(self, rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Chunks of about `rows` rows: small shards gathered, large ones sliced."""
        ids_buf, vec_buf, n = [], [], 0
        for ids, vectors in self.blocks(rows):
            ids_buf.append(ids)
            vec_buf.append(vectors)
            n += len(ids)
            if n >= rows:
                yield np.concatenate(ids_buf), np.concatenate(vec_buf)
                ids_buf, vec_buf, n = [], [], 0
        if n:
            yield np.concatenate(ids_buf), np.concatenate(vec_buf)

    @property
    def dims(self) -> int:
        """Width of the descriptors (reads up to the first non-empty chunk if not known
        yet); SearchInputError when there are none."""
        if self._dims is None:
            for _ in self.blocks():
                break
        if self._dims is None:
            raise SearchInputError(f"{self.name}: empty (no embeddings)")
        return self._dims

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """Everything in memory: `(ids [n], float32 [n, d])`."""
        ids, vecs = [], []
        for i, v in self.blocks():
            ids.append(i)
            vecs.append(v)
        if not ids:
            raise SearchInputError(f"{self.name}: empty (no embeddings)")
        return np.concatenate(ids), np.concatenate(vecs)


def check_dims(*sources: Embeddings) -> int:
    """The common width of `sources`, or SearchInputError naming the mismatch."""
    dims = [(s.name, s.dims) for s in sources]
    if len({d for _, d in dims}) > 1:
        raise SearchInputError("descriptor dimensions differ: " +
                               ", ".join(f"{n} has {d}" for n, d in dims))
    return dims[0][1]


# --- top-k merging ----------------------------------------------------------------------

def merge_topk(scores: np.ndarray, index: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k best of `(scores, index)` [n, m]: by score descending, then index
    ascending; empty slots (index -1, score -inf) last. Returns `(scores, index)` [n, k]."""
    n, m = scores.shape
    # candidates are at most a few k wide (running top-k + one block's top-k): a full
    # lexicographic sort per row is cheap next to the search, and exact at ties
    tie_key = np.where(index < 0, np.iinfo(np.int64).max, index)
    order = np.lexsort((tie_key, -scores), axis=1)[:, :k]
    s = np.take_along_axis(scores, order, axis=1).astype(np.float32, copy=False)
    i = np.take_along_axis(index, order, axis=1)
    if s.shape[1] < k:
        pad = k - s.shape[1]
        s = np.concatenate([s, np.full((n, pad), -np.inf, np.float32)], axis=1)
        i = np.concatenate([i, np.full((n, pad), -1, np.int64)], axis=1)
    return s, i


def _knn(queries: np.ndarray, references: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product k-NN of one block: `(scores, positions)` [nq, k'],
    k' = min(k, len(references)), by score descending, then position.

    faiss keeps an arbitrary subset of the items tied at the k-th score; one more is
    asked for, and the rare rows where the (k+1)-th ties with the k-th are redone with
    numpy and a full sort, so a block's top-k (and the merge of blocks) is exact at ties
    (exact copies in a collection are such ties)."""
    faiss = _faiss()
    n = len(references)
    kk = min(k + 1, n)
    scores, idx = faiss.knn(queries, references, kk, metric=faiss.METRIC_INNER_PRODUCT)
    idx = idx.astype(np.int64)
    if kk > k:
        tied = np.nonzero(scores[:, k - 1] == scores[:, k])[0]
        for start in range(0, len(tied), 256):
            rows = tied[start:start + 256]
            full = queries[rows] @ references.T
            order = np.lexsort((np.broadcast_to(np.arange(n), full.shape), -full), axis=1)[:, :k]
            scores[rows, :k] = np.take_along_axis(full, order, axis=1)
            idx[rows, :k] = order
    return scores[:, :k], idx[:, :k]


# --- search -----------------------------------------------------------------------------

@dataclass
class Block:
    """One query block's result: row i holds query `query_ids[i]`'s neighbours,
    best first; `positions` are indices into `Result.reference_ids` (-1: empty slot,
    when there are fewer than k references)."""
    query_ids: np.ndarray
    scores: np.ndarray  # float32 [n, k]
    positions: np.ndarray  # int64 [n, k]
    query_offset: int  # position of query_ids[0] among all queries


@dataclass
class Result:
    """What `topk` found: iterate `blocks` once (they are computed on the way)."""
    blocks: Iterator[Block]
    reference_ids: np.ndarray  # filled as the references are read (complete after blocks)
    k: int
    index: str
    stats: dict = field(default_factory=dict)  # queries, references, dims, recall, seconds

    def __iter__(self):
        for b in self.blocks:  # empty slots (fewer than k references): id None
            ids = self.reference_ids[np.maximum(b.positions, 0)]
            yield b.query_ids, np.where(b.positions >= 0, ids, None), b.scores


class _RefIds:
    """The reference ids, collected on the first pass (later passes check the count)."""

    def __init__(self):
        self.chunks: list[np.ndarray] = []
        self.count = 0
        self.array = np.zeros(0, dtype=object)

    def finish(self) -> None:
        self.array = np.concatenate(self.chunks) if self.chunks else np.zeros(0, dtype=object)


def _exact_block(q: np.ndarray, refs: Embeddings, k: int, reference_block: int,
                 ref_ids: _RefIds | None) -> tuple[np.ndarray, np.ndarray, int]:
    """One query block against every reference block in turn: `(scores, positions,
    references read)`; the ids are collected into `ref_ids` when given (first pass)."""
    best_s = np.full((len(q), 0), -np.inf, np.float32)
    best_i = np.full((len(q), 0), -1, np.int64)
    offset = 0
    for ids, r in refs.blocks(reference_block):
        if ref_ids is not None:
            ref_ids.chunks.append(ids)
        s, i = _knn(q, r, k)
        best_s, best_i = merge_topk(np.concatenate([best_s, s], axis=1),
                                    np.concatenate([best_i, i + offset], axis=1), k)
        offset += len(r)
    return best_s, best_i, offset


def _adjustment(q: np.ndarray, background: np.ndarray | None, norm: ScoreNorm) -> np.ndarray | None:
    """Per query, the score-normalisation term added to every score ([n, 1])."""
    if background is None:
        return None
    extended, _ = score_normalization(q, np.zeros((0, q.shape[1]), np.float32), background, norm)
    return extended[:, -1:]


def build_index(vectors: np.ndarray, index: str, nlist: int | None = None,
                nprobe: int = DEFAULT_NPROBE, ef_search: int = DEFAULT_EF_SEARCH,
                seed: int = 0):
    """A faiss inner-product index over `vectors` (all in RAM): "ivf" (IndexIVFFlat,
    trained on up to 256 vectors per list) or "hnsw" (IndexHNSWFlat, M = 32)."""
    faiss = _faiss()
    n, d = vectors.shape
    if index == "hnsw":
        idx = faiss.IndexHNSWFlat(d, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        idx.hnsw.efSearch = ef_search
        idx.add(vectors)
        return idx
    if index != "ivf":
        raise ValueError(f"unknown index {index!r}; one of {', '.join(INDEXES)}")
    if nlist is None:  # sqrt(N) lists, at least 39 training points each (faiss's minimum)
        nlist = int(round(np.sqrt(n)))
        nlist = max(1, min(nlist, n // 39))
    nlist = max(1, min(nlist, n))
    quantizer = faiss.IndexFlatIP(d)
    idx = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(seed)
    sample = vectors if n <= 256 * nlist else vectors[np.sort(rng.choice(n, 256 * nlist, replace=False))]
    idx.cp.min_points_per_centroid = 1  # small sets: no warning, the lists are just coarse
    idx.train(sample)
    idx.add(vectors)
    idx.nprobe = min(nprobe, nlist)
    return idx


def _index_search(idx, q: np.ndarray, k: int, n_refs: int) -> tuple[np.ndarray, np.ndarray]:
    s, i = idx.search(q, min(k, n_refs))
    s = np.where(i < 0, -np.inf, s).astype(np.float32)
    return merge_topk(s, i.astype(np.int64), k)


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean over queries of |approx ∩ exact| / |exact| (positions [n, k]; -1 ignored)."""
    hits, total = 0, 0
    for a, e in zip(approx, exact):
        e = set(e[e >= 0].tolist())
        hits += len(e & set(a[a >= 0].tolist()))
        total += len(e)
    return hits / total if total else 1.0


def topk(queries: Embeddings, references: Embeddings, k: int = DEFAULT_K, *,
         index: str = "exact", background: np.ndarray | None = None,
         score_norm: ScoreNorm = ScoreNorm(), query_block: int = DEFAULT_QUERY_BLOCK,
         reference_block: int = DEFAULT_REFERENCE_BLOCK, nlist: int | None = None,
         nprobe: int = DEFAULT_NPROBE, ef_search: int = DEFAULT_EF_SEARCH,
         recall_sample: int = DEFAULT_RECALL_SAMPLE, exclude_self: bool = False,
         log: Callable[[str], None] = lambda m: None) -> Result:
    """The k nearest references of every query by inner product.

    Checks the inputs first (SearchInputError: empty sets, different widths, a
    background set too small for `score_norm`), then returns a `Result` whose blocks are
    computed as they are iterated. `exclude_self`: queries and references are the same
    collection in the same order (dedup); each query's own position is dropped (k + 1
    are searched). Approximate indexes load every reference into RAM and measure their
    recall@k against exact search on `recall_sample` queries of the first block
    (`Result.stats["recall"]`, set before the first block is yielded)."""
    if k < 1:
        raise SearchInputError(f"k must be at least 1, got {k}")
    if index not in INDEXES:
        raise SearchInputError(f"unknown index {index!r}; one of {', '.join(INDEXES)}")
    sources = [queries, references]
    if background is not None:
        background = np.ascontiguousarray(background, np.float32)
        if len(background) == 0:
            raise SearchInputError("background set is empty")
        if len(background) <= score_norm.last:
            raise SearchInputError(f"background set of {len(background)} descriptors; score "
                                   f"normalisation {score_norm.beta}[{score_norm.first},"
                                   f"{score_norm.last}] needs more than {score_norm.last}")
        sources.append(Embeddings.from_arrays(np.arange(len(background)), background,
                                              "background"))
    dims = check_dims(*sources)
    search_k = k + 1 if exclude_self else k
    ref_ids = _RefIds()
    stats: dict = {"dims": dims, "k": k, "index": index, "queries": 0}
    result = Result(iter(()), ref_ids.array, k, index, stats)

    idx = None
    ref_vectors = None
    if index != "exact":
        t = time.perf_counter()
        ids, ref_vectors = references.load()
        ref_ids.chunks, ref_ids.count = [ids], len(ids)
        ref_ids.finish()
        result.reference_ids = ref_ids.array
        log(f"building {index} index over {len(ids)} references")
        idx = build_index(ref_vectors, index, nlist=nlist, nprobe=nprobe, ef_search=ef_search)
        stats["index_seconds"] = time.perf_counter() - t
        if index == "ivf":
            stats["nlist"], stats["nprobe"] = idx.nlist, idx.nprobe
        else:
            stats["ef_search"] = idx.hnsw.efSearch
        stats["references"] = len(ids)

    def drop_self(s, i, offset):
        own = offset + np.arange(len(i))[:, None]
        mask = i == own
        # rows without their own position (ties at the top) drop the last one instead
        missing = ~mask.any(axis=1)
        mask[missing, -1] = True
        s = s[~mask].reshape(len(s), -1)
        i = i[~mask].reshape(len(i), -1)
        return s, i

    def blocks() -> Iterator[Block]:
        t0 = time.perf_counter()
        first_pass = True
        offset = 0
        for q_ids, q in queries.gathered(query_block):
            if idx is None:
                s, i, n_refs = _exact_block(q, references, search_k, reference_block,
                                            ref_ids if first_pass else None)
                if not first_pass and n_refs != ref_ids.count:
                    raise SearchInputError(f"{references.name} changed while being searched "
                                           f"({ref_ids.count}, then {n_refs} descriptors)")
                if first_pass:
                    ref_ids.count = n_refs
                    ref_ids.finish()
                    result.reference_ids = ref_ids.array
                    stats["references"] = ref_ids.count
                    if ref_ids.count == 0:
                        raise SearchInputError(f"{references.name}: empty (no embeddings)")
                first_pass = False
            else:
                s, i = _index_search(idx, q, search_k, len(ref_vectors))
                if "recall" not in stats and recall_sample > 0:
                    rng = np.random.default_rng(0)
                    pick = np.sort(rng.choice(len(q), min(recall_sample, len(q)), replace=False))
                    _, exact = merge_topk(*_knn(q[pick], ref_vectors, search_k), search_k)
                    stats["recall"] = recall_at_k(i[pick], exact)
                    stats["recall_queries"], stats["recall_k"] = len(pick), search_k
                    log(f"{index} recall@{search_k} against exact search on {len(pick)} "
                        f"queries: {stats['recall']:.4f}")
            if exclude_self:
                s, i = drop_self(s, i, offset)
            adj = _adjustment(q, background, score_norm)
            if adj is not None:
                s = np.where(i >= 0, s + adj, s)
            offset += len(q)
            stats["queries"] = offset
            log(f"searched {offset} queries against {stats['references']} references "
                f"({time.perf_counter() - t0:.1f} s)")
            yield Block(q_ids, s.astype(np.float32, copy=False), i, offset - len(q))
        stats["seconds"] = time.perf_counter() - t0
        if offset == 0:
            raise SearchInputError(f"{queries.name}: empty (no embeddings)")

    result.blocks = blocks()
    return result


def pairs(block: Block, threshold: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A block's (query position, reference position, score) triples, best first per
    query, empty slots and scores below `threshold` dropped."""
    keep = block.positions >= 0
    if threshold is not None:
        keep &= block.scores >= threshold
    rows, cols = np.nonzero(keep)
    return rows + block.query_offset, block.positions[rows, cols], block.scores[rows, cols]
