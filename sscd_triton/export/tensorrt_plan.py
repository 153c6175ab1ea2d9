"""ONNX -> TensorRT plan with TensorRT's Python API (10 or 11), verified against PyTorch.

Input: an ONNX graph from export/export_onnx.py. Plan I/O is the graph's: `images`
float32 [N, 3, H, W] -> `descriptors` float32 [N, dims]; N (and H, W unless fixed) range
over one optimisation profile.

Strongly typed networks only. TensorRT 11 removed weak typing (the builder's reduced
precision flags, precision constraints, per-layer precision and output types), and in 11
every network is strongly typed: each tensor has the type the ONNX gives it. So the
precision of a plan is the precision of its ONNX:
  fp32  the fp32 ONNX; TF32 cleared, or the 1e-4 fp32 parity bound is missed
  fp16  the ONNX from `export_onnx.py --precision fp16`: the trunk in half precision,
        GeM, the Linear and L2 normalisation an explicit fp32 island behind a Cast
        (export/fp16.py). TensorRT builds exactly those types; `half_precision_head`
        refuses an fp16 graph whose GeM or normalisation would run in half precision
        (`clamp(x) ** 3` overflows there, NVIDIA/TensorRT#1954).
The pure parts (profile, graph precision, I/O expectations) are tested without TensorRT;
only `open_builder`, `build_plan` and `plan_runner` need TensorRT and a GPU.

TensorRT API used, checked in NVIDIA/TensorRT at 11.1 (python/src/infer/pyCore.cpp,
include/NvInfer.h) and release/10.13, and in the "Removed Python APIs" page of the 11.4
migration guide (docs.nvidia.com/deeplearning/tensorrt/11.4.0/api/migration/):
- NetworkDefinitionCreationFlag.STRONGLY_TYPED exists in both; its value is 1 in 10.x
  (EXPLICIT_BATCH, deprecated, is 0) and 0 in 11.x, where it is deprecated and ignored
  (always strongly typed) and EXPLICIT_BATCH is gone. So the bit is computed from the enum.
- Builder(logger).create_network(flags), OnnxParser(network, logger).parse_from_file,
  num_errors/get_error, create_builder_config, set_memory_pool_limit(MemoryPoolType.
  WORKSPACE, n), clear_flag(BuilderFlag.TF32) (TF32 "enabled by default" in 11.1's
  NvInfer.h), create_optimization_profile/set_shape/add_optimization_profile,
  create_timing_cache/set_timing_cache/get_timing_cache, build_serialized_network,
  Runtime.deserialize_cuda_engine, and the runner's set_input_shape, set_tensor_address,
  execute_async_v3: present in 10.13 and 11.1.

Exit statuses of export/build_tensorrt.py:
  0  plan written; every check passed (parity shows `skip` without --checkpoint or CUDA torch)
  1  plan written; a parity check failed
  2  bad input: missing/unreadable ONNX, unwritable output or timing cache, invalid
     profile, --precision that the ONNX does not hold, bad checkpoint, or an ONNX/profile
     that TensorRT's parser or builder rejects
  3  TensorRT (10 or later) or a CUDA GPU is unavailable; no plan written
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass

import numpy as np
import onnx

from sscd_triton.report import Check
from sscd_triton import samples, spec

PRECISIONS = spec.PRECISIONS
MIN_SIZE = spec.MIN_INPUT_SIZE
Shape = tuple[int, int, int, int]  # (N, 3, H, W)
Profile = dict[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max)
NO_TENSORRT = ("TensorRT is not installed (pip install tensorrt, or run inside "
               "nvcr.io/nvidia/pytorch:26.10-py3, which ships it)")


class InputError(ValueError):
    """Bad input (exit 2); the message names the flag or file at fault."""


class Unavailable(RuntimeError):
    """TensorRT or a CUDA GPU is missing (exit 3)."""


# --- The optimisation profile (pure) -------------------------------------------------

def _hw(flag: str, value) -> tuple[int, int]:
    """`S` or `HxW` -> (H, W), each >= MIN_SIZE."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", str(value))
    if not m:
        raise InputError(f"{flag} {value!r}: expected S or HxW, e.g. 320 or 288x432")
    h, w = int(m[1]), int(m[2] or m[1])
    if min(h, w) < MIN_SIZE:
        raise InputError(f"{flag} {value}: H and W must be >= {MIN_SIZE}")
    return h, w


