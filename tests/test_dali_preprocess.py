"""The gpu target's preprocessing: the generated, autoserialized `dali.py`
(export/dali_pipeline.py), checked as a file and run here on the CPU against the PIL reference.

Everything runs the very file the server loads: `run_cpu` writes `dali.py`, imports it as the
dali_backend does and builds its pipeline with `decoder_device="cpu", device_id=None`; only
the decoder differs from the served graph (libjpeg-turbo here, nvJPEG there).

Descriptor parity uses calibrated weights (conftest.reference_model: random weights whose
BatchNorm statistics were estimated, so activations have a trained scale), never a
default-initialised SSCD, and the discriminative measures of ../shared/triton/NOTES.md.
"""
from __future__ import annotations

import ast
import os

import numpy as np
import pytest

dali = pytest.importorskip(
    "nvidia.dali", reason="nvidia.dali is not installed (pip install nvidia-dali-cuda120); "
    "the gpu target's preprocessing is a DALI pipeline")
torch = pytest.importorskip("torch")

from conftest import reference_model  # noqa: E402
from nvidia.dali._utils.autoserialize import _discover_autoserialize  # noqa: E402
from PIL import Image  # noqa: E402

from sscd_triton.serving import dali_pipeline  # noqa: E402
from sscd_triton import images, parity, samples, spec  # noqa: E402

FORMATS = {"JPEG": {"quality": 95}, "PNG": {}}
BORDER = 2  # pixels: DALI replicates edge pixels where PIL renormalises its filter taps

# Pixel error of DALI (CPU) vs PIL, in uint8 levels (|difference| * 255 * std), measured on
# the 16 samples.photographs() (DALI 2.4.0, Pillow of requirements.txt), square320/short288
# x JPEG q95/PNG:
# - inside the outer 2 pixels: max 1.0 (uint8 rounding: PIL rounds between its two resize
#   passes, DALI does not; about 15% of values differ by one level);
# - the outer 2 pixels (edge handling of the filter): max 8-10 (motorcycle_left, hubble);
# - mean |difference| per image: max 0.185-0.200, overall mean 0.137-0.152.
# Without antialiasing (a plausible regression) the same measures give max 110-115 inside,
# mean 4.6-5.7: these bounds catch it.
INTERIOR_MAX_LEVELS = 1.5
MAX_LEVELS = 12.0
MEAN_LEVELS = 0.25

# Descriptor parity with reference_model() on the same 16 photographs and 4 combinations:
# within spec's RESAMPLED_* bounds (spec gives the measured figures), not the 0.999 / 0.05 of
# a bit-exact pipeline, which the old default-initialised SSCD passed at ratio 0.012.


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    return [img for _, img in samples.photographs()]


@pytest.fixture(scope="module")
def model():
    return reference_model("resnet50")


def _describe(model, tensors: list[np.ndarray]) -> np.ndarray:
    """Descriptors `[N, 512]`, one batch per distinct tensor shape (short288 shapes vary)."""
    out = np.empty((len(tensors), 512), np.float32)
    with torch.inference_mode():
        for shape in {t.shape for t in tensors}:
            idx = [i for i, t in enumerate(tensors) if t.shape == shape]
            out[idx] = model(torch.from_numpy(np.stack([tensors[i] for i in idx]))).numpy()
    return out


