"""ONNX -> TensorRT plan with TensorRT's Python API (10 or 11): the builder and a runner
for the plan, and the checks of its I/O. Needs TensorRT and a CUDA GPU (lazy import);
what the ONNX holds is onnx_graph.py, the profile trt_profile.py.

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
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from sscd_triton import files, spec
from sscd_triton.export.trt_errors import InputError, Unavailable
from sscd_triton.export.trt_profile import Profile
from sscd_triton.report import Check

NO_TENSORRT = ("TensorRT is not installed (pip install tensorrt, or run inside "
               "nvcr.io/nvidia/pytorch:26.10-py3, which ships it)")


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
        files.write_atomic(timing_cache, config.get_timing_cache().serialize())
    plan = bytes(plan)
    files.write_atomic(output, plan)
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
