"""`--check-parity N`: do the served descriptors match PyTorch on the same files?

Samples N embedded inputs of an output (seeded reservoir sampling, one pass over the
shards), re-embeds them here with the PyTorch model of `--checkpoint` and upstream's
preprocessing (`sscd_triton.images`: PIL decode, bilinear resize, normalise), and bounds
the agreement with the discriminative measures of `sscd_triton.parity` (descriptors
centred on the reference mean; error against the distance to the nearest other image;
top-1 agreement), since absolute cosines say nothing with untrained weights
(../shared/triton/NOTES.md). The only client module that imports torch, and only here.
"""
from __future__ import annotations

import random
import sys

import numpy as np

from sscd_triton.client import io as outio
from sscd_triton.client import sources
from sscd_triton import images, parity, spec


class ParityUsageError(Exception):
    """The checkpoint cannot be used (exit status 2)."""


def sample(output: str, n: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """Up to `n` (id, served descriptor) pairs drawn uniformly from `output`."""
    rng = random.Random(seed)
    picked: list[tuple[str, np.ndarray]] = []
    seen = 0
    for ids, emb in outio.iter_shards(output):
        for i in range(len(ids)):
            seen += 1
            if len(picked) < n:
                picked.append((str(ids[i]), emb[i].copy()))
            else:
                j = rng.randrange(seen)
                if j < n:
                    picked[j] = (str(ids[i]), emb[i].copy())
    picked.sort(key=lambda p: p[0])
    if not picked:
        return [], np.zeros((0, 0), np.float32)
    return [p[0] for p in picked], np.stack([p[1] for p in picked])


def check(output: str, n: int, checkpoint: str, preprocess: spec.Preprocess,
          max_file_bytes: int = 64 << 20, seed: int = 0, stream=None,
          resampled: bool = False, int8: bool = False) -> bool:
    """Print the parity table for `n` sampled inputs of `output`; True when it passes.

    `resampled`: the server decodes or resizes otherwise than PIL (the gpu target's DALI
    pipeline: nvJPEG and its own resize), so the resampled-pipeline bounds apply
    (`parity.pipeline_bounds`); False for PIL preprocessing (the cpu target). `int8`: the
    server runs an int8 model, held to int8's bounds against fp32 PyTorch."""
    import torch

    from sscd_triton.export import checkpoints
    from sscd_triton.report import Check, Report

    stream = stream or sys.stdout
    report = Report(f"parity: served descriptors vs PyTorch ({checkpoint}, "
                    f"{preprocess.upstream_name})", 3, stream)
    try:
        loaded = checkpoints.load(checkpoint)
    except checkpoints.CheckpointError as e:
        raise ParityUsageError(str(e)) from None
    model = loaded.model.eval()
    report.log(f"loaded {loaded.layout} checkpoint: {loaded.trunk}, {loaded.dims}-d")
    ids, served = sample(output, n, seed)
    report.log(f"sampled {len(ids)} of the embedded inputs (seed {seed})")
    kept, refs, skipped = [], [], []
    with torch.inference_mode():
        for k, id_ in enumerate(ids):
            data, why = sources.read_problem(id_, max_file_bytes)
            try:
                if why:
                    raise images.ImageError(why)
                x = images.load_tensor(data, preprocess)
            except images.ImageError as e:
                skipped.append(f"{id_}: {e}")
                continue
            refs.append(model(torch.from_numpy(x)[None]).float().numpy()[0])
            kept.append(k)
    report.log(f"re-embedded {len(kept)} inputs with PyTorch {torch.__version__} on the CPU")
    for s in skipped:
        report.note(f"skipped (changed since it was embedded?) {s}")
    if len(kept) < 2:  # parity is measured against the distance to another image
        report.add([Check("pipeline parity", False,
                          f"{len(kept)} embedded input(s) could be compared; need 2 or more")])
        report.table()
        return False
    if served.shape[1] != loaded.dims:
        report.add([Check("descriptor size", False, f"served {served.shape[1]}-d, checkpoint "
                          f"{loaded.dims}-d: a different model")])
        report.table()
        return False
    p = parity.measure(served[kept], np.stack(refs))
    report.add(parity.checks("", p, exact=False, resampled=resampled, per_measure=True,
                             int8=int8))
    report.note(f"max |served - reference| {p.max_abs:.2e} (not bounded: fp16 engines and "
                "GPU decoders differ more than fp32 on the CPU)")
    report.table()
    failures = parity.pipeline_failures(p, resampled, int8)
    if failures:
        print("parity FAILED: " + "; ".join(failures), file=stream)
    return report.passed and not failures