def profile_shapes(args) -> Profile:
    """{INPUT_NAME: (min, opt, max)} shapes from the CLI flags (an argparse Namespace).

    Explicit batch: N ranges over --min/--opt/--max-batch. `--size S` fixes H = W = S;
    `--min-size/--opt-size/--max-size` (each S or HxW) make H and W dynamic. Neither:
    H = W = 320, the default square320 serving mode.
    """
    batches = (args.min_batch, args.opt_batch, args.max_batch)
    if batches[0] < 1:
        raise InputError(f"--min-batch {batches[0]}: must be >= 1")
    if not batches[0] <= batches[1] <= batches[2]:
        raise InputError(f"--min-batch {batches[0]}, --opt-batch {batches[1]}, --max-batch "
                         f"{batches[2]}: need --min-batch <= --opt-batch <= --max-batch")
    flags = {"--min-size": args.min_size, "--opt-size": args.opt_size, "--max-size": args.max_size}
    given = [f for f, v in flags.items() if v is not None]
    if args.size is not None and given:
        raise InputError(f"--size fixes H = W; drop {', '.join(given)} "
                         "(or drop --size for dynamic H, W)")
    if given and len(given) < 3:
        missing = [f for f in flags if f not in given]
        raise InputError(f"dynamic H, W need --min-size, --opt-size and --max-size; "
                         f"missing {', '.join(missing)}")
    if given:
        hws = [_hw(f, v) for f, v in flags.items()]
        for axis, name in ((0, "H"), (1, "W")):
            lo, opt, hi = (hw[axis] for hw in hws)
            if not lo <= opt <= hi:
                raise InputError(f"{name}: --min-size {lo}, --opt-size {opt}, --max-size {hi}: "
                                 "need --min-size <= --opt-size <= --max-size in H and W")
    else:
        size = args.size if args.size is not None else spec.PREPROCESS[spec.DEFAULT_PREPROCESS].size
        h, w = _hw("--size", size)
        if h != w:
            raise InputError(f"--size {size}: give one number (H = W); use --min-size/"
                             "--opt-size/--max-size for other shapes")
        hws = [(h, w)] * 3
    shapes = tuple((b, spec.CHANNELS, h, w) for b, (h, w) in zip(batches, hws))
    return {spec.INPUT_NAME: shapes}


def check_profile(shapes: Profile, model: onnx.ModelProto, path: str) -> None:
    """The profile must keep every dimension the ONNX graph fixes (e.g. --static-size 288)."""
    dims = {i.name: [d.dim_value or None for d in i.type.tensor_type.shape.dim]
            for i in model.graph.input}
    for name, triple in shapes.items():
        for axis, fixed in enumerate(dims[name]):
            got = sorted({s[axis] for s in triple})
            if fixed is None or got == [fixed]:
                continue
            hint = ("set --min-batch, --opt-batch and --max-batch to it" if axis == 0
                    else f"pass --size {fixed}" if dims[name][2] == dims[name][3]
                    else "pass --min-size, --opt-size and --max-size "
                    f"{dims[name][2]}x{dims[name][3]}")
            raise InputError(f"--onnx {path} fixes {name} axis {axis} ({'NCHW'[axis]}) at {fixed}, "
                             f"the profile gives {'..'.join(map(str, got))}: {hint}")


# --- What the ONNX holds (pure) --------------------------------------------------------

_F16 = onnx.TensorProto.FLOAT16
# GeM (Pow, ReduceMean), the Linear (Gemm/MatMul) and L2 normalisation (ReduceL2, Div):
# ops that overflow or lose their constants in half precision. A ResNet trunk has none.
HEAD_OPS = ("Pow", "ReduceMean", "Gemm", "MatMul", "ReduceL2", "Div")


def onnx_precision(model: onnx.ModelProto) -> str:
    """"fp16" when the graph computes in half precision anywhere (fp16 weights or a Cast
    to fp16, as export_onnx --precision fp16 writes it), else "fp32"."""
    g = model.graph
    if any(i.data_type == _F16 for i in g.initializer):
        return "fp16"
    for n in g.node:
        for a in n.attribute:
            if (n.op_type == "Cast" and a.name == "to" and a.i == _F16) or \
                    (n.op_type == "Constant" and a.name == "value" and a.t.data_type == _F16):
                return "fp16"
    return "fp32"


def is_fp16_onnx(model: onnx.ModelProto) -> bool:
    return onnx_precision(model) == "fp16"


