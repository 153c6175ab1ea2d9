"""Descriptor postprocessing as upstream SSCD evaluates it (numpy only).

Both transforms are fitted on a *training* set of descriptors from the target
distribution (never on the queries or references being scored):

    c = Centering.fit(train);      q, r = c(q), c(r)         # subtract mean, re-L2
    w = PCAWhitening.fit(train);   q, r = w(q), w(r)         # upstream "PCAW<d>,L2norm"
    q2, r2 = score_normalization(q, r, background=train)     # upstream "1.0[0,2]"
    scores = q2 @ r2.T   # = q.r - beta * mean(similarity of q to its neighbours first..last in B)

`PCAWhitening` matches faiss `PCAMatrix(d_in, d_out, eigen_power=-0.5)` as upstream's
`index_factory("PCAW<d>,L2norm,Flat")` builds it: centre on the training mean, project
on the leading eigenvectors of the training covariance, divide each component by the
square root of its eigenvalue, then L2-normalise. Score normalisation appends
`-beta * mean(top-(first..last) inner products with the background set)` to each query
and a 1 to each reference (`first`, `last` inclusive, as upstream's disc_eval.py).

Fitted transforms are saved as a params file (`save_params` / `load_params`, what
`sscd-postprocess fit` writes): arrays `method`, `mean` [d_in], `matrix` [d_in, d_out]
(identity for centering) and `provenance` (JSON: samples, source, source model identity).
`Postprocess` is the one form both methods share, `l2_normalize((x - mean) @ matrix)`,
which `apply_embeddings` streams over an embeddings output a shard at a time and
`sscd_triton.serving.postprocess_graph` appends to the served ONNX.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


@dataclass
class Centering:
    mean: np.ndarray

    @classmethod
    def fit(cls, train: np.ndarray) -> "Centering":
        return cls(np.asarray(train, np.float64).mean(axis=0).astype(np.float32))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return l2_normalize(np.asarray(x, np.float32) - self.mean)


@dataclass
class PCAWhitening:
    mean: np.ndarray  # [d_in]
    projection: np.ndarray  # [d_in, d_out]: eigenvectors scaled by eigenvalue ** -0.5

    @classmethod
    def fit(cls, train: np.ndarray, dims: int | None = None, eps: float = 1e-12) -> "PCAWhitening":
        x = np.asarray(train, np.float64)
        dims = dims or x.shape[1]
        if not 1 <= dims <= x.shape[1]:
            raise ValueError(f"PCAW{dims}: must be between 1 and {x.shape[1]}")
        mean = x.mean(axis=0)
        cov = (x - mean).T @ (x - mean) / len(x)
        return cls.from_moments(mean, cov, dims, eps)

    @classmethod
    def from_moments(cls, mean: np.ndarray, cov: np.ndarray, dims: int | None = None,
                     eps: float = 1e-12) -> "PCAWhitening":
        """From a training set's mean [d] and covariance [d, d] (see `Moments`)."""
        mean, cov = np.asarray(mean, np.float64), np.asarray(cov, np.float64)
        dims = dims or cov.shape[1]
        if not 1 <= dims <= cov.shape[1]:
            raise ValueError(f"PCAW{dims}: must be between 1 and {cov.shape[1]}")
        values, vectors = np.linalg.eigh(cov)  # ascending
        order = np.argsort(values)[::-1][:dims]
        values = np.maximum(values[order], eps * max(values.max(), eps))
        projection = vectors[:, order] / np.sqrt(values)
        return cls(mean.astype(np.float32), projection.astype(np.float32))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return l2_normalize((np.asarray(x, np.float32) - self.mean) @ self.projection)


