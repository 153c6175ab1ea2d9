"""export/build_tensorrt.py without a GPU: profiles, the ONNX's precision, the exit
statuses, and the builder driven through a fake `tensorrt` with TensorRT 11's API surface.

This machine has no GPU and no TensorRT. The fake module mirrors the Python bindings
(NVIDIA/TensorRT python/src/infer/pyCore.cpp at 11.1 and release/10.13): 11.x has no
reduced-precision builder flags, no precision constraints, no explicit-batch flag, layers
without settable precision or output types, and STRONGLY_TYPED = 0; 10.x keeps the old
names and has STRONGLY_TYPED = 1. A removed name raises AttributeError as the real
bindings do, and the fake records every flag the builder sets, clears or creates a
network with. The real parse and build are left to a GPU machine.
"""
from __future__ import annotations

import enum
import importlib.util
import json
import os
import subprocess
import sys
import tokenize
import types

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from sscd_triton.cli import build_tensorrt
from sscd_triton.export import fp16, onnx_export, onnx_graph, trt_build, trt_profile
from sscd_triton.export.trt_errors import InputError
from sscd_triton.export.model import SSCD, gem
from sscd_triton import spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIMS = 512


class TinySSCD(nn.Module):
    """SSCD's head (GeM p=3, Linear, L2 normalisation, as export/model.py) on a one-conv
    trunk: the same exported head ops as ResNet50, traced in a fraction of a second."""

    def __init__(self, dims: int = DIMS):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=32, padding=1)
        self.fc = nn.Linear(8, dims)

    def forward(self, images):
        return F.normalize(self.fc(gem(F.relu(self.conv(images)))), dim=1, eps=spec.L2_EPS)


@pytest.fixture(scope="module")
def graph():
    torch.manual_seed(0)
    return onnx_export.to_onnx(TinySSCD().eval())


@pytest.fixture(scope="module")
def half(graph):
    """What export_onnx --precision fp16 writes: fp16 trunk, fp32 GeM/Linear/L2."""
    return fp16.half_trunk(graph)