def half_precision_head(model: onnx.ModelProto) -> list[str]:
    """Names of GeM/Linear/L2 nodes (HEAD_OPS) that read an fp16 tensor: a strongly typed
    build would run them in half precision. Empty for export_onnx's fp16 graph, whose
    island is fp32; empty too when ONNX type inference cannot tell (no false refusals)."""
    try:
        g = onnx.shape_inference.infer_shapes(model).graph
    except Exception:
        return []
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]}
    types.update({i.name: i.data_type for i in g.initializer})
    for n in g.node:
        if n.op_type == "Constant":
            types.update({n.output[0]: a.t.data_type for a in n.attribute if a.name == "value"})
    return [n.name or n.output[0] for n in g.node
            if n.op_type in HEAD_OPS and any(types.get(i) == _F16 for i in n.input)]


def resolve_precision(requested: str, model: onnx.ModelProto, path: str) -> str:
    """The plan's precision: the ONNX's. `requested` "auto" takes it; an explicit one must
    match it (a strongly typed build cannot change it), else InputError (exit 2)."""
    holds = onnx_precision(model)
    if requested not in ("auto", holds):
        if requested == "fp16":
            raise InputError(f"--precision fp16: --onnx {path} is an fp32 graph and TensorRT "
                             "builds the types the ONNX holds; export the fp16 graph with "
                             "export/export_onnx.py --precision fp16 and build from it")
        raise InputError(f"--precision {requested}: --onnx {path} is an fp16 graph (its trunk "
                         "runs in half precision in any plan built from it); build from the "
                         "fp32 ONNX, or drop --precision")
    if holds == "fp16":
        half = half_precision_head(model)
        if half:
            raise InputError(f"--onnx {path} runs {', '.join(half[:4])}"
                             f"{' ...' if len(half) > 4 else ''} in fp16, where GeM's x**3 "
                             "overflows and L2's eps vanishes; export it with "
                             "export/export_onnx.py --precision fp16 (fp32 GeM/Linear/L2)")
    return holds


# --- Inputs, checked before TensorRT is touched ---------------------------------------

def load_onnx(path: str) -> onnx.ModelProto:
    """The graph (weights left on disk), with `images` [N,3,H,W] in and `descriptors` out."""
    if not os.path.exists(path):
        raise InputError(f"--onnx {path}: no such file")
    if os.path.isdir(path):
        raise InputError(f"--onnx {path} is a directory, not an .onnx file")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as e:
        raise InputError(f"--onnx {path}: not an ONNX model ({str(e).splitlines()[0]})") from None
    inputs = {i.name: len(i.type.tensor_type.shape.dim) for i in model.graph.input}
    outputs = [o.name for o in model.graph.output]
    if inputs.get(spec.INPUT_NAME) != 4 or spec.OUTPUT_NAME not in outputs:
        raise InputError(f"--onnx {path}: inputs {sorted(inputs)}, outputs {outputs}; expected "
                         f"{spec.INPUT_NAME} [N,3,H,W] -> {spec.OUTPUT_NAME} [N,dims] "
                         "(make it with export/export_onnx.py)")
    return model


