"""The gpu target's preprocessing as a DALI pipeline (Triton DALI backend, `model.dali`).

Input: `spec.ENSEMBLE_INPUT`, uint8 `[-1]` per sample: the encoded file bytes, one image
per sample (Triton config `TYPE_UINT8 dims [-1]`, `allow_ragged_batch: true`).
Output 0: float32 `[3, H, W]` per sample, normalised as `spec` says. DALI pipeline outputs
carry no names: the DALI backend maps the config's outputs to the pipeline's outputs *by
position*, so the config's first (only) output must be named `spec.INPUT_NAME`
(`OUTPUT_NAME` below) for the ensemble to feed it to the descriptor model.

Numerics (against `sscd_triton.images`, i.e. upstream PIL + torchvision):
- decode to RGB with EXIF orientation ignored, as upstream's PIL path does;
- resize the uint8 image with a linear filter widened when shrinking (`antialias`), which
  is PIL's BILINEAR; output stays uint8 as PIL's does, so rounding happens at the same step;
- sizes are integers computed here, never fractional, so DALI's sub-pixel ROI adjustment
  is inactive and the scale is in/out exactly as in PIL;
- short288: torchvision truncates the long edge, `int(288 * long / short)`. DALI's own
  `resize_shorter` rounds it instead, so the size is computed from the header shape with
  integer floor division: `288 * h // min(h, w)` and `288 * w // min(h, w)`. The short edge
  gives exactly 288; the long edge equals the float truncation for any real image size
  (a float quotient of integers this small never rounds up across an integer).

Pixel limit (`max_pixels`): the header shape and the resized shape computed from it are
checked before decoding (short288 would stretch a 1 x 40000 strip to 288 x 11,520,000; the
CPU path refuses it as an "extreme aspect ratio"). An image over the limit fails the
*whole batch* (DALI has no per-sample errors; NVIDIA/DALI#3913) with a cryptic error from
`fn.reshape` (instance `REFUSE_OP`: "Input and output samples must occupy the same size in
bytes", with the sample index); decoding a 40000 x 40000 PNG on the GPU would instead risk
running the device out of memory for every request. Requests are meant to be refused
individually before they reach DALI (the ensemble's caller or a front step); this gate is
the backstop. Corrupt bytes likewise fail the batch.
Formats: DALI decodes JPEG, PNG, BMP, TIFF, WebP, JPEG 2000, PNM, but not GIF.
"""
from __future__ import annotations

import numpy as np
from nvidia.dali import backend as dali_backend
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dmath

from sscd_triton import spec

OUTPUT_NAME = spec.INPUT_NAME  # the name the Triton config gives pipeline output 0
REFUSE_OP = "refuse_over_max_pixels"


def _out_hw(preprocess: spec.Preprocess, hw):
    """The resized (H, W): square's constant, or short288's integer sizes (module docstring)."""
    if preprocess.square:
        return preprocess.size, preprocess.size
    short = dmath.min(hw[0], hw[1])
    return preprocess.size * hw[0] // short, preprocess.size * hw[1] // short


def _refuse_oversized(encoded, hw, out_hw, max_pixels: int):
    """Pass `encoded` through unchanged, or fail the batch if the header size `h * w` or the
    resized size `out_h * out_w` is over `max_pixels` (as `sscd_triton.images.load_tensor`).

    DALI has no assert operator; reshaping to a volume one larger than the input is an
    error, raised on the CPU before the decoder that depends on this output runs.
    """
    too_big = (hw[0] * hw[1] > max_pixels) | (out_hw[0] * out_hw[1] > max_pixels)
    n = encoded.shape(dtype=types.INT64) + fn.cast(too_big, dtype=types.INT64)
    return fn.reshape(encoded, shape=n, name=REFUSE_OP)


def build_pipeline(preprocess: spec.Preprocess, max_batch_size: int, device_id: int | None = 0,
                   num_threads: int = 4, max_pixels: int = spec.MAX_IMAGE_PIXELS, *,
                   gpu: bool | None = None):
    """A DALI pipeline: encoded bytes (uint8 `[-1]`) -> float32 `[3, H, W]` per sample.

    `device_id=None` runs everything on the CPU (libjpeg-turbo / libpng); otherwise the
    decoder is "mixed" (nvJPEG, hardware JPEG decoder where present) and the rest on GPU.
    `gpu=True` with `device_id=None` defines the GPU graph without touching CUDA: it can
    be serialized, not run (what `serialize` does on a host without a GPU).
    """
    gpu = device_id is not None if gpu is None else gpu

    @pipeline_def(batch_size=max_batch_size, num_threads=num_threads, device_id=device_id)
    def pipe():
        encoded = fn.external_source(name=spec.ENSEMBLE_INPUT, dtype=types.UINT8, ndim=1)
        # Header shape (H, W, C): read on the CPU before decoding; orientation ignored so
        # it matches the decoded image below.
        hw = fn.peek_image_shape(encoded, dtype=types.INT64, adjust_orientation=False)
        out_h, out_w = _out_hw(preprocess, hw)
        encoded = _refuse_oversized(encoded, hw, (out_h, out_w), max_pixels)
        images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu",
                                   output_type=types.RGB, adjust_orientation=False)
        size = ([float(out_h), float(out_w)] if preprocess.square
                else fn.cast(fn.stack(out_h, out_w), dtype=types.FLOAT))
        images = fn.resize(images, size=size, interp_type=types.INTERP_LINEAR, antialias=True)
        return fn.crop_mirror_normalize(
            images, dtype=types.FLOAT, output_layout="CHW",
            mean=[255.0 * m for m in spec.MEAN], std=[255.0 * s for s in spec.STD])

    return pipe()


def serialize(preprocess: spec.Preprocess, max_batch_size: int, path,
              max_pixels: int = spec.MAX_IMAGE_PIXELS) -> None:
    """Write the production pipeline (mixed decoder, GPU ops) to `path` (`model.dali`).

    DALI 2.4 refuses to create a pipeline with a `device_id` when CUDA is absent, even
    only to serialize it. The device id is not needed in the file: the Triton DALI
    backend creates the pipeline with its instance's device id and the config's
    max_batch_size, overriding the stored ones. So without a GPU the same graph is
    serialized with no device id; with one, with device 0.
    """
    device_id = 0 if dali_backend.GetCUDADeviceCount() > 0 else None
    pipe = build_pipeline(preprocess, max_batch_size, device_id=device_id,
                          max_pixels=max_pixels, gpu=True)
    pipe.serialize(filename=str(path))


def run_cpu(preprocess: spec.Preprocess, encoded: list[bytes],
            max_pixels: int = spec.MAX_IMAGE_PIXELS) -> list[np.ndarray]:
    """Encoded images -> float32 `[3, H, W]` arrays, with the CPU-only variant of the pipeline.

    One batch of `len(encoded)`; raises RuntimeError if any image fails (as the served
    pipeline fails the whole batch).
    """
    pipe = build_pipeline(preprocess, max_batch_size=len(encoded), device_id=None,
                          max_pixels=max_pixels)
    pipe.build()
    pipe.feed_input(spec.ENSEMBLE_INPUT, [np.frombuffer(b, dtype=np.uint8) for b in encoded])
    (out,) = pipe.run()
    return [np.array(out.at(i)) for i in range(len(encoded))]
