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
"""
from __future__ import annotations

import re
from dataclasses import dataclass

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