def all_half(model: onnx.ModelProto) -> onnx.ModelProto:
    """A generic converter's fp16 graph: every float weight and constant fp16, casts only
    at the graph's input and output (GeM and L2 in half precision)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    for init in g.initializer:
        if init.data_type == TensorProto.FLOAT:
            init.CopyFrom(numpy_helper.from_array(
                numpy_helper.to_array(init).astype(np.float16), init.name))
    for n in g.node:
        for a in n.attribute:
            if n.op_type == "Constant" and a.name == "value" and a.t.data_type == TensorProto.FLOAT:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float16)))
    for n in g.node:
        n.input[:] = [spec.INPUT_NAME + "_h" if i == spec.INPUT_NAME else i for i in n.input]
        n.output[:] = [spec.OUTPUT_NAME + "_h" if o == spec.OUTPUT_NAME else o for o in n.output]
    nodes = [helper.make_node("Cast", [spec.INPUT_NAME], [spec.INPUT_NAME + "_h"],
                              to=TensorProto.FLOAT16), *g.node,
             helper.make_node("Cast", [spec.OUTPUT_NAME + "_h"], [spec.OUTPUT_NAME],
                              to=TensorProto.FLOAT)]
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]
    onnx.checker.check_model(model)
    return model


def save(model, tmp_path_factory, name):
    path = tmp_path_factory.mktemp("trt") / name
    onnx.save(model, str(path))
    return str(path)


@pytest.fixture(scope="module")
def onnx_path(graph, tmp_path_factory):
    return save(graph, tmp_path_factory, "sscd.onnx")


def quantised(graph, target: str) -> onnx.ModelProto:
    """What export_onnx --precision int8 --int8-target TARGET writes (Q/DQ trunk)."""
    from sscd_triton.export import int8

    rng = np.random.default_rng(0)
    cal = int8.Calibration([rng.standard_normal((3, 320, 320), np.float32) for _ in range(4)],
                           ["noise"] * 4, set())
    return onnx.load_from_string(int8.quantize(graph.SerializeToString(), cal, target))


@pytest.fixture(scope="module")
def int8_path(graph, tmp_path_factory):
    return save(quantised(graph, "gpu"), tmp_path_factory, "sscd8.onnx")


@pytest.fixture(scope="module")
def int8_cpu_path(graph, tmp_path_factory):
    return save(quantised(graph, "cpu"), tmp_path_factory, "sscd8cpu.onnx")


@pytest.fixture(scope="module")
def half_path(half, tmp_path_factory):
    return save(half, tmp_path_factory, "sscd16.onnx")


def shapes_of(*argv):
    return build_tensorrt.profile_of(build_tensorrt.parse_args(["--onnx", "m.onnx", *argv]))


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
    with pytest.raises(InputError) as e:
        shapes_of(*argv)
    assert message in str(e.value)


def _tiny_graph(h, w):
    x = helper.make_tensor_value_info(spec.INPUT_NAME, TensorProto.FLOAT, ["N", 3, h, w])
    y = helper.make_tensor_value_info(spec.OUTPUT_NAME, TensorProto.FLOAT, ["N", 3, h, w])
    relu = helper.make_node("Relu", [spec.INPUT_NAME], [spec.OUTPUT_NAME])
    return helper.make_model(helper.make_graph([relu], "g", [x], [y]))


def test_profile_must_keep_the_sizes_the_onnx_fixes():
    trt_profile.check_profile(shapes_of("--size", "288"), _tiny_graph(288, 288), "m.onnx")
    trt_profile.check_profile(shapes_of("--min-size", "64", "--opt-size", "320",
                                        "--max-size", "900"), _tiny_graph("H", "W"), "m.onnx")
    with pytest.raises(InputError, match=r"fixes images axis 2 \(H\) at 288.*pass --size 288"):
        trt_profile.check_profile(shapes_of(), _tiny_graph(288, 288), "m.onnx")


def test_parity_plan_follows_the_profile():
    assert trt_profile.parity_size(shapes_of("--size", "288")) == (True, 288, "")
    wide = shapes_of("--min-size", "224", "--opt-size", "320", "--max-size", "800")
    assert trt_profile.parity_size(wide) == (True, None, "")
    run, size, note = trt_profile.parity_size(shapes_of("--min-size", "224", "--opt-size", "288",
                                                        "--max-size", "300"))
    assert (run, size) == (True, 300) and "does not cover small_288" in note
    run, _, note = trt_profile.parity_size(shapes_of("--min-size", "64x400",
                                                     "--opt-size", "64x400",
                                                     "--max-size", "100x500"))
    assert not run and "no square" in note


# --- the ONNX's precision --------------------------------------------------------------

def test_precision_is_read_from_the_onnx(graph, half):
    assert onnx_graph.onnx_precision(graph) == "fp32" and not onnx_graph.is_fp16_onnx(graph)
    assert onnx_graph.onnx_precision(half) == "fp16" and onnx_graph.is_fp16_onnx(half)
    assert onnx_graph.resolve_precision("auto", graph, "a.onnx") == "fp32"
    assert onnx_graph.resolve_precision("auto", half, "b.onnx") == "fp16"
    assert onnx_graph.resolve_precision("fp32", graph, "a.onnx") == "fp32"
    assert onnx_graph.resolve_precision("fp16", half, "b.onnx") == "fp16"


def test_export_onnx_fp16_graph_keeps_its_head_fp32(graph, half):
    assert onnx_graph.half_precision_head(graph) == []
    assert onnx_graph.half_precision_head(half) == []
    heads = [n.op_type for n in half.graph.node if n.op_type in onnx_graph.HEAD_OPS]
    assert {"Pow", "ReduceMean", "Gemm", "ReduceL2", "Div"} <= set(heads)


def test_a_graph_with_a_half_precision_head_is_refused(graph):
    bad = all_half(graph)
    half_ops = {n.op_type for n in bad.graph.node if (n.name or n.output[0])
                in onnx_graph.half_precision_head(bad)}
    assert {"Pow", "ReduceL2", "Div"} <= half_ops
    with pytest.raises(InputError, match=r"in fp16, where GeM's x\*\*3 overflows.*"
                       r"export_onnx.py --precision fp16"):
        onnx_graph.resolve_precision("auto", bad, "bad.onnx")


def test_explicit_precision_must_match_the_onnx(graph, half):
    with pytest.raises(InputError) as e:
        onnx_graph.resolve_precision("fp16", graph, "a.onnx")
    assert "is an fp32 graph" in str(e.value)
    assert "export/export_onnx.py --precision fp16" in str(e.value)
    with pytest.raises(InputError, match="is an fp16 graph"):
        onnx_graph.resolve_precision("fp32", half, "b.onnx")


# --- no weak typing in the sources ----------------------------------------------------

# TensorRT 11 removed these (migration guide, "Removed Python APIs"); 10 deprecated them.
REMOVED_NAMES = {"OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS",
                 "set_output_type", "reset_output_type", "EXPLICIT_BATCH",
                 "platform_has_fast_fp16", "int8_calibrator"}
REMOVED_FLAGS = {"FP16", "BF16", "INT8", "FP8", "INT4", "FP4", "DIRECT_IO"}


def weak_typing_uses(path: str) -> list[str]:
    """Code (not comments or docstrings) in `path` that names a removed TensorRT API:
    a removed name, `BuilderFlag.<precision flag>`, an assignment to `.precision`, or a
    string that spells one (getattr's way around the names)."""
    with open(path, "rb") as f:
        toks = [t for t in tokenize.tokenize(f.readline)
                if t.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE,
                                  tokenize.INDENT, tokenize.DEDENT, tokenize.ENCODING)]
    hits = []
    for i, t in enumerate(toks):
        where = f"{os.path.relpath(path, ROOT)}:{t.start[0]}"
        prev = [x.string for x in toks[max(0, i - 2):i]]
        nxt = toks[i + 1].string if i + 1 < len(toks) else ""
        if t.type == tokenize.NAME and t.string in REMOVED_NAMES:
            hits.append(f"{where} {t.string}")
        elif t.type == tokenize.NAME and t.string in REMOVED_FLAGS and prev == ["BuilderFlag", "."]:
            hits.append(f"{where} BuilderFlag.{t.string}")
        elif t.type == tokenize.NAME and t.string == "precision" and prev[-1:] == ["."] \
                and nxt == "=":
            hits.append(f"{where} .precision =")
        elif t.type == tokenize.STRING and t.string.strip("'\"") in REMOVED_NAMES | REMOVED_FLAGS:
            hits.append(f"{where} {t.string}")
    return hits


