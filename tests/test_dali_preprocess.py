"""The DALI preprocessing (export/dali_pipeline.py) against the PIL reference, on the CPU.

The CPU variant of the pipeline runs the same resize and normalisation as the served GPU
one; only the decoder differs (libjpeg-turbo here, nvJPEG there). Parity is measured on
descriptors of a random-weight SSCD, centred, as ../shared/triton/NOTES.md prescribes.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

dali = pytest.importorskip(
    "nvidia.dali", reason="nvidia.dali is not installed (pip install nvidia-dali-cuda120); "
    "the gpu target's preprocessing is a DALI pipeline")
torch = pytest.importorskip("torch")
skimage = pytest.importorskip("skimage")
sklearn_datasets = pytest.importorskip("sklearn.datasets")

from PIL import Image  # noqa: E402

from export import dali_pipeline  # noqa: E402
from export.model import SSCD  # noqa: E402
from sscd_triton import images, parity, spec  # noqa: E402

# Real photographs of varied sizes and aspects; chelsea (451x300 -> 432.96) and
# motorcycle (741x500 -> 426.8) have long edges where truncation and rounding differ.
SKIMAGE_FILES = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg",
                 "motorcycle_left.png", "hubble_deep_field.jpg")
SKLEARN_FILES = ("china.jpg", "flower.jpg")
FORMATS = {"JPEG": {"quality": 95}, "PNG": {}}


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    data_dir = os.path.join(os.path.dirname(skimage.__file__), "data")
    out = [Image.open(os.path.join(data_dir, f)).convert("RGB") for f in SKIMAGE_FILES]
    out += [Image.fromarray(sklearn_datasets.load_sample_image(f)) for f in SKLEARN_FILES]
    return out


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return SSCD("resnet50", 512).eval()


def _describe(model, tensors: list[np.ndarray]) -> np.ndarray:
    """Descriptors `[N, 512]`, one batch per distinct tensor shape (short288 shapes vary)."""
    out = np.empty((len(tensors), model.dims), np.float32)
    with torch.inference_mode():
        for shape in {t.shape for t in tensors}:
            idx = [i for i, t in enumerate(tensors) if t.shape == shape]
            out[idx] = model(torch.from_numpy(np.stack([tensors[i] for i in idx]))).numpy()
    return out


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("preset", list(spec.PREPROCESS))
def test_dali_matches_pil_reference(photos, model, preset, fmt):
    pre = spec.PREPROCESS[preset]
    encoded = [images.encode(p, fmt, **FORMATS[fmt]) for p in photos]
    dali_t = dali_pipeline.run_cpu(pre, encoded)
    ref_t = [images.load_tensor(b, pre) for b in encoded]
    for p, d, r in zip(photos, dali_t, ref_t):
        assert d.dtype == np.float32
        assert d.shape == r.shape == (3, *pre.output_hw(*p.size)), (p.size, d.shape, r.shape)
    pixel_err = max(float(np.abs(d - r).max()) for d, r in zip(dali_t, ref_t))
    p = parity.measure(_describe(model, dali_t), _describe(model, ref_t))
    print(f"\n[dali-cpu vs PIL] {preset} {fmt}: n={p.n} "
          f"centered_cosine_min={p.centered_cosine_min:.6f} "
          f"nearest_ratio_max={p.nearest_ratio_max:.4f} top1={p.top1}/{p.n} "
          f"max_abs_descriptor={p.max_abs:.2e} max_abs_tensor={pixel_err:.3f}")
    assert parity.pipeline_failures(p) == []


@pytest.mark.parametrize("size", [(1001, 577), (577, 1001), (451, 300), (300, 451),
                                  (289, 288), (100, 3000), (288, 288)])
def test_short288_size_is_truncated_like_torchvision(size):
    # DALI's own resize_shorter would round 288*1001/577 = 499.6 to 500; torchvision gives 499.
    pre = spec.PREPROCESS["short288"]
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    (out,) = dali_pipeline.run_cpu(pre, [images.encode(img, "PNG")])
    assert out.shape == (3, *pre.output_hw(*size))


def test_exif_orientation_is_ignored():
    img = Image.new("RGB", (120, 60), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 60, 60))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW": upstream's PIL path does not apply it
    data = images.encode(img, "JPEG", quality=95, exif=exif.tobytes())
    pre = spec.PREPROCESS["short288"]
    (out,) = dali_pipeline.run_cpu(pre, [data])
    ref = images.load_tensor(data, pre)
    assert out.shape == ref.shape == (3, 288, 576)
    assert np.abs(out - ref).max() < 0.05


def test_oversized_image_fails_the_batch_before_decoding():
    # The limit is at least the 320 x 320 output, as load_tensor also refuses a larger output.
    pre, limit = spec.PREPROCESS["square320"], 400 * 300
    small = images.encode(Image.new("RGB", (400, 300), (10, 200, 30)), "PNG")
    assert len(dali_pipeline.run_cpu(pre, [small, small], max_pixels=limit)) == 2
    with pytest.raises(RuntimeError, match="reshape"):
        dali_pipeline.run_cpu(pre, [small, images.encode(Image.new("RGB", (401, 300)), "PNG")],
                              max_pixels=limit)


def test_extreme_aspect_ratio_fails_the_batch_like_load_tensor(photos):
    # 3 x 4000 = 12,000 source pixels pass, but short288 would resize it to 288 x 384,000.
    pre, limit = spec.PREPROCESS["short288"], 1_000_000
    strip = images.encode(Image.new("RGB", (4000, 3), (200, 20, 20)), "PNG")
    photo = images.encode(photos[0], "PNG")
    with pytest.raises(images.ImageError, match="extreme aspect ratio"):
        images.load_tensor(strip, pre, max_pixels=limit)
    assert len(dali_pipeline.run_cpu(pre, [photo], max_pixels=limit)) == 1
    with pytest.raises(RuntimeError, match="reshape"):
        dali_pipeline.run_cpu(pre, [photo, strip], max_pixels=limit)


@pytest.mark.parametrize("preset", list(spec.PREPROCESS))
def test_serialize_writes_model_dali(tmp_path, preset):
    path = tmp_path / "model.dali"
    dali_pipeline.serialize(spec.PREPROCESS[preset], 8, path)
    blob = path.read_bytes()
    assert len(blob) > 0
    # The served graph: the named input and the GPU (mixed) decoder, even without a GPU here.
    assert spec.ENSEMBLE_INPUT.encode() in blob and b"mixed" in blob