@dataclass(frozen=True)
class ScoreNorm:
    beta: float = 1.0
    first: int = 0
    last: int = 2

    @classmethod
    def parse(cls, text: str) -> "ScoreNorm":
        """`"1.0[0,2]"` (upstream's --score_norm format; `"1.0[3]"` means [3,3])."""
        m = re.fullmatch(r"\s*([-+0-9.eE]+)\[(\d+)(?:,(\d+))?\]\s*", text)
        if not m:
            raise ValueError(f"score normalisation {text!r}: expected BETA[FIRST,LAST]")
        first = int(m.group(2))
        last = int(m.group(3)) if m.group(3) is not None else first
        if last < first:
            raise ValueError(f"score normalisation {text!r}: LAST < FIRST")
        return cls(float(m.group(1)), first, last)


def score_normalization(queries: np.ndarray, references: np.ndarray, background: np.ndarray,
                        norm: ScoreNorm = ScoreNorm()) -> tuple[np.ndarray, np.ndarray]:
    """Queries and references extended by one column so that inner products become
    `q.r - beta * mean(sorted q.B, ranks first..last)`. Changes the global ranking
    (and thresholds) of (query, reference) pairs, never a query's own ranking."""
    q = np.asarray(queries, np.float32)
    b = np.asarray(background, np.float32)
    if norm.last >= len(b):
        raise ValueError(f"background set of {len(b)} descriptors; rank {norm.last} needed")
    sims = q @ b.T
    k = norm.last + 1
    top = -np.sort(-np.partition(sims, -k, axis=1)[:, -k:], axis=1)  # k largest, descending
    adjustment = -norm.beta * top[:, norm.first:norm.last + 1].mean(axis=1, keepdims=True)
    r = np.asarray(references, np.float32)
    return (np.concatenate([q, adjustment.astype(np.float32)], axis=1),
            np.concatenate([r, np.ones((len(r), 1), np.float32)], axis=1))


# --- fitted transforms as files ---------------------------------------------------------
PARAMS_FORMAT = "sscd-triton-postprocess"
PARAMS_VERSION = 1
METHODS = ("center", "whiten")
CREATED_BY = "sscd-triton postprocess.py"


class PostprocessError(ValueError):
    """Bad postprocessing input (a file, dims, too few samples): one line saying why."""


class Moments:
    """Mean and covariance of descriptors accumulated a chunk at a time (float64), so a
    training set is never held in memory whole."""

    def __init__(self):
        self.n = 0
        self.sum: np.ndarray | None = None
        self.outer: np.ndarray | None = None
        self.shift: np.ndarray | None = None  # the first chunk's mean

    def add(self, x: np.ndarray) -> "Moments":
        x = np.asarray(x, np.float64)
        if x.ndim != 2:
            raise PostprocessError(f"descriptors must be [N, d], got shape {list(x.shape)}")
        if self.sum is None:
            self.sum = np.zeros(x.shape[1])
            self.outer = np.zeros((x.shape[1], x.shape[1]))
        elif x.shape[1] != len(self.sum):
            raise PostprocessError(f"descriptors of {x.shape[1]} dims after {len(self.sum)}")
        # Shifted by the first chunk's mean: sums of squares stay small, no cancellation.
        if self.n == 0 and len(x):
            self.shift = x.mean(axis=0)
        if len(x):
            y = x - self.shift
            self.sum += y.sum(axis=0)
            self.outer += y.T @ y
            self.n += len(x)
        return self

    @property
    def dims(self) -> int:
        return 0 if self.sum is None else len(self.sum)

    def mean(self) -> np.ndarray:
        return self.shift + self.sum / self.n

    def cov(self) -> np.ndarray:
        m = self.sum / self.n
        return self.outer / self.n - np.outer(m, m)