def test_export_sources_use_no_weak_typing_api():
    export = os.path.join(ROOT, "sscd_triton", "export")
    paths = [os.path.join(export, f) for f in sorted(os.listdir(export)) if f.endswith(".py")]
    paths.append(os.path.join(ROOT, "sscd_triton", "cli", "build_tensorrt.py"))
    for module in ("trt_build.py", "onnx_graph.py", "trt_profile.py"):  # the plan's code
        assert os.path.join(ROOT, "sscd_triton", "export", module) in paths
    assert [h for p in paths for h in weak_typing_uses(p)] == []


def test_the_source_check_finds_weak_typing(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("# BuilderFlag.FP16 in a comment is fine\n"
                   "config.set_flag(trt.BuilderFlag.FP16)\n"
                   "config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)\n"
                   "layer.precision = trt.float32\n"
                   "layer.set_output_type(0, trt.float32)\n"
                   "flag = getattr(trt.BuilderFlag, 'FP16')\n"
                   "ok = layer.precision == trt.float32\n")
    assert [h.split()[-1] for h in weak_typing_uses(str(bad))] == [
        "BuilderFlag.FP16", "OBEY_PRECISION_CONSTRAINTS", "=", "set_output_type", "'FP16'"]


# --- the builder, on a fake TensorRT ---------------------------------------------------

TRT11_FLAGS = {"DEBUG": 2, "GPU_FALLBACK": 3, "REFIT": 4, "DISABLE_TIMING_CACHE": 5, "TF32": 6,
               "SPARSE_WEIGHTS": 7, "SAFETY_SCOPE": 8, "DIRECT_IO": 11, "VERSION_COMPATIBLE": 12,
               "EXCLUDE_LEAN_RUNTIME": 13, "ERROR_ON_TIMING_CACHE_MISS": 15,
               "DISABLE_COMPILATION_CACHE": 17, "STRIP_PLAN": 18, "REFIT_IDENTICAL": 19,
               "WEIGHT_STREAMING": 20, "REFIT_INDIVIDUAL": 22, "STRICT_NANS": 23,
               "MONITOR_MEMORY": 24, "EDITABLE_TIMING_CACHE": 26, "DISTRIBUTIVE_INDEPENDENCE": 27}
TRT10_FLAGS = {"FP16": 0, "INT8": 1, "DEBUG": 2, "GPU_FALLBACK": 3, "REFIT": 4,
               "DISABLE_TIMING_CACHE": 5, "TF32": 6, "SPARSE_WEIGHTS": 7, "SAFETY_SCOPE": 8,
               "OBEY_PRECISION_CONSTRAINTS": 9, "PREFER_PRECISION_CONSTRAINTS": 10,
               "DIRECT_IO": 11, "VERSION_COMPATIBLE": 13, "EXCLUDE_LEAN_RUNTIME": 14, "FP8": 15,
               "BF16": 17, "STRIP_PLAN": 19, "INT4": 22, "FP4": 26, "EDITABLE_TIMING_CACHE": 27}


class Record:
    def __init__(self):
        self.network_flags: list[int] = []
        self.set_flags: list[str] = []
        self.cleared: list[str] = []
        self.pools: dict = {}
        self.profiles: list[dict] = []
        self.parsed: list[str] = []
        self.missing: list[str] = []  # module attributes asked for and absent
        self.built = 0


class FakeModule(types.ModuleType):
    def __getattr__(self, name):  # only called for names the module lacks
        if not name.startswith("__"):
            self.record.missing.append(name)
        raise AttributeError(f"module 'tensorrt' has no attribute '{name}'")


def fake_tensorrt(version: str = "11.4.0", gpu: bool = True, parse_ok: bool = True,
                  build_ok: bool = True) -> FakeModule:
    """The tensorrt names build_tensorrt may use, as the bindings of `version` spell them."""
    major = int(version.split(".")[0])
    rec = Record()
    trt = FakeModule("tensorrt")
    trt.record, trt.__version__ = rec, version
    DataType = enum.Enum("DataType", {"FLOAT": 0, "HALF": 1, "INT32": 3, "INT64": 9})
    trt.DataType, trt.float32, trt.float16 = DataType, DataType.FLOAT, DataType.HALF
    if major >= 11:  # pyCore.cpp at 11.1: STRONGLY_TYPED deprecated, always on; no EXPLICIT_BATCH
        trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", {
            "STRONGLY_TYPED": 0, "PREFER_JIT_PYTHON_PLUGINS": 1, "PREFER_AOT_PYTHON_PLUGINS": 2})
        trt.BuilderFlag = enum.IntEnum("BuilderFlag", TRT11_FLAGS)
    elif major == 10:
        trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", {
            "EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1})
        trt.BuilderFlag = enum.IntEnum("BuilderFlag", TRT10_FLAGS)
    else:  # 8.6: explicit batch only
        trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", {
            "EXPLICIT_BATCH": 0, "EXPLICIT_PRECISION": 1})
        trt.BuilderFlag = enum.IntEnum("BuilderFlag", {"FP16": 0, "TF32": 6})
    trt.MemoryPoolType = enum.IntEnum("MemoryPoolType", {"WORKSPACE": 0, "DLA_MANAGED_SRAM": 1})

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    class Layer:  # no `precision`, no set_output_type: assigning either raises AttributeError
        __slots__ = ("name", "type")

        def __init__(self, name, op):
            self.name, self.type = name, op

    class Network:
        __slots__ = ("flags", "layers", "model")

        def __init__(self, flags):
            self.flags, self.layers, self.model = flags, [], None

        @property
        def num_layers(self):
            return len(self.layers)

        def get_layer(self, i):
            return self.layers[i]

    class OnnxParser:
        __slots__ = ("network",)

        def __init__(self, network, logger):
            self.network = network

        def parse_from_file(self, path):
            rec.parsed.append(path)
            self.network.model = onnx.load(path)
            self.network.layers = [Layer(n.name or n.output[0], n.op_type)
                                   for n in self.network.model.graph.node]
            return parse_ok

        num_errors = property(lambda self: 0 if parse_ok else 1)

        def get_error(self, i):
            return "In node 7 (parseGraph): INVALID_NODE: unsupported"

    class Profile:
        __slots__ = ("shapes",)

        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

    class Cache:
        __slots__ = ("data",)

        def __init__(self, data):
            self.data = bytes(data)

        def serialize(self):
            return self.data or b"timing"

    class Config:
        __slots__ = ("flags", "profiles", "cache")

        def __init__(self):  # TF32 is on by default (NvInfer.h)
            self.flags, self.profiles, self.cache = {trt.BuilderFlag.TF32}, [], None

        def set_memory_pool_limit(self, pool, size):
            rec.pools[pool.name] = size

        def set_flag(self, flag):
            rec.set_flags.append(flag.name)
            self.flags.add(flag)

        def clear_flag(self, flag):
            rec.cleared.append(flag.name)
            self.flags.discard(flag)

        def get_flag(self, flag):
            return flag in self.flags

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)
            rec.profiles.append(dict(profile.shapes))
            return len(self.profiles) - 1

        def create_timing_cache(self, data):
            return Cache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class Engine:
        def __init__(self, network, profile):
            self.network, self.profile = network, profile
            g = network.model.graph
            gemm = next(n for n in g.node if n.op_type == "Gemm")
            w = next(i for i in g.initializer if i.name == gemm.input[1])
            self.io = {spec.INPUT_NAME: tuple(d.dim_value or -1 for d in
                                              g.input[0].type.tensor_type.shape.dim),
                       spec.OUTPUT_NAME: (-1, w.dims[0])}

        num_io_tensors = property(lambda self: len(self.io))

        def get_tensor_name(self, i):
            return list(self.io)[i]

        def get_tensor_shape(self, name):
            return self.io[name]

        def get_tensor_dtype(self, name):
            return DataType.FLOAT  # export_onnx's graphs take and give float32

        def get_tensor_profile_shape(self, name, index):
            return [list(s) for s in self.profile.shapes[name]]

    class Builder:
        __slots__ = ("networks",)

        def __init__(self, logger):
            if not gpu:
                raise TypeError("pybind11::init(): factory function returned nullptr")
            self.networks = []

        def create_network(self, flags=0):
            if flags & ~sum(1 << int(f) for f in trt.NetworkDefinitionCreationFlag):
                raise ValueError(f"unknown network flags {flags}")
            rec.network_flags.append(flags)
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            rec.built += 1
            if not build_ok:
                return None
            self.networks.append((network, config))
            return memoryview(b"PLAN" + str(len(self.networks) - 1).encode())

    class Runtime:
        def __init__(self, logger):
            self.builder = built_by[0]

        def deserialize_cuda_engine(self, plan):
            network, config = self.builder.networks[int(bytes(plan)[4:])]
            return Engine(network, config.profiles[0])

    built_by = []

    def make_builder(logger):
        b = Builder(logger)
        built_by.append(b)
        return b

    trt.Logger, trt.Builder, trt.OnnxParser, trt.Runtime = Logger, make_builder, OnnxParser, Runtime
    return trt


