"""Parity measures between descriptor sets, as ../shared/triton/NOTES.md prescribes.

A random-weight SSCD maps every image to nearly the same descriptor, so an absolute
cosine bound passes for any two images. Pipeline parity is therefore measured on
descriptors centred on the reference mean, and against the distance to the nearest
*other* image: a faithful pipeline moves a descriptor much less than that.
`measure` takes float arrays `[n, dims]` and `[N, dims]`, n <= N: candidate row i and
reference row i describe image i; reference rows past n are further images that only
serve as the "other images" (so that a batch of one is still measured discriminatively).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from sscd_triton import spec
from sscd_triton.report import Check


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), spec.L2_EPS)


@dataclass
class Parity:
    """Agreement of `candidate` descriptors with `reference` descriptors of the same images."""

    n: int
    max_abs: float  # max |candidate - reference| over all elements of the unit descriptors
    centered_cosine_min: float  # min over images of cos(c_i - mu, r_i - mu), mu = mean(reference)
    nearest_ratio_max: float  # max over i of |c_i - r_i| / min_{j != i} |c_i - r_j|
    top1: int  # images whose nearest reference is their own

    @property
    def top1_all(self) -> bool:
        return self.top1 == self.n

    def as_dict(self) -> dict:
        return {**asdict(self), "top1_all": self.top1_all}


def measure(candidate: np.ndarray, reference: np.ndarray) -> Parity:
    c = np.asarray(candidate, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    if c.ndim != 2 or r.ndim != 2 or c.shape[1] != r.shape[1] or len(c) > len(r):
        raise ValueError(f"descriptor sets do not pair up: {c.shape} vs {r.shape}")
    if len(r) < 2:
        raise ValueError("parity needs at least two reference images (one to compare, one other)")
    n = len(c)
    mu = r.mean(axis=0, keepdims=True)
    centered = np.sum(_unit(c - mu) * _unit(r[:n] - mu), axis=1)
    dist = np.linalg.norm(c[:, None, :] - r[None, :, :], axis=2)  # dist[i, j] = |c_i - r_j|
    own = dist[np.arange(n), np.arange(n)].copy()
    dist[np.arange(n), np.arange(n)] = np.inf
    ratio = own / np.maximum(dist.min(axis=1), 1e-12)
    top1 = int(np.sum(own < dist.min(axis=1)))
    return Parity(
        n=n,
        max_abs=float(np.max(np.abs(c - r[:n]))),
        centered_cosine_min=float(centered.min()),
        nearest_ratio_max=float(ratio.max()),
        top1=top1,
    )


def pipeline_bounds(resampled: bool = False, int8: bool = False) -> tuple[float, float]:
    """(centred cosine min, nearest ratio max): `resampled` for pixels from another
    decoder/resizer than PIL's, `int8` for a quantised model (spec explains both; int8's
    bounds, the loosest, cover it on either decoder)."""
    if int8:
        return spec.INT8_CENTERED_COSINE_MIN, spec.INT8_NEAREST_RATIO_MAX
    if resampled:
        return spec.RESAMPLED_CENTERED_COSINE_MIN, spec.RESAMPLED_NEAREST_RATIO_MAX
    return spec.CENTERED_COSINE_MIN, spec.NEAREST_RATIO_MAX


def pipeline_failures(p: Parity, resampled: bool = False, int8: bool = False) -> list[str]:
    """Bounds for a changed pipeline (fp16; `resampled`: another decoder or resizer than
    PIL's; `int8`: a quantised model): empty when all hold."""
    cos_min, ratio_max = pipeline_bounds(resampled, int8)
    out = []
    if p.centered_cosine_min < cos_min:
        out.append(f"centered cosine {p.centered_cosine_min:.5f} < {cos_min}")
    if p.nearest_ratio_max > ratio_max:
        out.append(f"error/nearest ratio {p.nearest_ratio_max:.4f} > {ratio_max}")
    if not p.top1_all:
        out.append(f"top-1 agreement {p.top1}/{p.n}")
    return out


def exact_failures(p: Parity, bound: float = spec.FP32_MAX_ABS) -> list[str]:
    """Bound for the same computation on another runtime (fp32 model parity)."""
    return [] if p.max_abs <= bound else [f"max |difference| {p.max_abs:.2e} > {bound:.0e}"]


def checks(name: str, p: Parity, exact: bool, resampled: bool = False,
           per_measure: bool = False, also: list[str] | None = None,
           int8: bool = False) -> list[Check]:
    """Report rows for `p` with their bounds: the one place parity becomes checks.

    `exact`: the same computation on another runtime (fp32 model parity), bounded by
    `exact_failures`; else a changed pipeline (fp16, or other pixels), bounded by
    `pipeline_failures(p, resampled, int8)`. One row `name` holding every measure; with
    `per_measure` (pipeline bounds only) a row per bound, named by its measure after
    `name`. `also`: further failures of the same candidate (e.g. non-unit norms), which
    fail the single row."""
    fails = (exact_failures(p) if exact else pipeline_failures(p, resampled, int8)) + list(also or ())
    if exact:
        detail, bound = f"max|diff| {p.max_abs:.1e}", f"<= {spec.FP32_MAX_ABS:.0e}"
    else:
        cos_min, ratio_max = pipeline_bounds(resampled, int8)
        if per_measure:
            prefix = f"{name}: " if name else ""
            return [
                Check(prefix + "centered cosine (min)", p.centered_cosine_min >= cos_min,
                      f"{p.centered_cosine_min:.6f} over {p.n} images", f">= {cos_min}",
                      p.as_dict()),
                Check(prefix + "error / nearest other (max)", p.nearest_ratio_max <= ratio_max,
                      f"{p.nearest_ratio_max:.4f}", f"<= {ratio_max}"),
                Check(prefix + "top-1 agreement", p.top1_all, f"{p.top1}/{p.n}", "all"),
            ] + [Check(prefix + "descriptors", False, f) for f in also or ()]
        detail = (f"ccos {p.centered_cosine_min:.5f} ratio {p.nearest_ratio_max:.4f} "
                  f"top1 {p.top1}/{p.n}")
        bound = f"ccos >= {cos_min}, ratio <= {ratio_max}, top1 all"
    return [Check(name, not fails, detail + ("" if not fails else " (" + "; ".join(fails) + ")"),
                  bound, p.as_dict())]
