"""The one source of truth: names, shapes, preprocessing constants and model facts.

Export, the model repository, the client, tests and benchmarks import from here;
nothing else in the project spells these values out again.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

# --- Preprocessing (upstream README: ImageNet statistics, RGB in [0, 1]) -------------
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
CHANNELS = 3


@dataclass(frozen=True)
class Preprocess:
    """One upstream preprocessing mode.

    `square` resizes to (size, size) ignoring aspect (upstream `skew_320`); otherwise the
    short edge goes to `size`, aspect kept (upstream `small_288`).
    """

    name: str
    upstream_name: str
    size: int
    square: bool

    def output_hw(self, width: int, height: int) -> tuple[int, int]:
        """(H, W) of the tensor this mode makes from a `width` x `height` image.

        Mirrors torchvision's `Resize(int)`: the long edge is truncated, not rounded.
        """
        if self.square:
            return self.size, self.size
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(self.size * long / short)
        return (new_long, self.size) if width <= height else (self.size, new_long)


PREPROCESS = {
    "square320": Preprocess("square320", "skew_320", 320, square=True),
    "short288": Preprocess("short288", "small_288", 288, square=False),
}


def square(size: int) -> Preprocess:
    """Upstream's skew mode at another size (a `--static-size` export, a smoke check)."""
    return PREPROCESS["square320"] if size == 320 else \
        Preprocess(f"square{size}", f"skew_{size}", size, square=True)
DEFAULT_PREPROCESS = "square320"

# --- The descriptor model -------------------------------------------------------------
GEM_P = 3.0
GEM_EPS = 1e-6
L2_EPS = 1e-12
ONNX_OPSET = 17
# int8: explicit Q/DQ, calibrated (sscd_triton.export.int8); the graph's input and output
# stay float32 in every precision.
PRECISIONS = ("fp32", "fp16", "int8")
MIN_INPUT_SIZE = 32  # the trunk downsamples 32x: smaller inputs leave no feature map

INPUT_NAME = "images"  # float32 [N, 3, H, W], normalised as above
OUTPUT_NAME = "descriptors"  # float32 [N, dims], unit L2 norm


@dataclass(frozen=True)
class Trunk:
    name: str
    blocks: tuple[int, int, int, int]
    groups: int
    width_per_group: int


TRUNKS = {
    "resnet50": Trunk("resnet50", (3, 4, 6, 3), groups=1, width_per_group=64),
    "resnext101_32x4d": Trunk("resnext101_32x4d", (3, 4, 23, 3), groups=32, width_per_group=4),
}


@dataclass(frozen=True)
class PublishedModel:
    name: str
    data: str
    trunk: str
    dims: int
    layouts: tuple[str, ...]


_ALL = ("classy", "torchvision", "torchscript")
PUBLISHED_MODELS = {
    m.name: m
    for m in (
        PublishedModel("sscd_disc_blur", "DISC", "resnet50", 512, _ALL),
        PublishedModel("sscd_disc_advanced", "DISC", "resnet50", 512, _ALL),
        PublishedModel("sscd_disc_mixup", "DISC", "resnet50", 512, _ALL),
        PublishedModel("sscd_disc_large", "DISC", "resnext101_32x4d", 1024, ("classy", "torchscript")),
        PublishedModel("sscd_imagenet_blur", "ImageNet", "resnet50", 512, _ALL),
        PublishedModel("sscd_imagenet_advanced", "ImageNet", "resnet50", 512, _ALL),
        PublishedModel("sscd_imagenet_mixup", "ImageNet", "resnet50", 512, _ALL),
    )
}


def published_model(path: str) -> PublishedModel | None:
    """The published model a file is named after (`<name>.<layout>.pt`), if any."""
    return PUBLISHED_MODELS.get(os.path.basename(path).split(".")[0])