@dataclass
class Postprocess:
    """A fitted transform: `l2_normalize((x - mean) @ matrix)`. Centering has the identity
    as `matrix`; whitening the PCA eigenvectors scaled by eigenvalue ** -0.5."""

    method: str  # one of METHODS
    mean: np.ndarray  # float32 [d_in]
    matrix: np.ndarray  # float32 [d_in, d_out]
    provenance: dict = field(default_factory=dict)

    @property
    def dims_in(self) -> int:
        return int(self.matrix.shape[0])

    @property
    def dims_out(self) -> int:
        return int(self.matrix.shape[1])

    @property
    def is_identity(self) -> bool:
        return self.method == "center"

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float32)
        if x.ndim != 2 or x.shape[1] != self.dims_in:
            raise PostprocessError(f"descriptors of {x.shape[-1]} dims; these params take "
                                   f"{self.dims_in}")
        y = x - self.mean
        return l2_normalize(y if self.is_identity else y @ self.matrix)

    def sha256(self) -> str:
        """Fingerprint of what the transform computes (method, mean, matrix), not of the
        file's bytes: the same fit saved twice has the same fingerprint."""
        h = hashlib.sha256(self.method.encode())
        for a in (self.mean, self.matrix):
            a = np.ascontiguousarray(a, np.float32)
            h.update(str(a.shape).encode())
            h.update(a.tobytes())
        return h.hexdigest()

    def describe(self) -> str:
        name = "centering" if self.method == "center" else f"PCA whitening to {self.dims_out} dims"
        n = self.provenance.get("samples")
        return f"{name} ({self.dims_in}-d in{f', fitted on {n} descriptors' if n else ''})"

    def record(self) -> dict:
        """What outputs and the served graph record about this transform."""
        keep = ("samples", "source", "model", "sscd_model", "weights_sha256", "preprocess")
        return {"method": self.method, "dims_in": self.dims_in, "dims_out": self.dims_out,
                "params_sha256": self.sha256(),
                "fitted_on": {k: self.provenance[k] for k in keep if k in self.provenance}}


def fit(moments: Moments, method: str, dims: int | None = None,
        provenance: dict | None = None) -> Postprocess:
    """Fit `method` ("center" or "whiten" to `dims`, default all) on accumulated moments.
    Whitening needs more samples than output dims (n > d_out: the covariance of n samples
    has rank n - 1 at most, the rest would be noise scaled up without bound)."""
    if method not in METHODS:
        raise PostprocessError(f"method {method!r}: one of {', '.join(METHODS)}")
    d, n = moments.dims, moments.n
    if n == 0:
        raise PostprocessError("no descriptors to fit on")
    provenance = {**(provenance or {}), "samples": n}
    if method == "center":
        if dims not in (None, d):
            raise PostprocessError(f"--dims {dims}: centering keeps all {d} dims "
                                   "(--dims is for --method whiten)")
        if n < 2:
            raise PostprocessError(f"centering needs at least 2 descriptors, got {n}")
        return Postprocess(method, moments.mean().astype(np.float32), np.eye(d, dtype=np.float32),
                           provenance)
    dims = d if dims is None else dims
    if not 1 <= dims <= d:
        raise PostprocessError(f"--dims {dims}: must be between 1 and the input's {d} dims")
    if n <= dims:
        raise PostprocessError(f"whitening to {dims} dims needs more than {dims} descriptors, "
                               f"got {n}")
    w = PCAWhitening.from_moments(moments.mean(), moments.cov(), dims)
    return Postprocess(method, w.mean, w.projection, provenance)


def from_transform(t: "Centering | PCAWhitening", provenance: dict | None = None) -> Postprocess:
    """The `Postprocess` form of a `Centering` or `PCAWhitening`."""
    if isinstance(t, Centering):
        d = len(t.mean)
        return Postprocess("center", t.mean, np.eye(d, dtype=np.float32), dict(provenance or {}))
    return Postprocess("whiten", t.mean, t.projection, dict(provenance or {}))


def save_params(path: str, params: Postprocess) -> str:
    from sscd_triton.files import write_atomic

    prov = {**params.provenance, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "created_by": CREATED_BY}
    arrays = dict(format=np.array(PARAMS_FORMAT), version=np.array(PARAMS_VERSION),
                  method=np.array(params.method),
                  mean=np.ascontiguousarray(params.mean, np.float32),
                  matrix=np.ascontiguousarray(params.matrix, np.float32),
                  provenance=np.array(json.dumps(prov)))
    return write_atomic(path, lambda f: np.savez(f, **arrays), durable=True)