def _check_writable(flag: str, path: str, example: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise InputError(f"{flag} {path} is a directory; give a file name such as "
                         f"{os.path.join(path, example)}")
    if not os.path.isdir(parent):
        raise InputError(f"{flag} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise InputError(f"{flag} {path}: not writable")


def check_paths(onnx_path: str, output: str, timing_cache: str | None) -> None:
    _check_writable("--output", output, "sscd.plan")
    if os.path.abspath(output) == os.path.abspath(onnx_path):
        raise InputError(f"--output {output} would overwrite the --onnx input")
    if timing_cache:
        _check_writable("--timing-cache", timing_cache, "trt.cache")
        if os.path.exists(timing_cache) and not os.access(timing_cache, os.R_OK):
            raise InputError(f"--timing-cache {timing_cache}: not readable")


# --- TensorRT (lazy import; needs a CUDA GPU) ------------------------------------------

def open_builder():
    """(trt, logger, builder), or Unavailable saying what is missing."""
    try:
        import tensorrt as trt
    except ModuleNotFoundError:
        raise Unavailable(NO_TENSORRT) from None
    except (ImportError, OSError) as e:  # a wheel whose CUDA libraries do not load
        raise Unavailable(f"TensorRT does not load ({str(e).splitlines()[0]})") from None
    if not hasattr(getattr(trt, "NetworkDefinitionCreationFlag", None), "STRONGLY_TYPED"):
        raise Unavailable(f"TensorRT {getattr(trt, '__version__', '?')} is too old: plans are "
                          "built as strongly typed networks, which need TensorRT 10 or later")
    logger = trt.Logger(trt.Logger.WARNING)
    try:
        builder = trt.Builder(logger)
    except Exception as e:  # no driver or no GPU: the factory returns nullptr
        builder, why = None, str(e).splitlines()[0]
    else:
        why = "trt.Builder returned None"
    if builder is None:
        raise Unavailable(f"TensorRT {trt.__version__} found no usable CUDA GPU ({why})")
    return trt, logger, builder


@dataclass
class Built:
    plan: bytes
    layers: int  # network layers
    seconds: float
    cache_note: str


def _write_atomic(path: str, data) -> None:
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)),
                       f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def network_flags(trt) -> int:
    """create_network's flags: strongly typed. The bit comes from the enum (1 in TensorRT
    10, 0 in 11, where it is deprecated and ignored because networks are always strongly
    typed); 10's deprecated explicit-batch flag is not used (11 removed it)."""
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def build_plan(trt, logger, builder, onnx_path: str, output: str, shapes: Profile,
               timing_cache: str | None, workspace_gib: float) -> Built:
    """Parse into a strongly typed network (tensor types from the ONNX: fp32, or fp16 with
    its fp32 island), build, write `output` atomically; InputError if TensorRT rejects."""
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(os.path.abspath(onnx_path)):  # reads external data beside it
        errors = [" ".join(str(parser.get_error(i)).split()) for i in range(parser.num_errors)]
        raise InputError(f"TensorRT's ONNX parser rejected {onnx_path}: " + "; ".join(errors))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    # TF32 (on by default) rounds fp32 matmul/conv inputs to 10-bit mantissas: the fp32
    # plan would miss its 1e-4 bound, and the fp16 plan's fp32 island must be true fp32.
    config.clear_flag(trt.BuilderFlag.TF32)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache_note = "no --timing-cache"
    if timing_cache:
        data = open(timing_cache, "rb").read() if os.path.exists(timing_cache) else b""
        cache = config.create_timing_cache(data)
        cache_note = f"timing cache {timing_cache} ({len(data)} bytes loaded)"
        if cache is None or not config.set_timing_cache(cache, False):  # other TRT or GPU
            config.set_timing_cache(config.create_timing_cache(b""), False)
            cache_note = f"timing cache {timing_cache} did not match this GPU/TensorRT: rebuilt"
    start = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if plan is None:
        raise InputError(f"TensorRT could not build a plan from {onnx_path} with profile "
                         f"{shapes} (its log above says why; try a larger --workspace-gib)")
    if timing_cache:
        _write_atomic(timing_cache, config.get_timing_cache().serialize())
    plan = bytes(plan)
    _write_atomic(output, plan)
    return Built(plan, network.num_layers, seconds, cache_note)


def plan_runner(trt, engine, shapes: Profile):
    """float32 [N,3,H,W] numpy -> [N,dims] through the plan, buffers as torch CUDA tensors.

    Batches above --max-batch run in chunks; below --min-batch they are zero-padded and
    the padding rows dropped, so validate's batches 1, 3 and 16 fit any profile.
    """
    import torch

    lo, _, hi = shapes[spec.INPUT_NAME]
    dtype = {trt.float32: torch.float32, trt.float16: torch.float16}
    context = engine.create_execution_context()
    stream = torch.cuda.Stream()

    def run(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, np.float32)
        if not all(lo[a] <= x.shape[a] <= hi[a] for a in (1, 2, 3)):
            raise ValueError(f"input {list(x.shape)} is outside the plan's profile {lo}..{hi}")
        outs = []
        for s in range(0, len(x), hi[0]):
            chunk = x[s:s + hi[0]]
            n = len(chunk)
            if n < lo[0]:
                chunk = np.concatenate([chunk, np.zeros((lo[0] - n, *chunk.shape[1:]), np.float32)])
            inp = torch.from_numpy(chunk).cuda()
            context.set_input_shape(spec.INPUT_NAME, tuple(inp.shape))
            out = torch.empty(tuple(context.get_tensor_shape(spec.OUTPUT_NAME)), device="cuda",
                              dtype=dtype[engine.get_tensor_dtype(spec.OUTPUT_NAME)])
            context.set_tensor_address(spec.INPUT_NAME, inp.data_ptr())
            context.set_tensor_address(spec.OUTPUT_NAME, out.data_ptr())
            stream.wait_stream(torch.cuda.current_stream())  # the upload ran on torch's stream
            if not context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 failed")
            torch.cuda.current_stream().wait_stream(stream)
            outs.append(out[:n].float().cpu().numpy())
        return np.concatenate(outs)
    return run


