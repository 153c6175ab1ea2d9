"""The gpu target's preprocessing: a DALI pipeline the Triton DALI backend autoserializes.

`write_dali_py(path, preprocess, max_pixels)` writes `sscd_preprocess/1/dali.py`: a
self-contained Python file (it imports only `nvidia.dali`; the serving image has none of
this project) holding the pipeline with every constant from `sscd_triton.spec` written in
as a literal. The server's own DALI serializes it when the model loads, so a pipeline
serialized here by pip DALI 2.4 can no longer meet an older DALI in the server that
refuses arguments its schema lacks ("unexpected argument"; with `--exit-on-error` the
server would not start).

Facts this relies on (dali_backend, read at 01783f8f, 2026-06-30):
- README.md "Autoserialization": a `pipeline_def` decorated with
  `nvidia.dali.plugin.triton.autoserialize`, exactly one per model version. The backend
  first loads the serialized `model.dali` (config `default_model_filename`), then tries to
  autoserialize that file as Python, then falls back to `dali.py` in the version folder
  (src/dali_model.h: `LoadModel`, `fallback_model_filename_ = "dali.py"`). **A stale
  `model.dali` beside `dali.py` wins**: the repository must not hold one.
- src/model_provider/model_provider.h `GenerateAutoserializeCmd`: the server runs
  `python3 -c` importing the file with `importlib` and calls
  `nvidia.dali._utils.autoserialize.invoke_autoserialize`, which calls the decorated
  function *with no arguments* and serializes it: keyword parameters keep their defaults
  (docs/examples/efficientnet/.../preprocessing_gpu/1/dali.py has `pipe(hw_decoder_load=0.8)`),
  so the defaults must be the production graph.
- src/dali_model_instance.h (`DaliPipeline(serialized, max_batch_size, num_threads,
  device_id)`) and src/dali_executor/dali_pipeline.h: each instance re-creates the pipeline
  with the config's `max_batch_size` and its own GPU; `num_threads` comes from the config
  parameter `num_threads` when given (src/parameters.h, -1 = the pipeline's own). So the
  `batch_size` and `device_id` written in `dali.py` are only used while serializing.
- DALI's `autoserialize` (nvidia/dali/plugin/triton.py) only sets `_is_autoserialize` on
  the function: importing `dali.py` needs no GPU and builds nothing.
- `jpeg_fancy_upsampling` (decoders.image schema, DALI 2.4: "Make the mixed backend use the
  same chroma upsampling approach as the cpu one"; NVIDIA/DALI#4662, merged 2023-02, takes
  effect with nvJPEG >= 12.0.1, i.e. CUDA 12 builds). The cpu decoder accepts it and its
  output is unchanged (measured here: identical, and bit-exact with PIL, on 16 JPEGs).

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

Here (no GPU) the same generated file is imported and run with `decoder_device="cpu",
device_id=None` (`run_cpu`): the tests check the very file the server loads.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import string
import tempfile

import numpy as np

from sscd_triton import files, spec

OUTPUT_NAME = spec.INPUT_NAME  # the name the Triton config gives pipeline output 0
REFUSE_OP = "refuse_over_max_pixels"
FILENAME = "dali.py"  # the dali_backend's fallback file name in a model version folder
PIPELINE_FUNCTION = "sscd_preprocess"  # the @autoserialize function in the generated file

# `$NAME` placeholders (string.Template): the file itself uses no `$`. Values are written
# with repr(), so they are Python literals equal to spec's.
_TEMPLATE = '''\
"""SSCD preprocessing for Triton's DALI backend (model `$model`), autoserialized.

GENERATED by sscd-triton (sscd_triton/serving/dali_pipeline.py, from sscd_triton/spec.py):
do not edit, regenerate. Self-contained: it imports only nvidia.dali. The server's own DALI serializes
`$function` when the model loads (dali_backend README, "Autoserialization"); the
backend then replaces `batch_size` with the config's max_batch_size and `device_id` with
the instance's GPU.