def test_the_fake_has_tensorrt_11s_surface(onnx_path):
    trt = fake_tensorrt("11.4.0")
    for name in ("FP16", "BF16", "INT8", "OBEY_PRECISION_CONSTRAINTS",
                 "PREFER_PRECISION_CONSTRAINTS"):
        with pytest.raises(AttributeError):
            getattr(trt.BuilderFlag, name)
    with pytest.raises(AttributeError):
        trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH
    assert int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) == 0
    assert int(fake_tensorrt("10.13.0").NetworkDefinitionCreationFlag.STRONGLY_TYPED) == 1
    net = trt.Builder(trt.Logger(2)).create_network(1)
    assert trt.OnnxParser(net, None).parse_from_file(onnx_path) and net.num_layers > 5
    layer = net.get_layer(0)
    with pytest.raises(AttributeError):
        layer.precision = trt.float32
    with pytest.raises(AttributeError):
        layer.set_output_type(0, trt.float32)
    with pytest.raises(AttributeError):
        trt.platform_has_fast_fp16
    assert trt.record.missing == ["platform_has_fast_fp16"]


@pytest.fixture
def use_fake(monkeypatch):
    def install(*args, **kwargs):
        trt = fake_tensorrt(*args, **kwargs)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        return trt
    return install


def run_main(capsys, *argv):
    status = build_tensorrt.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize("version", ["11.4.0", "10.13.0"])