def _levels(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a - b| of two normalised `[3, H, W]` tensors in uint8 levels."""
    return np.abs(a - b) * (255.0 * np.asarray(spec.STD, np.float32))[:, None, None]


# --- the generated file ------------------------------------------------------------------

@pytest.fixture(scope="module", params=list(spec.PREPROCESS))
def generated(request, tmp_path_factory):
    """(preprocess, max_pixels, path of the written dali.py, its source)."""
    pre, max_pixels = spec.PREPROCESS[request.param], 12_345_678
    path = tmp_path_factory.mktemp(pre.name) / dali_pipeline.FILENAME
    dali_pipeline.write_dali_py(path, pre, max_pixels)
    return pre, max_pixels, path, path.read_text()


def _literal(tree: ast.Module, name: str):
    for node in tree.body:
        if isinstance(node, ast.Assign) and [t.id for t in node.targets] == [name]:
            return ast.literal_eval(node.value)
    raise AssertionError(f"{name} is not assigned a literal at module level")


def _pipeline_function(tree: ast.Module) -> ast.FunctionDef:
    (fn,) = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    return fn


def test_generated_file_imports_only_dali(generated):
    # The serving image has none of this project: the file must stand alone.
    tree = ast.parse(generated[3])
    modules = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import"
            modules.append(node.module)
    assert modules and all(m == "nvidia.dali" or m.startswith("nvidia.dali.") for m in modules), modules
    assert not any(isinstance(n, ast.Call) and getattr(n.func, "id", "") in ("__import__", "exec", "eval")
                   for n in ast.walk(tree))


def test_generated_constants_are_spec(generated):
    pre, max_pixels, _, source = generated
    tree = ast.parse(source)
    assert _literal(tree, "INPUT_NAME") == spec.ENSEMBLE_INPUT
    assert _literal(tree, "SIZE") == pre.size
    assert _literal(tree, "SQUARE") is pre.square
    assert _literal(tree, "MEAN") == tuple(spec.MEAN)
    assert _literal(tree, "STD") == tuple(spec.STD)
    assert _literal(tree, "MAX_PIXELS") == max_pixels
    assert _literal(tree, "REFUSE_OP") == dali_pipeline.REFUSE_OP


def test_generated_pipeline_is_autoserialized_with_fancy_upsampling(generated):
    fn = _pipeline_function(ast.parse(generated[3]))
    assert fn.name == dali_pipeline.PIPELINE_FUNCTION
    # Outermost first: autoserialize marks the pipeline_def (dali_backend README).
    decorators = [ast.unparse(d) for d in fn.decorator_list]
    assert decorators[0] == "autoserialize" and decorators[1].startswith("pipeline_def(")
    # The backend calls the function with no arguments: the defaults are the served graph.
    args = {a.arg: ast.literal_eval(d) for a, d in zip(fn.args.args[::-1], fn.args.defaults[::-1])}
    assert args == {"decoder_device": "mixed"} and len(fn.args.args) == 1
    (decode,) = [n for n in ast.walk(fn) if isinstance(n, ast.Call)
                 and ast.unparse(n.func) == "fn.decoders.image"]
    kw = {k.arg: ast.unparse(k.value) for k in decode.keywords}
    assert kw["device"] == "decoder_device"
    assert kw["jpeg_fancy_upsampling"] == "True"
    assert kw["adjust_orientation"] == "False"


def test_generated_file_imports_without_gpu_and_backend_finds_one_pipeline(generated):
    # What the server's `python3 -c` does before serializing (model_provider.h): import the
    # file, discover the @autoserialize functions. Importing builds nothing (no GPU here).
    module = dali_pipeline.load_dali_py(generated[2])
    found = _discover_autoserialize(module, visited=[])
    assert found == [getattr(module, dali_pipeline.PIPELINE_FUNCTION)]


def test_default_graph_is_the_gpu_graph(generated):
    # The graph the backend serializes: defaults, with only the device id dropped (CUDA is
    # absent here; the backend supplies its own). Read from DALI's built graph, not bytes.
    pipe = getattr(dali_pipeline.load_dali_py(generated[2]), dali_pipeline.PIPELINE_FUNCTION)(
        device_id=None)
    pipe._build_graph()
    ops = {}
    for op in pipe._ops:
        text = str(op.spec)
        schema = text.splitlines()[0].removeprefix("OpSpec for ").rstrip(":")
        ops[schema] = (op.spec.OutputDevice(0), text)
    device, text = ops["decoders__Image"]
    assert device == "gpu" and "device: mixed" in text and "jpeg_fancy_upsampling: True" in text
    assert ops["Resize"][0] == ops["CropMirrorNormalize"][0] == "gpu"
    assert ops["ExternalSource"][0] == ops["PeekImageShape"][0] == ops["Reshape"][0] == "cpu"


def test_write_dali_py_replaces_atomically(tmp_path):
    path = tmp_path / "dali.py"
    path.write_text("stale")
    dali_pipeline.write_dali_py(path, spec.PREPROCESS["square320"], spec.MAX_IMAGE_PIXELS)
    assert path.read_text() == dali_pipeline.dali_py_source(spec.PREPROCESS["square320"])
    assert os.listdir(tmp_path) == ["dali.py"]


# --- the generated pipeline, run on the CPU, against PIL --------------------------------

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
    err = [_levels(d, r) for d, r in zip(dali_t, ref_t)]
    interior = max(float(e[:, BORDER:-BORDER, BORDER:-BORDER].max()) for e in err)
    worst = max(float(e.max()) for e in err)
    mean = max(float(e.mean()) for e in err)
    p = parity.measure(_describe(model, dali_t), _describe(model, ref_t))
    print(f"\n[dali-cpu vs PIL] {preset} {fmt}: n={p.n} levels: interior max {interior:.2f} "
          f"max {worst:.2f} mean {mean:.3f} | centered_cosine_min={p.centered_cosine_min:.5f} "
          f"nearest_ratio_max={p.nearest_ratio_max:.4f} top1={p.top1}/{p.n}")
    assert interior <= INTERIOR_MAX_LEVELS
    assert worst <= MAX_LEVELS
    assert mean <= MEAN_LEVELS
    assert parity.pipeline_failures(p, resampled=True) == []


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
