"""int8: calibration input, the Q/DQ graph per target, the report's bounds (a good
quantisation passes, broken ones fail), and an int8 cpu repository served end to end.

The weights are tests/conftest.py's calibrated random ResNet50 (every photograph near every
other, so the report's discriminative measures are what is checked, not plain cosines)."""
from __future__ import annotations

import os
import shutil
import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from sscd_triton import runtime, samples, spec
from sscd_triton.copydetect import copyset
from sscd_triton.cli import build_repository as build_cli
from sscd_triton.cli import export_onnx
from sscd_triton.client.io import identity_conflict, load_embeddings
from sscd_triton.export import int8, onnx_export, onnx_graph
from sscd_triton.export.trt_errors import InputError
from conftest import embed, reference_model

SQUARE = spec.PREPROCESS["square320"]
HEAD = {"Pow", "ReduceMean", "Gemm", "MatMul", "ReduceL2", "Div"}


@pytest.fixture(scope="module")
def fp32():
    return onnx_export.to_onnx(reference_model()).SerializeToString()


@pytest.fixture(scope="module")
def calibration_dir(tmp_path_factory):
    """The copy-detection set's 8 distractor photographs as shipped, a text file and a
    truncated JPEG (both skipped and reported, never fatal)."""
    folder = tmp_path_factory.mktemp("calibration")
    data = copyset.dataset(edits=())
    for name in data["distractors"]:
        shutil.copy(os.path.join(samples.FOLDER, name), folder / name)
    (folder / "notes.txt").write_text("not an image")
    head = (folder / data["distractors"][0]).read_bytes()
    (folder / "sub").mkdir()
    (folder / "sub" / "cut.jpg").write_bytes(head[: len(head) // 3])
    return folder


@pytest.fixture(scope="module")
def calibration(calibration_dir):
    return int8.folder_calibration(str(calibration_dir), SQUARE)


@pytest.fixture(scope="module")
def cpu8(fp32, calibration):
    return onnx.load_from_string(int8.quantize(fp32, calibration, "cpu"))


@pytest.fixture(scope="module")
def gpu8(fp32, calibration):
    return onnx.load_from_string(int8.quantize(fp32, calibration, "gpu"))


def runner(model):
    return runtime.onnx_runner(runtime.onnx_session(model.SerializeToString()))


def measure(fp32, model, calibration):
    return int8.cost_checks(runtime.onnx_runner(runtime.onnx_session(fp32)), runner(model),
                            SQUARE, calibration)


def zero_points(model) -> list[np.ndarray]:
    inits = {i.name: i for i in model.graph.initializer}
    return [numpy_helper.to_array(inits[n.input[2]]) for n in model.graph.node
            if n.op_type == "QuantizeLinear"]


# --- calibration input ---------------------------------------------------------------------

def test_folder_calibration_reads_as_served_and_accounts_for_every_file(calibration,
                                                                        calibration_dir):
    assert len(calibration.tensors) == 8 and not calibration.bundled
    assert all(t.shape == (3, 320, 320) and t.dtype == np.float32 for t in calibration.tensors)
    skipped = {os.path.relpath(p, calibration_dir): why for p, why in calibration.skipped}
    assert set(skipped) == {"notes.txt", os.path.join("sub", "cut.jpg")}
    assert "not an image" in skipped["notes.txt"]
    assert "8 calibration images" in calibration.describe()
    assert "2 files skipped" in calibration.describe()


def test_bundled_calibration_keeps_the_originals_out():
    cal = int8.bundled_calibration(SQUARE)
    data = copyset.dataset(edits=())
    assert cal.bundled and len(cal.tensors) == 32
    assert {s.split(" ")[0] for s in cal.sources} == set(data["distractors"])
    assert "--calibration DIR" in cal.describe()


@pytest.mark.parametrize("make, flags, message", [
    (None, [], "no such folder"),
    ("file", [], "not a folder"),
    ("empty", [], "holds no files"),
    ("text", [], "none of its 1 files is a decodable image"),
    ("one", ["--calibration-size", "2"], "1 decodable images, fewer than --calibration-size 2"),
    ("one", ["--calibration-size", "0"], "--calibration-size 0: must be >= 1"),
    ("one", ["--calibration-method", "entropy", "--calibration-size", "40"], "at most 32"),
    ("one", ["--calibration-method", "percentile", "--preprocess", "short288"],
     "needs one input shape for all images"),
])
def test_bad_calibration_input_is_one_line_exit_2(make, flags, message, tmp_path, capsys):
    folder = tmp_path / "cal"
    if make == "file":
        folder.write_text("x")
    elif make:
        folder.mkdir()
    if make == "text":
        (folder / "a.txt").write_text("x")
    if make == "one":
        shutil.copy(samples.photograph_paths()[0], folder)
    for main in (export_onnx.main, build_cli.main):
        out = tmp_path / "out.onnx" if main is export_onnx.main else tmp_path / "repo"
        status = main(["--precision", "int8", "--calibration", str(folder), *flags,
                       "--output", str(out)])
        err = capsys.readouterr().err
        assert status == 2 and err.count("\n") == 1 and message in err, err
        assert err.startswith("error: --calibration") and not out.exists()


def test_histogram_methods_calibrate_any_count_of_square_images(fp32, calibration):
    """percentile stacks every feed's activations: 9 images (not a multiple of the minmax
    batch) must not give ragged feeds; the method is recorded in the ONNX."""
    nine = int8.Calibration(calibration.tensors + calibration.tensors[:1], ["x"] * 9,
                            calibration.sha256)
    model = onnx.load_from_string(int8.quantize(fp32, nine, "cpu", "percentile"))
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta[int8.META_METHOD] == "percentile" and meta[int8.META_TARGET] == "cpu"
    assert int8.recorded_calibration(meta).sha256 == calibration.sha256 and len(calibration.sha256) == 8
    assert int8.recorded_calibration({}) is None
    with pytest.raises(ValueError, match="at most 32 images of one shape"):
        int8.quantize(fp32, int8.Calibration([nine.tensors[0][:, :64, :64], nine.tensors[0]],
                                             ["a", "b"], set()), "cpu", "entropy")


def test_a_report_with_nothing_held_out_fails(fp32, cpu8):
    data = copyset.dataset(edits=())
    everything = int8.Calibration([], [], {int8._sha(b) for _, b in data["references"]})
    checks, figures = measure(fp32, cpu8, everything)
    assert [c.ok for c in checks] == [False] and "calibration used 8 of the 8" in checks[0].detail


def test_an_int8_onnx_on_the_onnxruntime_fallback_is_refused(gpu8, tmp_path, capsys):
    path = tmp_path / "sscd8.onnx"
    onnx.save(gpu8, str(path))
    status = build_cli.main(["--target", "gpu", "--descriptor", "onnxruntime", "--onnx",
                             str(path), "--output", str(tmp_path / "repo")])
    err = capsys.readouterr().err
    assert status == 2 and "drop --descriptor onnxruntime" in err and err.count("\n") == 1


def test_calibration_flags_need_int8(tmp_path, capsys):
    for main in (export_onnx.main, build_cli.main):
        for flags in (["--calibration", str(tmp_path)], ["--calibration-method", "entropy"]):
            status = main([*flags, "--output", str(tmp_path / "x.onnx")])
            err = capsys.readouterr().err
            assert status == 2 and "--precision int8 only" in err and err.count("\n") == 1, err
            assert err.startswith(f"error: {flags[0]}")
    status = export_onnx.main(["--int8-target", "gpu", "--output", str(tmp_path / "x.onnx")])
    err = capsys.readouterr().err
    assert status == 2 and err == "error: --int8-target: for --precision int8 only\n"


def test_int8_on_the_onnxruntime_fallback_is_refused(tmp_path, capsys):
    status = build_cli.main(["--target", "gpu", "--descriptor", "onnxruntime", "--precision",
                             "int8", "--output", str(tmp_path / "repo")])
    err = capsys.readouterr().err
    assert status == 2 and "drop --descriptor onnxruntime" in err and err.count("\n") == 1


# --- the graphs ------------------------------------------------------------------------------

def test_cpu_form_uint8_activations_gpu_form_symmetric_int8(cpu8, gpu8):
    assert onnx_graph.onnx_precision(cpu8) == onnx_graph.onnx_precision(gpu8) == "int8"
    assert {z.dtype.name for z in zero_points(cpu8)} == {"uint8"}
    assert {z.dtype.name for z in zero_points(gpu8)} == {"int8"}
    assert not any(z.any() for z in zero_points(gpu8))
    assert onnx_graph.int8_problems(gpu8) == []
    assert onnx_graph.int8_problems(cpu8) == ["Q/DQ with int32 zero points",  # its biases
                                              "Q/DQ with uint8 zero points"]
    with pytest.raises(InputError, match="cpu form of int8.*--int8-target gpu"):
        onnx_graph.resolve_precision("auto", cpu8, "m.onnx")
    assert onnx_graph.resolve_precision("auto", gpu8, "m.onnx") == "int8"
    with pytest.raises(InputError, match="is an int8 graph"):
        onnx_graph.resolve_precision("fp16", gpu8, "m.onnx")


@pytest.mark.parametrize("form", ["cpu8", "gpu8"])
def test_the_head_stays_fp32_and_io_float32(form, request):
    model = request.getfixturevalue(form)
    dequantized = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    head = [n for n in model.graph.node if n.op_type in HEAD]
    assert head and not [n.name for n in head if set(n.input) & dequantized]
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert len(convs) == 53 and all(n.input[0] in dequantized and n.input[1] in dequantized
                                    for n in convs)  # every trunk convolution runs int8
    f32 = onnx.TensorProto.FLOAT
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [f32]
    assert [o.type.tensor_type.elem_type for o in model.graph.output] == [f32]


# --- the report: good passes, broken fails -----------------------------------------------------

@pytest.mark.parametrize("form", ["cpu8", "gpu8"])
def test_good_quantisation_passes_on_held_out_images(form, request, fp32, calibration):
    checks, figures = measure(fp32, request.getfixturevalue(form), calibration)
    assert all(c.ok for c in checks), [(c.name, c.detail) for c in checks if not c.ok]
    # the calibration folder held the 8 distractors' exact files: they are held out
    assert figures["held_out_photographs"] == 8 and figures["held_out_queries"] == 64
    names = " ".join(c.name for c in checks)
    for key in ("centered cosine", "nearest other", "top-1", "cosine mean / min", "uAP",
                "acc@1", "recall@P90"):
        assert key in names


def swapped_scales(model) -> onnx.ModelProto:
    """Two activation scales exchanged (a Q/DQ pair keeps its shared initializer)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    inits = {i.name: i for i in model.graph.initializer}
    qs = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    a, b = inits[qs[20].input[1]], inits[qs[40].input[1]]
    va, vb = numpy_helper.to_array(a).copy(), numpy_helper.to_array(b).copy()
    assert va != vb
    a.CopyFrom(numpy_helper.from_array(vb, a.name))
    b.CopyFrom(numpy_helper.from_array(va, b.name))
    return model


def test_broken_quantisations_fail_the_report(fp32, cpu8, calibration):
    black = int8.Calibration([np.stack([np.zeros((320, 320), np.float32)] * 3)
                              - np.asarray(spec.MEAN, np.float32)[:, None, None]
                              / np.asarray(spec.STD, np.float32)[:, None, None]],
                             ["black"], set())
    uncalibrated = onnx.load_from_string(int8.quantize(fp32, black, "cpu"))
    for broken in (swapped_scales(cpu8), uncalibrated):
        checks, _ = measure(fp32, broken, calibration)
        failed = {c.name.split(": ")[-1] for c in checks if c.ok is False}
        assert failed & {"error / nearest other (max)", "top-1 agreement"}, failed


# --- served ------------------------------------------------------------------------------------

def test_int8_cpu_repository_serves_what_onnx_runtime_gives(triton, calibration, tmp_path):
    """export -> int8 cpu repository -> tritonserver -> sscd-embed: the descriptors equal the
    int8 ONNX run in process, the configs say int8, and an fp32 output refuses them."""
    from sscd_triton.serving.build import build_repository
    from sscd_triton.serving.server import TritonServer

    built = build_repository(str(tmp_path / "repo"), "cpu", str(triton.checkpoint),
                             precision="int8", calibration=calibration, max_batch=8)
    assert built.passed and built.precision == "int8" and built.serving.precision == "int8"
    for name in (spec.ENSEMBLE_NAME, spec.PREPROCESS_MODEL, spec.DESCRIPTOR_MODEL):
        text = (tmp_path / "repo" / name / "config.pbtxt").read_text()
        assert f'key: "{spec.PARAM_PRECISION}"\n  value {{\n    string_value: "int8"' in text
    photos = samples.photograph_paths()[:6]
    run = runtime.onnx_runner(runtime.onnx_session(built.onnx))
    from sscd_triton import images

    want = {p: run(images.load_tensor(open(p, "rb").read(), SQUARE)[None])[0] for p in photos}
    fp32_out = tmp_path / "fp32"
    r = embed(*photos[:2], "--output", fp32_out, "--quiet", url=triton.server.grpc_url)
    assert r.returncode == 0, r.stderr
    server = TritonServer(tmp_path / "repo", log_path=tmp_path / "int8.log").start()
    try:
        out = tmp_path / "int8"
        r = embed(*photos, "--output", out, "--quiet", url=server.grpc_url)
        assert r.returncode == 0, r.stderr
        ids, emb = load_embeddings(str(out))
        worst = max(float(np.abs(e - want[i]).max()) for i, e in zip(ids.tolist(), emb))
        assert sorted(ids.tolist()) == sorted(photos) and worst <= 1e-5, worst
        r = embed(*photos, "--output", fp32_out, "--quiet", url=server.grpc_url)
        lines = [x for x in r.stderr.splitlines() if x.startswith("error:")]
        assert r.returncode == 2 and len(lines) == 1 and "int8" in lines[0], r.stderr
        assert "use another --output" in lines[0]
    finally:
        server.stop()


def test_gpu_repository_int8_is_a_symmetric_qdq_onnx_and_a_strongly_typed_recipe(
        calibration_dir, tmp_path, capsys):
    """build_repository.py --target gpu --precision int8: the served ONNX is TensorRT's form
    (static 320, symmetric Q/DQ), the plan recipe builds it strongly typed with no implicit
    int8 flag, and every config records int8."""
    from sscd_triton.serving import repository

    repo = tmp_path / "repo"
    status = build_cli.main(["--target", "gpu", "--precision", "int8", "--calibration",
                             str(calibration_dir), "--output", str(repo)])
    out = capsys.readouterr().out
    assert status == 0, out[-3000:]
    assert "calibrating int8 for the gpu target (int8 symmetric activations" in out
    assert "PASS  int8 vs fp32 (8 held-out photographs): top-1 agreement" in out
    model = onnx.load(str(repo / spec.DESCRIPTOR_MODEL / "1" / "model.onnx"))
    assert onnx_graph.onnx_precision(model) == "int8" and onnx_graph.int8_problems(model) == []
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims[1:] == [3, 320, 320]
    recipe = repository.read_recipe((repo / spec.DESCRIPTOR_MODEL / repository.PLAN_RECIPE)
                                    .read_text())
    assert "--stronglyTyped" in recipe and not [a for a in recipe
                                                if "int8" in a.lower() or "calib" in a.lower()]
    for name in (spec.ENSEMBLE_NAME, spec.PREPROCESS_MODEL, spec.DESCRIPTOR_MODEL):
        cfg = repository.parse_pbtxt((repo / name / "config.pbtxt").read_text())
        assert cfg.parameters[spec.PARAM_PRECISION].string_value == "int8"


def test_precision_is_compared_only_when_both_sides_know_it():
    base = {"model": "sscd", "model_version": "1", "sscd_model": "m", "weights_sha256": "a" * 64,
            "preprocess": "square320", "preprocess_on": "server", "dims": 512}
    old = dict(base)  # written before precision was recorded: resumes as before
    assert not identity_conflict(old, {**base, "precision": "fp32"})
    assert identity_conflict({**base, "precision": "fp32"}, {**base, "precision": "int8"})
    assert not identity_conflict({**base, "precision": "int8"}, {**base, "precision": "int8"})


def test_cpu_share_follows_the_cgroup_quota(tmp_path):
    """0 (ONNX Runtime's own default) unless a v2 or v1 quota grants fewer CPUs."""
    cpus = len(os.sched_getaffinity(0))
    quota, none = tmp_path / "cpu.max", str(tmp_path / "none")
    quota.write_text("max 100000\n")
    assert runtime.cpu_share(str(quota), none) == 0
    quota.write_text("100000 100000\n")
    assert runtime.cpu_share(str(quota), none) == (1 if cpus > 1 else 0)
    quota.write_text("50000 100000\n")  # half a CPU still gets one thread
    assert runtime.cpu_quota(str(quota), none) == 1
    assert runtime.cpu_share(none, none) == 0
    v1 = tmp_path / "cpu"
    v1.mkdir()
    (v1 / "cpu.cfs_quota_us").write_text("100000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert runtime.cpu_quota(none, str(v1 / "cpu.cfs_quota_us")) == 1
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert runtime.cpu_quota(none, str(v1 / "cpu.cfs_quota_us")) is None


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