@pytest.mark.parametrize("which", ["fp32", "fp16", "int8"])
def test_builds_strongly_typed_with_tf32_off(which, version, onnx_path, half_path, int8_path,
                                             tmp_path, capsys, use_fake):
    """int8 too: explicit Q/DQ in a strongly typed network, no INT8 flag, no calibrator
    (the fake raises AttributeError on every name TensorRT 11 removed, BuilderFlag.INT8
    and int8_calibrator among them, and records every flag set)."""
    trt = use_fake(version)
    src = {"fp32": onnx_path, "fp16": half_path, "int8": int8_path}[which]
    plan = tmp_path / "m.plan"
    status, out, err = run_main(capsys, "--onnx", src, "--output", str(plan), "--opt-batch", "8",
                                "--max-batch", "16", "--timing-cache", str(tmp_path / "trt.cache"))
    assert status == 0, err
    rec = trt.record
    strongly_typed = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    assert rec.network_flags == [strongly_typed] == [1 if version.startswith("11") else 2]
    assert rec.set_flags == [] and rec.cleared == ["TF32"]  # nothing enabled; TF32 off
    assert rec.missing == [] and rec.parsed == [os.path.abspath(src)]
    assert rec.pools == {"WORKSPACE": 4 << 30}
    assert rec.profiles == [{spec.INPUT_NAME: ((1, 3, 320, 320), (8, 3, 320, 320),
                                               (16, 3, 320, 320))}]
    assert plan.read_bytes() == b"PLAN0" and (tmp_path / "trt.cache").read_bytes() == b"timing"
    report = json.loads((tmp_path / "m.plan.parity.json").read_text())
    assert report["passed"] is True and report["precision"] == which
    assert report["profile"][2] == [16, 3, 320, 320] and report["strongly_typed"] is True
    assert f"built {which} plan (strongly typed, TF32 off) with TensorRT {version}" in out
    assert "PASS  io descriptors" in out and "PASS  profile" in out