def load_params(path: str) -> Postprocess:
    """Read a params file written by `save_params`; PostprocessError saying why not."""
    if not os.path.isfile(path):
        raise PostprocessError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["format"]) != PARAMS_FORMAT:
                raise KeyError("format")
            method, mean, matrix = str(z["method"]), z["mean"], z["matrix"]
            prov = json.loads(str(z["provenance"])) if "provenance" in z else {}
    except PostprocessError:
        raise
    except Exception as e:  # noqa: BLE001  zip, pickle refusal, missing keys, bad JSON
        raise PostprocessError(f"{path}: not a postprocessing params file written by "
                               f"`sscd-postprocess fit` ({type(e).__name__}: {e})") from None
    if method not in METHODS or mean.ndim != 1 or matrix.ndim != 2 or \
            matrix.shape[0] != mean.shape[0] or not np.isfinite(matrix).all() \
            or not np.isfinite(mean).all():
        raise PostprocessError(f"{path}: inconsistent params (method {method!r}, mean "
                               f"{list(mean.shape)}, matrix {list(matrix.shape)})")
    return Postprocess(method, mean.astype(np.float32), matrix.astype(np.float32), prov)


# --- embeddings outputs -----------------------------------------------------------------
def source_meta(path: str) -> dict:
    """The metadata an embeddings output records about its producer (manifest of a
    folder, `meta` of an .npz); {} when it has none."""
    from sscd_triton.client import io

    try:
        if io.is_npz(path):
            with np.load(path, allow_pickle=False) as z:
                return json.loads(str(z["meta"])) if "meta" in z else {}
        return io.read_manifest(path) or {}
    except Exception:  # noqa: BLE001  provenance is best effort; reading the data says more
        return {}


def read_chunks(path: str) -> Iterable[tuple[np.ndarray, np.ndarray]]:
    """`(ids, embeddings)` of an embeddings output a shard at a time (PostprocessError
    when it is not one)."""
    from sscd_triton.client import io

    if not os.path.exists(path):
        raise PostprocessError(f"{path}: no such file or folder")
    try:
        yield from io.iter_shards(path)
    except io.OutputError as e:
        raise PostprocessError(str(e)) from None
    except (OSError, ValueError, KeyError) as e:
        raise PostprocessError(f"{path}: not an embeddings output ({type(e).__name__}: {e})") from None


def fit_embeddings(path: str, method: str, dims: int | None = None) -> Postprocess:
    """Fit on the descriptors of an embeddings output (any form load_embeddings reads),
    read a shard at a time; provenance names it and the model that produced it."""
    moments = Moments()
    for _, emb in read_chunks(path):
        moments.add(emb)
    meta = source_meta(path)
    prov = {"source": os.path.abspath(path)}
    for k in ("model", "model_version", "sscd_model", "weights_sha256", "preprocess"):
        if meta.get(k) not in (None, "", "unknown"):
            prov[k] = str(meta[k])
    if meta.get("postprocess"):
        raise PostprocessError(f"{path} holds postprocessed descriptors already "
                               f"({meta['postprocess'].get('method')}); fit on raw ones")
    return fit(moments, method, dims, prov)


def _output_meta(source: dict, params: Postprocess, input_path: str) -> dict:
    from sscd_triton.client import io

    ident = io.identity(source)
    ident["dims"] = str(params.dims_out)
    return {**ident, "postprocess": params.record(), "postprocessed_from": os.path.abspath(input_path)}


