"""The plan's optimisation profile: from build_tensorrt's flags, checked against the
ONNX, and what of it validate.model_parity can exercise. Pure (no TensorRT).

Plan I/O is the graph's: `images` float32 [N, 3, H, W] -> `descriptors` float32
[N, dims]; N (and H, W unless fixed) range over one optimisation profile.
"""
from __future__ import annotations

import re

import onnx

from sscd_triton import samples, spec
from sscd_triton.export.trt_errors import InputError

MIN_SIZE = spec.MIN_INPUT_SIZE
Shape = tuple[int, int, int, int]  # (N, 3, H, W)
Profile = dict[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max)


def _hw(flag: str, value) -> tuple[int, int]:
    """`S` or `HxW` -> (H, W), each >= MIN_SIZE."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", str(value))
    if not m:
        raise InputError(f"{flag} {value!r}: expected S or HxW, e.g. 320 or 288x432")
    h, w = int(m[1]), int(m[2] or m[1])
    if min(h, w) < MIN_SIZE:
        raise InputError(f"{flag} {value}: H and W must be >= {MIN_SIZE}")
    return h, w


def profile_shapes(*, min_batch: int, opt_batch: int, max_batch: int,
                   size: str | int | None = None, min_size: str | None = None,
                   opt_size: str | None = None, max_size: str | None = None) -> Profile:
    """{INPUT_NAME: (min, opt, max)} shapes from build_tensorrt's flags of the same names.

    Explicit batch: N ranges over --min/--opt/--max-batch. `--size S` fixes H = W = S;
    `--min-size/--opt-size/--max-size` (each S or HxW) make H and W dynamic. Neither:
    H = W = 320, the default square320 serving mode.
    """
    batches = (min_batch, opt_batch, max_batch)
    if batches[0] < 1:
        raise InputError(f"--min-batch {batches[0]}: must be >= 1")
    if not batches[0] <= batches[1] <= batches[2]:
        raise InputError(f"--min-batch {batches[0]}, --opt-batch {batches[1]}, --max-batch "
                         f"{batches[2]}: need --min-batch <= --opt-batch <= --max-batch")
    flags = {"--min-size": min_size, "--opt-size": opt_size, "--max-size": max_size}
    given = [f for f, v in flags.items() if v is not None]
    if size is not None and given:
        raise InputError(f"--size fixes H = W; drop {', '.join(given)} "
                         "(or drop --size for dynamic H, W)")
    if given and len(given) < 3:
        missing = [f for f in flags if f not in given]
        raise InputError(f"dynamic H, W need --min-size, --opt-size and --max-size; "
                         f"missing {', '.join(missing)}")
    if given:
        hws = [_hw(f, v) for f, v in flags.items()]
        for axis, name in ((0, "H"), (1, "W")):
            lo, opt, hi = (hw[axis] for hw in hws)
            if not lo <= opt <= hi:
                raise InputError(f"{name}: --min-size {lo}, --opt-size {opt}, --max-size {hi}: "
                                 "need --min-size <= --opt-size <= --max-size in H and W")
    else:
        size = size if size is not None else spec.PREPROCESS[spec.DEFAULT_PREPROCESS].size
        h, w = _hw("--size", size)
        if h != w:
            raise InputError(f"--size {size}: give one number (H = W); use --min-size/"
                             "--opt-size/--max-size for other shapes")
        hws = [(h, w)] * 3
    shapes = tuple((b, spec.CHANNELS, h, w) for b, (h, w) in zip(batches, hws))
    return {spec.INPUT_NAME: shapes}


def check_profile(shapes: Profile, model: onnx.ModelProto, path: str) -> None:
    """The profile must keep every dimension the ONNX graph fixes (e.g. --static-size 288)."""
    dims = {i.name: [d.dim_value or None for d in i.type.tensor_type.shape.dim]
            for i in model.graph.input}
    for name, triple in shapes.items():
        for axis, fixed in enumerate(dims[name]):
            got = sorted({s[axis] for s in triple})
            if fixed is None or got == [fixed]:
                continue
            hint = ("set --min-batch, --opt-batch and --max-batch to it" if axis == 0
                    else f"pass --size {fixed}" if dims[name][2] == dims[name][3]
                    else "pass --min-size, --opt-size and --max-size "
                    f"{dims[name][2]}x{dims[name][3]}")
            raise InputError(f"--onnx {path} fixes {name} axis {axis} ({'NCHW'[axis]}) at {fixed}, "
                             f"the profile gives {'..'.join(map(str, got))}: {hint}")


def parity_size(shapes: Profile) -> tuple[bool, int | None, str]:
    """How validate.model_parity can exercise this profile: (run, static_size, note).

    Fixed square: that size. Dynamic and covering 320 and every photograph's small_288
    shape: both modes (static_size None). Otherwise the square size nearest 320 inside
    the profile, small_288 skipped with `note` saying why.
    """
    lo, _, hi = shapes[spec.INPUT_NAME]
    if lo[2:] == hi[2:]:
        if lo[2] == lo[3]:
            return True, lo[2], ""
        return False, None, f"n/a: fixed {lo[2]}x{lo[3]} input is not square"
    fits = lambda h, w: lo[2] <= h <= hi[2] and lo[3] <= w <= hi[3]  # noqa: E731
    short = spec.PREPROCESS["short288"]
    need = [short.output_hw(*img.size) for _, img in samples.photographs()]
    square = spec.PREPROCESS["square320"].size
    if fits(square, square) and all(fits(h, w) for h, w in need):
        return True, None, ""
    s_lo, s_hi = max(lo[2], lo[3]), min(hi[2], hi[3])
    hs, ws = [h for h, _ in need], [w for _, w in need]
    why = (f"n/a: profile H {lo[2]}..{hi[2]}, W {lo[3]}..{hi[3]} does not cover small_288 "
           f"(H {min(hs)}..{max(hs)}, W {min(ws)}..{max(ws)})")
    if s_lo > s_hi:
        return False, None, why + " and admits no square input"
    return True, min(max(square, s_lo), s_hi), why