def descriptor_width(model: onnx.ModelProto) -> int | None:
    """dims of the graph's descriptors: the exporter leaves that axis symbolic, so read it
    from the inferred shapes of what the output's producer (L2's Div) takes in."""
    g = onnx.shape_inference.infer_shapes(model).graph
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*g.value_info, *g.output]}
    for n in g.node:
        if spec.OUTPUT_NAME in n.output:
            widths = [shapes[i][1] for i in n.input if len(shapes.get(i, [])) == 2 and shapes[i][1]]
            return widths[0] if widths else None
    return None


def declared_io(model: onnx.ModelProto, dims: int | None = None) -> dict[str, list]:
    """{name: shape} the plan must keep: the graph's I/O, dynamic axes as letters, the
    descriptor width `dims` (the checkpoint's) or as the graph computes it."""
    io = {}
    for v in [*model.graph.input, *model.graph.output]:
        if v.name in (spec.INPUT_NAME, spec.OUTPUT_NAME):
            letters = "NCHW" if v.name == spec.INPUT_NAME else "ND"
            io[v.name] = [d.dim_value or letters[a]
                          for a, d in enumerate(v.type.tensor_type.shape.dim)]
    io[spec.OUTPUT_NAME][-1] = dims or descriptor_width(model) or "D"
    return io


def io_checks(trt, engine, shapes: Profile, want: dict[str, list]) -> list[Check]:
    """The plan's I/O names, shapes and float32 types against `want` (`declared_io`), and
    its optimisation profile against `shapes`."""
    lo, opt, hi = shapes[spec.INPUT_NAME]
    want = dict(want)
    fmt = lambda shape: "[" + ",".join(map(str, shape)) + "]"  # noqa: E731
    checks = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        exp = want.pop(name, None)
        letters = "NCHW" if len(exp or "") == 4 else "ND"
        shape = [letters[a] if d < 0 else d for a, d in enumerate(engine.get_tensor_shape(name))]
        dtype = engine.get_tensor_dtype(name)
        ok = exp is not None and shape == exp and dtype == trt.float32
        checks.append(Check(f"io {name}", ok, f"{fmt(shape)} {dtype.name.lower()}",
                            f"{fmt(exp)} float" if exp else "unexpected name"))
    checks += [Check(f"io {n}", False, "missing", fmt(s)) for n, s in want.items()]
    got = tuple(tuple(s) for s in engine.get_tensor_profile_shape(spec.INPUT_NAME, 0))
    checks.append(Check("profile", got == (lo, opt, hi), " ".join(fmt(s) for s in got),
                        " ".join(fmt(s) for s in (lo, opt, hi))))
    return checks


def parity_size(shapes: Profile) -> tuple[bool, int | None, str]:
    """How validate.model_parity can exercise this profile: (run, static_size, note).

    Fixed square: that size. Dynamic and covering 320 and every photograph's small_288
    shape: both modes (static_size None). Otherwise the square size nearest 320 inside
    the profile, small_288 skipped with `note` saying why.
    """
    lo, _, hi = shapes[spec.INPUT_NAME]
    if lo[2:] == hi[2:]:
        if lo[2] == lo[3]:
            return True, lo[2], ""
        return False, None, f"n/a: fixed {lo[2]}x{lo[3]} input is not square"
    fits = lambda h, w: lo[2] <= h <= hi[2] and lo[3] <= w <= hi[3]  # noqa: E731
    short = spec.PREPROCESS["short288"]
    need = [short.output_hw(*img.size) for _, img in samples.photographs()]
    square = spec.PREPROCESS["square320"].size
    if fits(square, square) and all(fits(h, w) for h, w in need):
        return True, None, ""
    s_lo, s_hi = max(lo[2], lo[3]), min(hi[2], hi[3])
    hs, ws = [h for h, _ in need], [w for _, w in need]
    why = (f"n/a: profile H {lo[2]}..{hi[2]}, W {lo[3]}..{hi[3]} does not cover small_288 "
           f"(H {min(hs)}..{max(hs)}, W {min(ws)}..{max(ws)})")
    if s_lo > s_hi:
        return False, None, why + " and admits no square input"
    return True, min(max(square, s_lo), s_hi), why