# --- Serving (Triton model repository) ------------------------------------------------
ENSEMBLE_NAME = "sscd"
ENSEMBLE_INPUT = "image"  # TYPE_UINT8 [-1]: the encoded file bytes, one image per batch item
ENSEMBLE_OUTPUT = OUTPUT_NAME
PREPROCESS_MODEL = "sscd_preprocess"
DESCRIPTOR_MODEL = "sscd_descriptor"
# gpu only: the python-backend step ahead of DALI that refuses incomplete files
# (images.check_complete); it passes the input on as CHECKED_NAME, uint8 [-1].
CHECK_MODEL = "sscd_check"
CHECKED_NAME = "image_checked"
# Images per request sscd-embed sends by default (--batch-size); the gpu repository sizes its
# in-flight bound, memory pool and CUDA graphs for requests of this many images.
CLIENT_BATCH = 16
# A PNG of a few KB can claim 60000 x 60000 pixels; refuse anything larger before decoding.
MAX_IMAGE_PIXELS = 40_000_000
# Model identity, written by the repository into every config's `parameters` and read by
# clients, so that an output is never resumed with descriptors of another model.
PARAM_MODEL_NAME = "sscd_model"  # e.g. "sscd_disc_mixup", or the demo label
PARAM_WEIGHTS_SHA256 = "sscd_weights_sha256"  # sha256 of the exported descriptor ONNX
PARAM_PREPROCESS = "preprocess"  # spec.PREPROCESS key
PARAM_PRECISION = "sscd_precision"  # of the served descriptor ONNX: one of PRECISIONS
# The PARAM_MODEL_NAME of a repository built without a checkpoint; every report says so.
DEMO_MODEL_NAME = "demo-untrained"
DEMO_NOTE = (f"{DEMO_MODEL_NAME} weights: the descriptors mean nothing for copy detection "
             "(build the repository with --checkpoint, see docs/models.md)")

# docker/entrypoint.sh puts the admin protocols (statistics, model-config, shared memory...)
# behind this header; over gRPC Triton expects it with the prefix (its error message says so).
ADMIN_HEADER = "sscd-admin-key"
GRPC_ADMIN_HEADER = f"triton-grpc-protocol-{ADMIN_HEADER}"

# How the server words a refused image; clients parse these to isolate bad files.
BAD_IMAGE_PREFIX = "bad image: "
BAD_ROW = "item {index} of the request: "
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")

# --- Parity bounds (../shared/triton/NOTES.md: random weights make plain cosines meaningless)
FP32_MAX_ABS = 1e-4
# Pipeline parity (fp16, or the same pixels through another runtime): centred cosine >= and
# error / distance to the nearest other image <=, with top-1 agreement on every image.
CENTERED_COSINE_MIN = 0.999
NEAREST_RATIO_MAX = 0.05
# Another decoder/resampler (DALI, nvJPEG + torch resize) is not bit-exact with PIL: about
# 15% of values differ by one uint8 level (PIL rounds between its two resize passes). On
# calibrated random weights (tests/conftest.py reference_model) and the 16 sample photographs
# that alone measures, for DALI's CPU path, centred cosine 0.9917-0.9949 and ratio 0.16-0.20
# (square320/short288 x JPEG/PNG), top-1 16/16; for scale, a mild copy (JPEG re-encoded at
# quality 50) measures 0.89-0.91 / 0.63-0.66 on the same photographs. These bounds sit a
# quarter above the first, far below the second (tests/test_dali_preprocess.py).
RESAMPLED_CENTERED_COSINE_MIN = 0.99
RESAMPLED_NEAREST_RATIO_MAX = 0.25
# int8 against fp32 (or PyTorch) on held-out photographs (sscd_triton.export.int8). Measured
# on calibrated test weights, 8 held-out photographs: good quantisation centred cosine 0.82
# (cpu form) / 0.71 (gpu's symmetric form), ratio 0.48 / 0.66, top-1 8/8; two activation
# scales swapped: 0.20 / 1.17, top-1 5/8; calibrated on one black image: -0.25 / 2.3, top-1
# 3/8. Random weights put every photograph near every other, so trained weights sit far
# inside these; a broken quantisation lands far outside (tests/test_int8.py).
INT8_CENTERED_COSINE_MIN = 0.5
INT8_NEAREST_RATIO_MAX = 0.8