def test_precision_flag_is_checked_before_tensorrt(onnx_path, half_path, tmp_path, capsys,
                                                   use_fake):
    trt = use_fake("11.4.0")
    plan = tmp_path / "m.plan"
    status, out, err = run_main(capsys, "--onnx", onnx_path, "--output", str(plan),
                                "--precision", "fp16")
    assert status == 2 and out == "" and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"error: --precision fp16: --onnx {onnx_path} is an fp32 graph")
    assert "export/export_onnx.py --precision fp16" in err
    status, _, err = run_main(capsys, "--onnx", half_path, "--output", str(plan),
                              "--precision", "fp32")
    assert status == 2 and err.count("\n") == 1 and "is an fp16 graph" in err
    assert list(tmp_path.iterdir()) == [] and trt.record.network_flags == []


def test_parser_and_builder_failures_exit_2(onnx_path, tmp_path, capsys, use_fake):
    plan = tmp_path / "m.plan"
    use_fake("11.4.0", parse_ok=False)
    status, out, err = run_main(capsys, "--onnx", onnx_path, "--output", str(plan))
    assert status == 2 and err.count("\n") == 1
    assert "TensorRT's ONNX parser rejected" in err and "INVALID_NODE" in err
    use_fake("11.4.0", build_ok=False)
    status, out, err = run_main(capsys, "--onnx", onnx_path, "--output", str(plan))
    assert status == 2 and "TensorRT could not build a plan" in err
    assert not plan.exists() and not (tmp_path / "m.plan.parity.json").exists()