def _write_shard(path: str, ids, emb: np.ndarray, meta: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sscd_triton.client.idset import storable
    from sscd_triton.files import write_atomic

    emb = np.ascontiguousarray(emb, np.float32)
    text = {k: (json.dumps(v) if isinstance(v, dict) else str(v)) for k, v in meta.items()}
    text["created_by"] = CREATED_BY
    schema = pa.schema([pa.field("id", pa.string(), nullable=False),
                        pa.field("embedding", pa.list_(pa.float32(), emb.shape[1]), nullable=False)],
                       metadata=text)
    column = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), emb.shape[1])
    table = pa.Table.from_arrays([pa.array([storable(i) for i in ids], pa.string()), column],
                                 schema=schema)
    write_atomic(path, lambda f: pq.write_table(table, f, use_dictionary=["id"]), durable=True)


def apply_embeddings(input_path: str, params: Postprocess, output: str) -> int:
    """Write `params` applied to every descriptor of `input_path` into `output`, in the
    form its name asks for (embed.py's): a Parquet folder (`OUT/embeddings/*.parquet`,
    `OUT/manifest.json`), written one input shard at a time, or `OUT.npz` (the small-jobs
    form, assembled in memory as embed.py does). Every file records the producing model
    (copied from the input) with `dims` the new width, and `postprocess` (method, dims,
    params sha256, what it was fitted on). Returns the number of descriptors written."""
    from sscd_triton.client import io
    from sscd_triton.files import write_atomic

    if not os.path.exists(input_path):
        raise PostprocessError(f"--embeddings {input_path}: no such file or folder")
    if os.path.abspath(input_path) == os.path.abspath(output):
        raise PostprocessError(f"--output {output} is the input; write to another path")
    source = source_meta(input_path)
    if source.get("postprocess"):
        raise PostprocessError(f"{input_path} holds postprocessed descriptors already")
    meta = _output_meta(source, params, input_path)
    npz = io.is_npz(output)
    if npz:
        if os.path.isdir(output):
            raise PostprocessError(f"--output {output} is a folder; an .npz output must be a file")
        parent = os.path.dirname(os.path.abspath(output))
        if not os.path.isdir(parent):
            raise PostprocessError(f"--output {output}: directory {parent} does not exist")
    else:
        if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
            raise PostprocessError(f"--output {output} exists; give a new folder")
        os.makedirs(os.path.join(output, io.EMBEDDINGS), exist_ok=True)
    all_ids, all_emb, count = [], [], 0
    for k, (ids, emb) in enumerate(read_chunks(input_path)):
        if emb.ndim != 2 or emb.shape[1] != params.dims_in:
            raise PostprocessError(f"{input_path} holds {emb.shape[-1]}-d descriptors; the "
                                   f"params take {params.dims_in}-d")
        out = params(emb)
        count += len(out)
        if npz:
            all_ids.append(np.asarray(ids, dtype=object))
            all_emb.append(out)
        elif len(out):
            _write_shard(os.path.join(output, io.EMBEDDINGS, f"{io.DEFAULT_PART}-{k:05d}.parquet"),
                         ids, out, meta)
    doc = {**{k: v for k, v in source.items() if k not in ("layout", "complete", "count",
                                                            "failures", "resume", "created",
                                                            "updated", "partition_size")},
           **meta, "dims": params.dims_out, "format": io.FORMAT, "version": io.VERSION,
           "count": count, "failures": 0,
           "complete": True, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "created_by": CREATED_BY}
    if npz:
        ids = np.concatenate(all_ids) if all_ids else np.zeros(0, object)
        emb = np.concatenate(all_emb) if all_emb else np.zeros((0, params.dims_out), np.float32)
        ids = np.array([str(i) for i in ids], dtype=str)
        write_atomic(output, lambda f: np.savez(f, ids=ids, embeddings=emb,
                                                meta=np.array(json.dumps(doc))), durable=True)
    else:
        doc["resume"] = "ids"
        doc["layout"] = {"embeddings": f"{io.EMBEDDINGS}/*.parquet"}
        write_atomic(os.path.join(output, io.MANIFEST), json.dumps(doc, indent=1), durable=True)
    return count
