"""ONNX export: parity with PyTorch for every layout and both precisions, dynamic shapes."""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import onnx
import pytest
import torch

from sscd_triton.cli import export_onnx
from sscd_triton import runtime, spec

CASES = [(layout, precision) for layout in ("torchvision", "classy", "torchscript", "classy_large")
         for precision in ("fp32", "fp16")]


@pytest.fixture(scope="session")
def exported(ckpts, tmp_path_factory):
    """Each (layout, precision) exported once: (exit status, stdout, model path)."""
    paths, _ = ckpts
    d = tmp_path_factory.mktemp("onnx")
    done = {}

    def get(layout, precision, *extra):
        key = (layout, precision, *extra)
        if key not in done:
            out = str(d / f"{layout}-{precision}{''.join(extra)}.onnx")
            import contextlib, io
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                status = export_onnx.main(["--checkpoint", paths[layout], "--output", out,
                                           "--precision", precision, *extra])
            done[key] = (status, buf.getvalue(), out)
        return done[key]
    return get


@pytest.mark.parametrize("layout,precision", CASES)
def test_export_passes_every_parity_check(exported, layout, precision):
    status, log, path = exported(layout, precision)
    print(log)
    assert status == 0, log
    report = json.load(open(os.path.splitext(path)[0] + ".parity.json"))
    assert report["passed"] and report["precision"] == precision
    names = [c["name"] for c in report["checks"]]
    assert names[:2] == [f"io {spec.INPUT_NAME}", f"io {spec.OUTPUT_NAME}"]
    for b in (1, 3, 16):
        assert f"skew_320 batch {b}" in names
    assert any(n.startswith("small_288") for n in names)
    assert all(c["ok"] for c in report["checks"])
    if precision == "fp32":
        assert max(c["figures"].get("max_abs", 0) for c in report["checks"]) <= 1e-4
    else:
        last = report["checks"][-1]["figures"]
        assert last["centered_cosine_min"] >= 0.999 and last["nearest_ratio_max"] <= 0.05


@pytest.mark.parametrize("layout", ["torchvision", "torchscript", "classy_large"])
def test_fp16_graph_keeps_gem_and_norm_in_fp32(exported, layout):
    _, _, path = exported(layout, "fp16")
    g = onnx.shape_inference.infer_shapes(onnx.load(path))
    FLOAT, HALF = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*g.graph.value_info, *g.graph.input, *g.graph.output]}
    types.update({i.name: i.data_type for i in g.graph.initializer})
    names = [n.name for n in g.graph.node]
    cut = names.index("cast_trunk_fp32")
    trunk, head = g.graph.node[1:cut], g.graph.node[cut + 1:]
    convs = [n for n in trunk if n.op_type == "Conv"]
    assert convs and all(types[n.input[1]] == HALF for n in convs)
    for node in head:  # every float tensor GeM, the Linear and the norm touch is fp32
        for t in [*node.input, *node.output]:
            assert types.get(t, FLOAT) in (FLOAT, onnx.TensorProto.INT64), (node.op_type, t)
            if node.op_type != "Shape":
                assert t in types or t == "", f"no type inferred for {t}"
    consts = {n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t)
              for n in head if n.op_type == "Constant"}
    pows = [n for n in head if n.op_type == "Pow"]
    exps = sorted(float(consts[n.input[1]]) if n.input[1] in consts
                  else float(onnx.numpy_helper.to_array(
                      next(i for i in g.graph.initializer if i.name == n.input[1])))
                  for n in pows)
    assert exps == pytest.approx([1 / 3, 3.0], abs=1e-7)  # not fp16-rounded 0.33325
    assert g.graph.input[0].type.tensor_type.elem_type == FLOAT
    assert g.graph.output[0].type.tensor_type.elem_type == FLOAT


@pytest.mark.parametrize("batch,h,w", [(1, 288, 384), (16, 320, 320), (1, 512, 288), (3, 288, 384)])
def test_dynamic_shapes(exported, ckpts, batch, h, w):
    _, refs = ckpts
    _, _, path = exported("torchvision", "fp32")
    run = runtime.onnx_runner(runtime.onnx_session(path))
    x = torch.randn(batch, 3, h, w, generator=torch.manual_seed(batch + h))
    with torch.no_grad():
        ref = refs["torchvision"](x).numpy()
    out = run(x.numpy())
    assert out.shape == (batch, 512)
    assert np.abs(out - ref).max() <= 1e-4


def test_static_size_fixes_height_and_width(exported):
    status, log, path = exported("torchvision", "fp32", "--static-size", "320")
    assert status == 0, log
    sess = runtime.onnx_session(path)
    shape = sess.get_inputs()[0].shape
    assert shape[1:] == [3, 320, 320] and not isinstance(shape[0], int)
    assert "skip" in log and "fixed 320x320" in log


def test_checker_and_opset(exported):
    _, _, path = exported("classy", "fp32")
    g = onnx.load(path)
    onnx.checker.check_model(g)
    assert max(o.version for o in g.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert [i.name for i in g.graph.input] == [spec.INPUT_NAME]
    assert [o.name for o in g.graph.output] == [spec.OUTPUT_NAME]


def test_no_partial_model_is_left_when_export_fails(ckpts, tmp_path, monkeypatch):
    out = tmp_path / "m.onnx"
    assert export_onnx.main(["--checkpoint", str(tmp_path / "missing.pt"), "--output", str(out)]) == 2
    assert list(tmp_path.iterdir()) == []

    from sscd_triton import runtime

    def broken_session(model, *args, **kwargs):  # fails once the model is serialized
        # (the serialized bytes, or a temporary file holding them)
        assert (len(model) if isinstance(model, bytes) else os.path.getsize(model)) > 0
        raise RuntimeError("simulated failure while loading the written model")

    monkeypatch.setattr(runtime, "onnx_session", broken_session)
    with pytest.raises(RuntimeError, match="simulated"):
        export_onnx.main(["--checkpoint", ckpts[0]["torchvision"], "--output", str(out)])
    assert list(tmp_path.iterdir()) == []


def test_next_line_names_the_command_as_it_was_run(exported, monkeypatch):
    from sscd_triton.cli._main import command

    status, log, path = exported(CASES[0][0], CASES[0][1])
    assert f"Next: python export/build_repository.py --onnx {path} --checkpoint " in log
    monkeypatch.setattr(sys, "argv", ["/venv/bin/sscd-export-onnx"])
    assert command("export/build_repository.py") == "sscd-build-repository"
    monkeypatch.setattr(sys, "argv", ["/venv/lib/site-packages/sscd_triton/cli/export_onnx.py"])
    assert command("export/build_repository.py") == "python -m sscd_triton.cli.build_repository"
    monkeypatch.setattr(sys, "argv", ["export/export_onnx.py"])
    assert command("export/build_repository.py") == "python export/build_repository.py"
