"""export/build_tensorrt.py without TensorRT: profiles, the fp32 island, the exit statuses.

Nothing here builds or runs a TensorRT plan (this machine has no GPU and no TensorRT).
The layer selection is exercised on a real exported SSCD graph and on a network
*simulated* from it the way onnx-tensorrt names layers and tensors; the real parse and
build are left to a GPU machine.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import types

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from export import build_tensorrt, fp16, onnx_export, tensorrt_plan as tp
from export.model import SSCD
from sscd_triton import spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAD = ["/Clip", "/Pow", "/ReduceMean", "/Pow_1", "/fc/Gemm", "/ReduceL2", "/Clip_1",
        "/Expand", "/Div"]


@pytest.fixture(scope="module")
def graph():
    """A real SSCD ResNet50 export (random weights), as export_onnx writes it."""
    return onnx_export.to_onnx(SSCD("resnet50", 512).eval())


@pytest.fixture(scope="module")
def onnx_path(graph, tmp_path_factory):
    path = tmp_path_factory.mktemp("trt") / "sscd.onnx"
    onnx.save(graph, str(path))
    return str(path)


def shapes_of(*argv):
    return tp.profile_shapes(build_tensorrt.parse_args(["--onnx", "m.onnx", *argv]))


# --- profiles --------------------------------------------------------------------------

def test_default_profile_is_square320_batches_1_32_64():
    assert shapes_of() == {spec.INPUT_NAME: ((1, 3, 320, 320), (32, 3, 320, 320),
                                             (64, 3, 320, 320))}


def test_static_size_fixes_height_and_width():
    lo, opt, hi = shapes_of("--size", "288", "--min-batch", "2", "--opt-batch", "8",
                            "--max-batch", "16")[spec.INPUT_NAME]
    assert (lo, opt, hi) == ((2, 3, 288, 288), (8, 3, 288, 288), (16, 3, 288, 288))


def test_dynamic_sizes_take_s_or_hxw():
    lo, opt, hi = shapes_of("--min-size", "224", "--opt-size", "288x384",
                            "--max-size", "512x640")[spec.INPUT_NAME]
    assert (lo, opt, hi) == ((1, 3, 224, 224), (32, 3, 288, 384), (64, 3, 512, 640))


@pytest.mark.parametrize("argv,message", [
    (["--min-batch", "8", "--opt-batch", "4"], "need --min-batch <= --opt-batch <= --max-batch"),
    (["--opt-batch", "128"], "need --min-batch <= --opt-batch <= --max-batch"),
    (["--min-batch", "0"], "--min-batch 0: must be >= 1"),
    (["--size", "320", "--max-size", "400"], "--size fixes H = W; drop --max-size"),
    (["--min-size", "224", "--max-size", "512"], "missing --opt-size"),
    (["--min-size", "320", "--opt-size", "288", "--max-size", "512"],
     "H: --min-size 320, --opt-size 288, --max-size 512: need --min-size <= --opt-size"),
    (["--min-size", "224", "--opt-size", "288x700", "--max-size", "512"], "W: "),
    (["--min-size", "16", "--opt-size", "288", "--max-size", "512"],
     "--min-size 16: H and W must be >= 32"),
    (["--min-size", "224", "--opt-size", "288", "--max-size", "big"],
     "--max-size 'big': expected S or HxW"),
    (["--size", "288x320"], "--size 288x320: give one number"),
    (["--size", "abc"], "--size 'abc': expected S or HxW"),
])
def test_bad_profiles_name_the_flag(argv, message):
    with pytest.raises(tp.InputError) as e:
        shapes_of(*argv)
    assert message in str(e.value)


def _tiny_graph(h, w):
    x = helper.make_tensor_value_info(spec.INPUT_NAME, TensorProto.FLOAT, ["N", 3, h, w])
    y = helper.make_tensor_value_info(spec.OUTPUT_NAME, TensorProto.FLOAT, ["N", 3, h, w])
    relu = helper.make_node("Relu", [spec.INPUT_NAME], [spec.OUTPUT_NAME])
    return helper.make_model(helper.make_graph([relu], "g", [x], [y]))


def test_profile_must_keep_the_sizes_the_onnx_fixes():
    tp.check_profile(shapes_of("--size", "288"), _tiny_graph(288, 288), "m.onnx")
    tp.check_profile(shapes_of("--min-size", "64", "--opt-size", "320", "--max-size", "900"),
                     _tiny_graph("H", "W"), "m.onnx")
    with pytest.raises(tp.InputError, match=r"fixes images axis 2 \(H\) at 288.*pass --size 288"):
        tp.check_profile(shapes_of(), _tiny_graph(288, 288), "m.onnx")


def test_parity_plan_follows_the_profile():
    assert tp.parity_size(shapes_of("--size", "288")) == (True, 288, "")
    wide = shapes_of("--min-size", "224", "--opt-size", "320", "--max-size", "512")
    assert tp.parity_size(wide) == (True, None, "")
    run, size, note = tp.parity_size(shapes_of("--min-size", "224", "--opt-size", "288",
                                               "--max-size", "300"))
    assert (run, size) == (True, 300) and "does not cover small_288" in note
    run, _, note = tp.parity_size(shapes_of("--min-size", "64x400", "--opt-size", "64x400",
                                            "--max-size", "100x500"))
    assert not run and "no square" in note


# --- the fp32 island -------------------------------------------------------------------

def test_island_is_gem_linear_and_l2_after_the_last_relu(graph):
    island = tp.fp32_island(graph)
    end = fp16.trunk_end(graph.graph)
    assert island.boundary == graph.graph.node[end].output[0]
    assert list(island.nodes) == tp.fp32_layer_names(graph) == HEAD
    assert "/Shape" not in island.nodes  # int64 output: shape arithmetic stays as it is
    trunk = {tp.node_name(n) for n in graph.graph.node[: end + 1]}
    assert not trunk & set(island.nodes)
    consts = {n.output[0] for n in graph.graph.node[end + 1:] if n.op_type == "Constant"}
    assert consts and consts <= island.tensors  # GeM's eps, p, 1/p and L2's eps
    assert {"backbone.fc.weight", "backbone.fc.bias"} <= island.tensors


def test_island_of_an_fp16_onnx_starts_after_its_cast(graph):
    half = fp16.half_trunk(graph)
    island = tp.fp32_island(half)
    assert island.boundary.endswith("_fp32") and list(island.nodes) == HEAD
    assert tp.is_fp16_onnx(half) and not tp.is_fp16_onnx(graph)


def test_a_graph_without_gem_has_no_island():
    with pytest.raises(ValueError):
        tp.fp32_island(_tiny_graph(64, 64))


UNNAMED = "(Unnamed Layer* 999) [Constant]"


def simulate_network(model: onnx.ModelProto, gemm_suffix: str = "_57") -> list[tp.LayerInfo]:
    """Layers as onnx-tensorrt would add them: one per node, named after it; initializers
    and Constant outputs read as weights, except where an op needs them as tensors (Pow's
    exponent, the Gemm's weights: constant layers named after the tensor); the Gemm split
    into a matrix multiply and a suffixed bias add; Shape and Expand's shape integer-typed.
    Extra constant layers check that a constant is pinned exactly when the island alone
    reads it, whatever its name: `trunk_scale` feeds the first Conv, `shared` that Conv
    and the final Div, an unnamed one only the L2 norm's Clip."""
    g = model.graph
    weights = {i.name for i in g.initializer}
    weights |= {n.output[0] for n in g.node if n.op_type == "Constant"}
    first_conv = next(n.name for n in g.node if n.op_type == "Conv")
    layers = [tp.LayerInfo("trunk_scale", (), ("trunk_scale_out",), (True,)),
              tp.LayerInfo("shared", (), ("shared_out",), (True,))]
    for n in g.node:
        if n.op_type == "Constant":
            continue
        name = tp.node_name(n)
        ins = tuple(i for i in n.input if i and i not in weights)
        if n.op_type == "Pow":
            layers.append(tp.LayerInfo(n.input[1], (), (n.input[1],), (True,)))
            ins += (n.input[1],)
        if n.name == first_conv:
            ins += ("trunk_scale_out", "shared_out")
        if n.op_type == "Div":
            ins += ("shared_out",)
        if name == "/Clip_1":
            layers.append(tp.LayerInfo(UNNAMED, (), (UNNAMED + "_output",), (True,)))
            ins += (UNNAMED + "_output",)
        if n.op_type == "Gemm":
            layers += [tp.LayerInfo(w, (), (w,), (True,)) for w in n.input[1:]]
            layers.append(tp.LayerInfo(name, (ins[0], n.input[1]), ("mm_out",), (True,)))
            layers.append(tp.LayerInfo(name + gemm_suffix, ("mm_out", n.input[2]), tuple(n.output),
                                       (True,)))
            continue
        if n.op_type == "Expand":
            layers.append(tp.LayerInfo(name + "_88", (n.input[1],), ("expand_shape",), (False,)))
            ins = (n.input[0], "expand_shape")
        floats = (n.op_type != "Shape",)
        layers.append(tp.LayerInfo(name, ins, tuple(n.output), floats * len(n.output)))
    return layers


def test_pinned_layers_on_the_simulated_network(graph):
    layers = simulate_network(graph)
    island = tp.fp32_island(graph)
    pinned = [layers[i].name for i in tp.select_fp32_layers(layers, island)]
    consts = [n.input[1] for n in graph.graph.node if n.op_type == "Pow"]  # p and 1/p
    assert set(pinned) == set(HEAD) | {"/fc/Gemm_57", "backbone.fc.weight", "backbone.fc.bias",
                                       UNNAMED, *consts}
    assert "/Shape" not in pinned and "/Expand_88" not in pinned  # integer outputs
    assert "trunk_scale" not in pinned and "shared" not in pinned and not any(p.startswith(("/layer", "/conv1", "/maxpool"))
                                                   for p in pinned)
    # The same island found in the fp16 ONNX's network.
    half = fp16.half_trunk(graph)
    half_layers = simulate_network(half)
    chosen = tp.select_fp32_layers(half_layers, tp.fp32_island(half))
    half_pinned = {half_layers[i].name for i in chosen}
    assert half_pinned == set(pinned) and "cast_trunk_fp32" not in half_pinned


def test_selection_refuses_a_network_it_cannot_place(graph):
    island = tp.fp32_island(graph)
    layers = simulate_network(graph)
    cut = [l for l in layers if island.boundary not in l.inputs]
    with pytest.raises(ValueError, match="no layer reads the trunk output"):
        tp.select_fp32_layers(cut, island)
    renamed = [tp.LayerInfo(l.name, l.inputs, tuple("x" if o == spec.OUTPUT_NAME else o
                                                    for o in l.outputs), l.float_outputs)
               for l in layers]
    with pytest.raises(ValueError, match="not downstream of the trunk"):
        tp.select_fp32_layers(renamed, island)


# --- the CLI's exit statuses -----------------------------------------------------------

@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError


def run_main(capsys, *argv):
    status = build_tensorrt.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_bad_input_exits_2_before_looking_for_tensorrt(onnx_path, tmp_path, capsys, monkeypatch):
    def forbidden():
        raise AssertionError("TensorRT was looked for before the inputs were checked")
    monkeypatch.setattr(tp, "open_builder", forbidden)
    small = str(tmp_path / "small.pt")
    torch.save(SSCD("resnet50", 256).state_dict(), small)
    notonnx = tmp_path / "notes.onnx"
    notonnx.write_text("not a graph")
    plan = str(tmp_path / "m.plan")
    cases = [
        (["--onnx", str(tmp_path / "missing.onnx")], "no such file"),
        (["--onnx", str(notonnx)], "not an ONNX model"),
        (["--onnx", onnx_path, "--output", str(tmp_path / "nodir" / "m.plan")], "does not exist"),
        (["--onnx", onnx_path, "--output", str(tmp_path)], "is a directory"),
        (["--onnx", onnx_path, "--output", plan, "--min-batch", "9", "--opt-batch", "4"],
         "--min-batch <= --opt-batch"),
        (["--onnx", onnx_path, "--output", plan, "--workspace-gib", "0"], "--workspace-gib"),
        (["--onnx", onnx_path, "--output", plan, "--timing-cache", str(tmp_path)],
         "--timing-cache"),
        (["--onnx", onnx_path, "--output", plan, "--checkpoint", str(tmp_path / "no.pt")],
         "--checkpoint"),
        (["--onnx", onnx_path, "--output", plan, "--checkpoint", small], "256-d descriptors"),
    ]
    for argv, message in cases:
        status, out, err = run_main(capsys, *argv)
        assert status == 2, (argv, err)
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
        assert out == ""
    assert not os.path.exists(plan)


def test_flag_syntax_errors_are_one_line_status_2(onnx_path, capsys):
    with pytest.raises(SystemExit) as e:
        build_tensorrt.main(["--onnx", onnx_path, "--max-batch", "many"])
    _, err = capsys.readouterr()
    assert e.value.code == 2
    assert err == "error: argument --max-batch: invalid int value: 'many'\n"


def test_no_tensorrt_exits_3_in_one_line(onnx_path, tmp_path, capsys, no_tensorrt):
    plan = tmp_path / "m.plan"
    status, out, err = run_main(capsys, "--onnx", onnx_path, "--output", str(plan))
    assert status == 3 and out == ""
    assert err == f"error: {tp.NO_TENSORRT}; no plan written\n"
    assert list(tmp_path.iterdir()) == []


def test_tensorrt_without_a_gpu_exits_3(onnx_path, tmp_path, capsys, monkeypatch):
    fake = types.ModuleType("tensorrt")
    fake.__version__ = "10.0.0"

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    def builder(logger):
        raise TypeError("pybind11::init(): factory function returned nullptr")

    fake.Logger, fake.Builder = Logger, builder
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    status, out, err = run_main(capsys, "--onnx", onnx_path, "--output", str(tmp_path / "m.plan"))
    assert status == 3 and out == "" and err.count("\n") == 1
    assert "TensorRT 10.0.0 found no usable CUDA GPU" in err and "no plan written" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None,
                    reason="TensorRT is installed here")
def test_cli_without_tensorrt_prints_one_line_and_no_traceback(onnx_path, tmp_path):
    plan = tmp_path / "m.plan"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "export", "build_tensorrt.py"),
                           "--onnx", onnx_path, "--output", str(plan)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [f"error: {tp.NO_TENSORRT}; no plan written"]
    assert not plan.exists() and list(tmp_path.iterdir()) == []
