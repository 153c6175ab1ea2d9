"""What an SSCD ONNX graph holds, for building a TensorRT plan from it (pure: onnx only).

Strongly typed networks only. TensorRT 11 removed weak typing (the builder's reduced
precision flags, precision constraints, per-layer precision and output types), and in 11
every network is strongly typed: each tensor has the type the ONNX gives it. So the
precision of a plan is the precision of its ONNX:
  fp32  the fp32 ONNX; TF32 cleared (trt_build), or the 1e-4 fp32 parity bound is missed
  fp16  the ONNX from `export_onnx.py --precision fp16`: the trunk in half precision,
        GeM, the Linear and L2 normalisation an explicit fp32 island behind a Cast
        (export/fp16.py). TensorRT builds exactly those types; `half_precision_head`
        refuses an fp16 graph whose GeM or normalisation would run in half precision
        (`clamp(x) ** 3` overflows there, NVIDIA/TensorRT#1954).
  int8  the ONNX from `export_onnx.py --precision int8 --int8-target gpu`: explicit
        Quantize/DequantizeLinear around the trunk's layers, int8 with zero point 0
        (TensorRT's Q/DQ takes symmetric int8 only; `int8_problems` refuses the cpu form,
        whose activations are uint8), GeM/Linear/L2 fp32. No calibrator and no implicit
        int8 flags: TensorRT 10 deprecated and 11 removed them.
"""
from __future__ import annotations

import os

import onnx
from onnx import numpy_helper

from sscd_triton import spec
from sscd_triton.export.trt_errors import InputError

PRECISIONS = spec.PRECISIONS

_F16 = onnx.TensorProto.FLOAT16
# GeM (Pow, ReduceMean), the Linear (Gemm/MatMul) and L2 normalisation (ReduceL2, Div):
# ops that overflow or lose their constants in half precision. A ResNet trunk has none.
HEAD_OPS = ("Pow", "ReduceMean", "Gemm", "MatMul", "ReduceL2", "Div")


_QDQ = ("QuantizeLinear", "DequantizeLinear")


def onnx_precision(model: onnx.ModelProto) -> str:
    """"int8" when the graph holds Quantize/DequantizeLinear nodes (export_onnx --precision
    int8), "fp16" when it computes in half precision anywhere (fp16 weights or a Cast to
    fp16, as export_onnx --precision fp16 writes it), else "fp32"."""
    g = model.graph
    if any(n.op_type in _QDQ for n in g.node):
        return "int8"
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


def int8_problems(model: onnx.ModelProto) -> list[str]:
    """Why TensorRT cannot build this Q/DQ graph as is: zero points that are not int8 or
    not 0 (TensorRT developer guide, "Explicit Quantization": symmetric int8 only). Empty
    for export_onnx's `--int8-target gpu` graph."""
    inits = {i.name: i for i in model.graph.initializer}
    bad = set()
    for n in model.graph.node:
        if n.op_type not in _QDQ:
            continue
        if len(n.input) < 3 or not n.input[2]:  # ONNX: no zero point means uint8
            bad.add("uint8 (default, no zero point) zero points")
        elif n.input[2] in inits:
            z = numpy_helper.to_array(inits[n.input[2]])
            if z.dtype != "int8" or z.any():
                bad.add(f"{z.dtype} zero points" if z.dtype != "int8" else "non-zero zero points")
    return [f"Q/DQ with {b}" for b in sorted(bad)]


def resolve_precision(requested: str, model: onnx.ModelProto, path: str) -> str:
    """The plan's precision: the ONNX's. `requested` "auto" takes it; an explicit one must
    match it (a strongly typed build cannot change it), else InputError (exit 2)."""
    holds = onnx_precision(model)
    if requested not in ("auto", holds):
        raise InputError(f"--precision {requested}: --onnx {path} is an {holds} graph "
                         "and TensorRT builds the types the ONNX holds (strongly typed); "
                         f"export the {requested} graph with export/export_onnx.py --precision "
                         f"{requested} and build from it, or drop --precision")
    if holds == "int8":
        problems = int8_problems(model)
        if problems:
            raise InputError(f"--onnx {path} is the cpu form of int8 ({', '.join(problems)}); "
                             "TensorRT takes symmetric int8 only: export it with "
                             "export/export_onnx.py --precision int8 --int8-target gpu")
    if holds == "fp16":
        half = half_precision_head(model)
        if half:
            raise InputError(f"--onnx {path} runs {', '.join(half[:4])}"
                             f"{' ...' if len(half) > 4 else ''} in fp16, where GeM's x**3 "
                             "overflows and L2's eps vanishes; export it with "
                             "export/export_onnx.py --precision fp16 (fp32 GeM/Linear/L2)")
    return holds


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