def test_tensorrt_older_than_10_exits_3(onnx_path, tmp_path, capsys, use_fake):
    use_fake("8.6.1")
    status, out, err = run_main(capsys, "--onnx", onnx_path, "--output", str(tmp_path / "m.plan"))
    assert status == 3 and out == "" and err.count("\n") == 1
    assert "TensorRT 8.6.1 is too old" in err and "no plan written" in err
    assert list(tmp_path.iterdir()) == []


# --- the CLI's exit statuses -----------------------------------------------------------

@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError


def test_bad_input_exits_2_before_looking_for_tensorrt(onnx_path, tmp_path, capsys, monkeypatch):
    def forbidden():
        raise AssertionError("TensorRT was looked for before the inputs were checked")
    monkeypatch.setattr(trt_build, "open_builder", forbidden)
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
    assert err == f"error: {trt_build.NO_TENSORRT}; no plan written\n"
    assert list(tmp_path.iterdir()) == []


def test_tensorrt_without_a_gpu_exits_3(onnx_path, tmp_path, capsys, use_fake):
    use_fake("11.4.0", gpu=False)
    status, out, err = run_main(capsys, "--onnx", onnx_path, "--output", str(tmp_path / "m.plan"))
    assert status == 3 and out == "" and err.count("\n") == 1
    assert "TensorRT 11.4.0 found no usable CUDA GPU" in err and "no plan written" in err
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
    assert proc.stderr.splitlines() == [f"error: {trt_build.NO_TENSORRT}; no plan written"]
    assert not plan.exists() and list(tmp_path.iterdir()) == []


def test_cli_refuses_an_fp32_onnx_for_fp16_in_one_line(onnx_path, tmp_path):
    plan = tmp_path / "m.plan"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "export", "build_tensorrt.py"),
                           "--onnx", onnx_path, "--output", str(plan), "--precision", "fp16"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line.startswith("error: --precision fp16: ") and "is an fp32 graph" in line
    assert "export/export_onnx.py --precision fp16" in line
    assert list(tmp_path.iterdir()) == []


def test_the_cpu_form_of_int8_is_refused_before_tensorrt(int8_cpu_path, tmp_path, capsys):
    status, out, err = run_main(capsys, "--onnx", int8_cpu_path, "--output",
                                str(tmp_path / "m.plan"))
    assert status == 2 and err.count("\n") == 1 and "cpu form of int8" in err, err
    assert "--int8-target gpu" in err and not (tmp_path / "m.plan").exists()