encoded bytes (uint8 [-1], input "$input") -> float32 [3, H, W], upstream `$upstream`:
decode to RGB (EXIF orientation ignored);
$resize, with a linear antialiased filter on uint8;
scale to [0, 1] and normalise with ImageNet mean/std.
An image whose header or resized size is over MAX_PIXELS fails the batch in
`$refuse_op`, before decoding.
"""
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dmath
from nvidia.dali.plugin.triton import autoserialize

INPUT_NAME = $input_name
SIZE = $size
SQUARE = $square
MEAN = $mean
STD = $std
MAX_PIXELS = $max_pixels
REFUSE_OP = $refuse_op_name
# Share of JPEGs sent to the hardware decoder (A100/H100/H200; ignored elsewhere and on
# the cpu decoder): ServingConfig.hw_decoder_load, recorded in the config's parameters.
HW_DECODER_LOAD = $hw_decoder_load


@autoserialize
@pipeline_def(batch_size=1, num_threads=4, device_id=0)
def $function(decoder_device="mixed"):
    """The served graph by default: nvJPEG ("mixed") decoder, resize and normalise on the GPU.

    decoder_device="cpu" (with device_id=None) runs the same graph on the CPU (libjpeg-turbo).
    """
    encoded = fn.external_source(name=INPUT_NAME, dtype=types.UINT8, ndim=1)
    # Header shape (H, W, C), read on the CPU before decoding; orientation ignored as below.
    hw = fn.peek_image_shape(encoded, dtype=types.INT64, adjust_orientation=False)
    if SQUARE:
        out_h, out_w = SIZE, SIZE
    else:
        # torchvision truncates the long edge: integer floor division, not DALI's rounding.
        short = dmath.min(hw[0], hw[1])
        out_h, out_w = SIZE * hw[0] // short, SIZE * hw[1] // short
    # Pixel gate: DALI has no assert; reshaping to one element more than the input is an
    # error, raised on the CPU before the decoder that depends on its output runs.
    too_big = (hw[0] * hw[1] > MAX_PIXELS) | (out_h * out_w > MAX_PIXELS)
    n = encoded.shape(dtype=types.INT64) + fn.cast(too_big, dtype=types.INT64)
    encoded = fn.reshape(encoded, shape=n, name=REFUSE_OP)
    # jpeg_fancy_upsampling: chroma upsampled as libjpeg-turbo (PIL, upstream) does.
    images = fn.decoders.image(encoded, device=decoder_device, output_type=types.RGB,
                               adjust_orientation=False, jpeg_fancy_upsampling=True,
                               hw_decoder_load=HW_DECODER_LOAD)
    if SQUARE:
        size = [float(SIZE), float(SIZE)]
    else:
        size = fn.cast(fn.stack(out_h, out_w), dtype=types.FLOAT)
    images = fn.resize(images, size=size, interp_type=types.INTERP_LINEAR, antialias=True)
    return fn.crop_mirror_normalize(
        images, dtype=types.FLOAT, output_layout="CHW",
        mean=[255.0 * m for m in MEAN], std=[255.0 * s for s in STD])
'''


def dali_py_source(preprocess: spec.Preprocess, max_pixels: int = spec.MAX_IMAGE_PIXELS,
                   hw_decoder_load: float = 0.65) -> str:
    """The text of `dali.py` for `preprocess`, `max_pixels` and `hw_decoder_load` (DALI's
    default 0.65), constants written in."""
    resize = ("resize to SIZE x SIZE (aspect not kept)" if preprocess.square
              else "resize the short edge to SIZE (long edge truncated)")
    return string.Template(_TEMPLATE).substitute(
        model=spec.PREPROCESS_MODEL, function=PIPELINE_FUNCTION, input=spec.ENSEMBLE_INPUT,
        upstream=preprocess.upstream_name, resize=resize, refuse_op=REFUSE_OP,
        input_name=repr(spec.ENSEMBLE_INPUT), size=repr(int(preprocess.size)),
        square=repr(bool(preprocess.square)), mean=repr(tuple(float(m) for m in spec.MEAN)),
        std=repr(tuple(float(s) for s in spec.STD)), max_pixels=repr(int(max_pixels)),
        refuse_op_name=repr(REFUSE_OP), hw_decoder_load=repr(float(hw_decoder_load)))


def write_dali_py(path, preprocess: spec.Preprocess, max_pixels: int,
                  hw_decoder_load: float = 0.65) -> None:
    """Write the autoserialized pipeline to `path` (`<repo>/sscd_preprocess/1/dali.py`),
    atomically (`sscd_triton.files.write_atomic`)."""
    files.write_atomic(os.fspath(path), dali_py_source(preprocess, max_pixels, hw_decoder_load))


def load_dali_py(path):
    """Import a `dali.py` as the server does (importlib from its path; model_provider.h)."""
    path = os.fspath(path)
    mod_spec = importlib.util.spec_from_file_location("sscd_dali_autoserialize_mod", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


@functools.lru_cache(maxsize=8)
def _generated(preprocess: spec.Preprocess, max_pixels: int):
    """The pipeline function of the generated file (written, then imported from disk)."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, FILENAME)
        write_dali_py(path, preprocess, max_pixels)
        return getattr(load_dali_py(path), PIPELINE_FUNCTION)


def run_cpu(preprocess: spec.Preprocess, encoded: list[bytes],
            max_pixels: int = spec.MAX_IMAGE_PIXELS) -> list[np.ndarray]:
    """Encoded images -> float32 `[3, H, W]` arrays, with the generated `dali.py` run on the
    CPU (`decoder_device="cpu"`, `device_id=None`).

    One batch of `len(encoded)`; raises RuntimeError if any image fails (as the served
    pipeline fails the whole batch).
    """
    pipe = _generated(preprocess, max_pixels)(
        decoder_device="cpu", batch_size=len(encoded), num_threads=2, device_id=None)
    pipe.build()
    pipe.feed_input(spec.ENSEMBLE_INPUT, [np.frombuffer(b, dtype=np.uint8) for b in encoded])
    (out,) = pipe.run()
    return [np.array(out.at(i)) for i in range(len(encoded))]
