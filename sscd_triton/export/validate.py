"""Model parity: a runtime's descriptors against the PyTorch model, same input tensors.

Both upstream modes on real photographs: `skew_320` square batches of 1, 3 and 16, and
`small_288` one image at a time (its shapes differ per image). fp32 is bounded by the
max |difference| of unit descriptors; fp16 by the discriminative measures of
sscd_triton.parity (random weights make absolute cosines meaningless).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from sscd_triton.report import Check
from sscd_triton import images, parity, samples, spec

Runner = Callable[[np.ndarray], np.ndarray]  # float32 [N,3,H,W] -> float32 [N,dims]
SQUARE_BATCHES = (1, 3, 16)


def torch_runner(model: torch.nn.Module) -> Runner:
    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).float().numpy()
    return run


def _judge(name: str, cand: np.ndarray, ref: np.ndarray, precision: str) -> Check:
    """`cand` describes the first len(cand) images of `ref` (all the photographs)."""
    norms = np.linalg.norm(cand, axis=1)
    unit = [] if np.all(np.abs(norms - 1) < 1e-3) else [
        f"descriptor norms {norms.min():.4f}..{norms.max():.4f}, not unit"]
    (check,) = parity.checks(name, parity.measure(cand, ref), exact=precision == "fp32",
                             also=unit)
    return check


def model_parity(candidate: Runner, reference: Runner, precision: str,
                 static_size: int | None = None) -> list[Check]:
    photos = [img for _, img in samples.photographs()]
    checks = []
    square = spec.square(static_size or spec.PREPROCESS["square320"].size)
    x = np.stack([images.to_tensor(img, square) for img in photos])
    ref = reference(x)
    for b in SQUARE_BATCHES:
        checks.append(_judge(f"{square.upstream_name} batch {b}", candidate(x[:b]), ref, precision))
    short = spec.PREPROCESS["short288"]
    name = f"{short.upstream_name} x{len(photos)}, batch 1"
    if static_size is not None:
        checks.append(Check(name, None, f"n/a: fixed {static_size}x{static_size} input"))
    else:
        tensors = [images.to_tensor(img, short)[None] for img in photos]
        cand = np.concatenate([candidate(t) for t in tensors])
        ref = np.concatenate([reference(t) for t in tensors])
        checks.append(_judge(name, cand, ref, precision))
    return checks
