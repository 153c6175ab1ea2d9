"""int8 descriptors: post-training quantisation of the exported fp32 ONNX into explicit
QuantizeLinear/DequantizeLinear (QDQ) form, calibrated on images preprocessed exactly as
served, and the report of what int8 costs against fp32 on images calibration never saw.

Quantiser: ONNX Runtime's `quantize_static` (the field's stock tool; its QDQ graphs run on
ONNX Runtime's CPU kernels and parse in TensorRT, whose int8 comes only from Q/DQ nodes
since TensorRT 10 deprecated and 11 removed implicit calibration). Per target, because
the backends differ:
  cpu  uint8 activations (asymmetric), int8 per-channel weights: ONNX Runtime's x86 int8
       kernels (VNNI/AMX) are u8 x s8; signed activations ran ~3x slower here (measured,
       docs/export.md, "int8").
  gpu  int8 activations with zero point 0 (`ActivationSymmetric`), int8 per-channel
       weights: TensorRT's Q/DQ layers take symmetric int8 only (TensorRT developer
       guide, "Explicit Quantization": "only symmetric quantization ... zero-point must be
       0"), biases left float; built as a strongly typed network
       (sscd_triton.export.onnx_graph).
The trunk runs int8; GeM, the Linear and L2 normalisation (everything after the trunk's
final ReLU, export.fp16.trunk_end) stay fp32: GeM's x**3 and the unit norm are where
rounding would show, and they are 0.02% of the FLOPs.
"""
from __future__ import annotations

import hashlib
import os
import random
import tempfile
from dataclasses import dataclass, field

import numpy as np

from sscd_triton import images, parity, samples, spec
from sscd_triton.copydetect import copyset
from sscd_triton.client import sources
from sscd_triton.report import Check

TARGET_ACTIVATIONS = {"cpu": "uint8", "gpu": "int8 symmetric"}
METHODS = ("minmax", "percentile", "entropy")
# The three measured alike on the test weights (docs/export.md, "int8"); minmax is the cheapest and
# the only one that streams (below).
DEFAULT_METHOD = "minmax"
PERCENTILE = 99.999
# minmax reduces each batch to per-tensor ranges as it goes: 128 images cost ~1 min here.
DEFAULT_CALIBRATION_SIZE = 128
# ONNX Runtime's histogram calibrators (percentile, entropy) keep every activation of every
# image until the end (calibrate.py HistogramCalibrater.collect_data): about 120 MB per
# image at 320 x 320 (ResNet50's ~30M activations), so they are capped, and they need one
# shape for all images (they stack them), which short288 does not give.
HISTOGRAM_MAX_IMAGES = 32
BATCH = 8  # calibration batch for minmax on square preprocessing (else 1)
MAX_FILE_BYTES = 64 << 20  # as sscd-embed's default --max-file-bytes
# Written into the int8 ONNX's metadata_props, so that a later check (build_repository
# --onnx, build_tensorrt.py) holds the same photographs out.
META_TARGET, META_METHOD = "sscd_int8_target", "sscd_int8_calibration_method"
META_SHA256 = "sscd_int8_calibration_sha256"

# Bounds of the int8 report, against the fp32 ONNX of the same checkpoint on held-out
# images: the discriminative ones (centred cosine, error / nearest other, top-1) live in
# spec with their measurements; beside them the targets with trained weights (plain cosine
# to fp32: random weights pass it whatever int8 does, so it is stated, not relied on) and
# copy-detection agreement with fp32 (64 queries: one query is 0.016 of acc@1).
INT8_COSINE_MEAN_MIN = 0.98
INT8_COSINE_MIN = 0.95
INT8_METRIC_MAX_DELTA = 0.05
INT8_TRAINED_METRIC_DELTA = 0.005  # the target for uAP and acc@1, trained weights


class CalibrationError(ValueError):
    """Calibration input that cannot be used (exit status 2): the message says why."""


@dataclass
class Calibration:
    """Calibration tensors, float32 `[3, H, W]` each, preprocessed as served."""

    tensors: list[np.ndarray]
    sources: list[str]  # where each tensor came from
    sha256: set[str]  # of the encoded files used, so that the report can hold them out
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, why)
    bundled: bool = False  # the package's photographs (no --calibration)
    folder: str | None = None

    def describe(self) -> str:
        where = ("the bundled photographs (8 distractor photographs x 4 variants); real "
                 "images from your own distribution calibrate better: --calibration DIR"
                 if self.bundled else self.folder or "given tensors")
        skipped = f", {len(self.skipped)} files skipped" if self.skipped else ""
        return f"{len(self.tensors)} calibration images from {where}{skipped}"


def check_method(method: str, preprocess: spec.Preprocess, size: int | None) -> None:
    """CalibrationError when `method` cannot calibrate `size` images of `preprocess`."""
    if method not in METHODS:
        raise CalibrationError(f"--calibration-method {method}: one of {', '.join(METHODS)}")
    if method == "minmax":
        return
    if not preprocess.square:
        raise CalibrationError(f"--calibration-method {method} needs one input shape for all "
                               f"images; {preprocess.name} keeps each image's aspect ratio: "
                               "use minmax")
    if size is not None and size > HISTOGRAM_MAX_IMAGES:
        raise CalibrationError(f"--calibration-size {size}: {method} holds every image's "
                               f"activations in memory (~120 MB each); at most "
                               f"{HISTOGRAM_MAX_IMAGES}, or use minmax")


def default_size(method: str) -> int:
    return DEFAULT_CALIBRATION_SIZE if method == "minmax" else HISTOGRAM_MAX_IMAGES


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def bundled_calibration(preprocess: spec.Preprocess) -> Calibration:
    """The 8 distractor photographs of the copy-detection set, each as is, mirrored,
    3/4-cropped and rotated by 10 degrees (32 images). The 8 originals and their 64 edits
    stay out, for the report."""
    from PIL import ImageOps

    data = copyset.dataset(edits=())
    refs = dict(data["references"])
    photos = dict(samples.photographs())
    tensors, names = [], []
    for name in data["distractors"]:
        img = photos[name]
        w, h = img.size
        for label, v in (("", img), (" mirrored", ImageOps.mirror(img)),
                         (" cropped", img.crop((0, 0, w * 3 // 4, h * 3 // 4))),
                         (" rotated", img.rotate(10))):
            tensors.append(images.to_tensor(v, preprocess))
            names.append(name + label)
    return Calibration(tensors, names, {_sha(refs[n]) for n in data["distractors"]},
                       bundled=True)


def folder_calibration(folder: str, preprocess: spec.Preprocess, size: int | None = None,
                       max_pixels: int = spec.MAX_IMAGE_PIXELS,
                       method: str = DEFAULT_METHOD) -> Calibration:
    """Up to `size` (default `default_size(method)`) images of `folder` (recursive), read
    and preprocessed as the server does (images.load_tensor), drawn in a seeded shuffled
    order so that no one subfolder fills the set. Raises CalibrationError for a missing
    or empty folder, no decodable image, fewer images than `size` asks for, or a size or
    preprocessing `method` cannot take."""
    flag = f"--calibration {folder}"
    if not os.path.isdir(folder):
        raise CalibrationError(f"{flag}: {'not a folder' if os.path.exists(folder) else 'no such folder'}")
    paths = sorted(os.path.join(root, f) for root, _, names in os.walk(folder) for f in names)
    if not paths:
        raise CalibrationError(f"{flag}: the folder holds no files")
    if size is not None and size < 1:
        raise CalibrationError(f"--calibration-size {size}: must be >= 1")
    check_method(method, preprocess, size)
    want = size or default_size(method)
    random.Random(0).shuffle(paths)
    tensors, used, shas, skipped = [], [], set(), []
    for path in paths:
        if len(tensors) == want:
            break
        # the client's reader: regular files only (a FIFO would block), size-capped
        data, why = sources.read_problem(path, MAX_FILE_BYTES)
        try:
            if why:
                raise images.ImageError(why)
            tensors.append(images.load_tensor(data, preprocess, max_pixels))
        except images.ImageError as e:
            skipped.append((path, str(e)))
            continue
        used.append(path)
        shas.add(_sha(data))
    if not tensors:
        raise CalibrationError(f"{flag}: none of its {len(paths)} files is a decodable image "
                               f"(first: {skipped[0][0]}: {skipped[0][1]})")
    if size is not None and len(tensors) < size:
        raise CalibrationError(f"{flag}: {len(tensors)} decodable images, fewer than "
                               f"--calibration-size {size} ({len(skipped)} files skipped)")
    return Calibration(tensors, used, shas, skipped, folder=folder)


def _batches(tensors: list[np.ndarray], method: str = DEFAULT_METHOD):
    """Calibration feeds: stacks of BATCH for minmax when every tensor has one shape, else
    one each (the histogram methods stack every feed's outputs: they must all match)."""
    step = BATCH if method == "minmax" and len({t.shape for t in tensors}) == 1 else 1
    for i in range(0, len(tensors), step):
        yield {spec.INPUT_NAME: np.stack(tensors[i:i + step])}


def head_nodes(model) -> list[str]:
    """Names of the nodes after the trunk's final ReLU (GeM, Linear, L2): kept fp32."""
    from sscd_triton.export import fp16

    g = model.graph
    end = fp16.trunk_end(g)
    for i, n in enumerate(g.node):
        if not n.name:
            n.name = f"{n.op_type}_{i}"  # the quantiser excludes nodes by name
    return [n.name for n in g.node[end + 1:]]


def recorded_calibration(metadata: dict[str, str]) -> Calibration | None:
    """The calibration an int8 ONNX of `quantize` records in its metadata (`metadata`: its
    metadata_props as a dict, or an ONNX Runtime session's custom_metadata_map): its files'
    sha256, no tensors, for measuring it later on photographs it was not calibrated on.
    None when the ONNX records none (not written by `quantize`)."""
    if META_SHA256 not in metadata:
        return None
    shas = {s for s in metadata[META_SHA256].split(",") if s}
    return Calibration([], [], shas, folder="(recorded in the ONNX)")


def quantize(fp32_onnx: bytes, calibration: Calibration, target: str,
             method: str = DEFAULT_METHOD) -> bytes:
    """The int8 QDQ graph of `fp32_onnx` (export_onnx's graph: `images` float32
    [N,3,H,W] -> `descriptors` float32 [N,dims]; input and output stay float32) for
    `target` ("cpu" or "gpu", see the module docstring), calibrated on `calibration`."""
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          QuantType, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if target not in TARGET_ACTIVATIONS:
        raise ValueError(f"target {target!r}: one of {', '.join(TARGET_ACTIVATIONS)}")
    if method not in METHODS:
        raise ValueError(f"calibration method {method!r}: one of {', '.join(METHODS)}")
    if method != "minmax" and (len({t.shape for t in calibration.tensors}) > 1
                               or len(calibration.tensors) > HISTOGRAM_MAX_IMAGES):
        raise ValueError(f"{method} calibration takes at most {HISTOGRAM_MAX_IMAGES} images "
                         "of one shape (check_method)")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = _batches(calibration.tensors, method)

        def get_next(self):
            return next(self.feeds, None)

    symmetric = target == "gpu"
    # gpu: biases stay float (TensorRT folds them into its int8 kernels itself; its Q/DQ
    # layers take int8, not the int32 DequantizeLinear ONNX Runtime writes for biases).
    extra = {"ActivationSymmetric": symmetric, "QuantizeBias": not symmetric}
    if method == "percentile":
        extra["CalibPercentile"] = PERCENTILE
    with tempfile.TemporaryDirectory(prefix="sscd-int8-") as tmp:
        src, pre, out = (os.path.join(tmp, f) for f in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        with open(src, "wb") as f:
            f.write(fp32_onnx)
        # Shape inference: the quantiser needs every tensor's shape. No graph optimisation
        # here (the exporter already folded BatchNorm into the convolutions, and ONNX
        # Runtime fuses the rest when it loads the QDQ graph); it would reorder the nodes
        # that trunk_end finds the head by.
        quant_pre_process(src, pre, skip_optimization=True)
        model = onnx.load(pre)
        exclude = head_nodes(model)
        onnx.save(model, pre)
        quantize_static(
            pre, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
            weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
            calibrate_method={"minmax": CalibrationMethod.MinMax,
                              "percentile": CalibrationMethod.Percentile,
                              "entropy": CalibrationMethod.Entropy}[method],
            extra_options=extra)
        graph = onnx.load(out)
    graph.producer_name = "sscd-triton"
    for key, value in ((META_TARGET, target), (META_METHOD, method),
                       (META_SHA256, ",".join(sorted(calibration.sha256)))):
        graph.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(graph)
    return graph.SerializeToString()


# --- what int8 costs ----------------------------------------------------------------------

def _held_out(calibration: Calibration) -> dict:
    """The copy-detection set without any photograph calibration used (by content)."""
    data = copyset.dataset()
    used = {name for name, b in data["references"] if _sha(b) in calibration.sha256}
    data["references"] = [(n, b) for n, b in data["references"] if n not in used]
    data["queries"] = [(q, b) for q, b in data["queries"] if data["source"][q] not in used]
    data["ground_truth"] = {(q, r) for q, r in data["ground_truth"] if r not in used}
    data["originals"] = [n for n in data["originals"] if n not in used]
    data["distractors"] = [n for n in data["distractors"] if n not in used]
    return data


def _describe(run, encoded: list[bytes], preprocess: spec.Preprocess) -> np.ndarray:
    xs = [images.load_tensor(b, preprocess) for b in encoded]
    if preprocess.square:
        return np.concatenate([run(np.stack(xs[i:i + BATCH])) for i in range(0, len(xs), BATCH)])
    return np.concatenate([run(x[None]) for x in xs])


def cost_checks(fp32_run, int8_run, preprocess: spec.Preprocess,
                calibration: Calibration) -> tuple[list[Check], dict]:
    """What int8 costs against fp32 (`*_run`: float32 [N,3,H,W] -> [N,dims]) on the
    copy-detection set less every photograph `calibration` used: descriptor agreement on
    the held-out photographs, plain cosine to fp32 over them and their edited copies, and
    uAP / acc@1 / recall@P90 of both side by side. Returns (checks, figures)."""
    data = _held_out(calibration)
    if len(data["originals"]) < 2:  # e.g. a calibration folder holding the bundled photographs
        used = len(copyset.dataset(edits=())["originals"]) - len(data["originals"])
        return [Check("int8 vs fp32", False, f"nothing to measure on: calibration used {used} "
                      "of the 8 bundled originals; calibrate on other images")], {}
    refs, queries = data["references"], data["queries"]
    encoded = [b for _, b in refs] + [b for _, b in queries]
    ref32 = _describe(fp32_run, encoded, preprocess)
    ref8 = _describe(int8_run, encoded, preprocess)
    n = len(refs)
    photos = parity.measure(ref8[:n], ref32[:n])
    cos = np.sum(ref8 * ref32, axis=1)
    r_ids, q_ids = [i for i, _ in refs], [i for i, _ in queries]
    m32 = copyset.evaluate(q_ids, ref32[n:], r_ids, ref32[:n], data["ground_truth"], 10).summary()
    m8 = copyset.evaluate(q_ids, ref8[n:], r_ids, ref8[:n], data["ground_truth"], 10).summary()
    delta = {k: m8[k] - m32[k] for k in copyset.METRICS}
    figures = {"held_out_photographs": n, "held_out_queries": len(queries),
               "parity": photos.as_dict(), "cosine_mean": float(cos.mean()),
               "cosine_min": float(cos.min()), "fp32": {k: m32[k] for k in copyset.METRICS},
               "int8": {k: m8[k] for k in copyset.METRICS}, "delta": delta}
    gallery = f"{len(queries)} queries, {n} references"
    checks = parity.checks(f"int8 vs fp32 ({n} held-out photographs)", photos, exact=False,
                           per_measure=True, int8=True) + [
        Check(f"int8 vs fp32: cosine mean / min ({len(cos)} held-out images)",
              bool(cos.mean() >= INT8_COSINE_MEAN_MIN and cos.min() >= INT8_COSINE_MIN),
              f"{cos.mean():.4f} / {cos.min():.4f}",
              f">= {INT8_COSINE_MEAN_MIN} / {INT8_COSINE_MIN}"),
    ]
    for k in copyset.METRICS:
        checks.append(Check(f"copy detection {k}: fp32 -> int8 ({gallery})",
                            bool(abs(delta[k]) <= INT8_METRIC_MAX_DELTA),
                            f"{m32[k]:.4f} -> {m8[k]:.4f} ({delta[k]:+.4f})",
                            f"|diff| <= {INT8_METRIC_MAX_DELTA} (trained-weights target "
                            f"{INT8_TRAINED_METRIC_DELTA})"))
    return checks, figures
