"""Append fitted descriptor postprocessing (sscd_triton.copydetect.postprocess) to the served
ONNX, so that the server returns postprocessed descriptors.

    model = onnx.load("model.onnx")
    model = append(model, load_params("pcaw.npz"))

After the graph's `descriptors` output come native ONNX ops only (every backend runs
them: ONNX Runtime, TensorRT, the python backend's ONNX Runtime):

    Sub(descriptors_raw, mean) -> MatMul(matrix) -> x / max(ReduceL2(x), 1e-12)

(the MatMul is left out for centering, whose matrix is the identity), the same
`l2_normalize((x - mean) @ matrix)` the client computes, in float32, with torch
`F.normalize`'s epsilon clamp. The output keeps its name `descriptors`, with width d_out.
The transform is recorded in the model's metadata_props (`sscd_postprocess`: method,
dims, params sha256, what it was fitted on); since the repository's weights fingerprint
(`sscd_weights_sha256`) is the sha256 of the served ONNX, postprocessed repositories get
a fingerprint of their own and embedding outputs of raw and postprocessed descriptors
never mix.
"""
from __future__ import annotations

import json

import numpy as np

from sscd_triton import spec

METADATA_KEY = "sscd_postprocess"
EPS = 1e-12  # torch.nn.functional.normalize's default
PREFIX = "sscd_postprocess"
RAW = f"{spec.OUTPUT_NAME}_raw"


class GraphError(ValueError):
    """The ONNX cannot take this postprocessing (one line saying why)."""


def recorded(model) -> dict | None:
    """The postprocessing a model already carries (its metadata), or None."""
    for p in model.metadata_props:
        if p.key == METADATA_KEY:
            return json.loads(p.value)
    return None


def _opset(model) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    return 0


def append(model, params):
    """A copy of `model` (onnx.ModelProto, output `descriptors` float32 [N, d_in]) with
    `params` (a copydetect.postprocess.Postprocess) applied after its output."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    if recorded(out) is not None:
        raise GraphError("the ONNX is postprocessed already (metadata 'sscd_postprocess'); "
                         "give the raw exported ONNX")
    outputs = [o for o in g.output if o.name == spec.OUTPUT_NAME]
    if len(outputs) != 1:
        raise GraphError(f"the ONNX has no output '{spec.OUTPUT_NAME}'")
    desc = outputs[0]
    shape = desc.type.tensor_type.shape.dim
    if desc.type.tensor_type.elem_type != TensorProto.FLOAT or len(shape) != 2:
        raise GraphError(f"output '{spec.OUTPUT_NAME}' is not float32 [N, dims]")
    width = shape[1].dim_value if shape[1].HasField("dim_value") else None
    if width is not None and width != params.dims_in:
        raise GraphError(f"the ONNX gives {width}-d descriptors; the postprocessing params "
                         f"take {params.dims_in}-d")
    names = {n for node in g.node for n in (*node.input, *node.output)} | \
        {i.name for i in g.initializer}
    if any(n.startswith(PREFIX) or n == RAW for n in names):
        raise GraphError(f"the ONNX already has tensors named {PREFIX}*")

    # The producer of `descriptors` now writes `descriptors_raw`.
    for node in g.node:
        for k, name in enumerate(node.output):
            if name == spec.OUTPUT_NAME:
                node.output[k] = RAW
        for k, name in enumerate(node.input):
            if name == spec.OUTPUT_NAME:
                node.input[k] = RAW
    for vi in g.value_info:
        if vi.name == spec.OUTPUT_NAME:
            vi.name = RAW

    mean = f"{PREFIX}_mean"
    g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(params.mean, np.float32), mean))
    nodes = [helper.make_node("Sub", [RAW, mean], [f"{PREFIX}_centered"], name=f"{PREFIX}_sub")]
    x = f"{PREFIX}_centered"
    if not params.is_identity:
        matrix = f"{PREFIX}_matrix"
        g.initializer.append(numpy_helper.from_array(
            np.ascontiguousarray(params.matrix, np.float32), matrix))
        nodes.append(helper.make_node("MatMul", [x, matrix], [f"{PREFIX}_projected"],
                                      name=f"{PREFIX}_matmul"))
        x = f"{PREFIX}_projected"
    norm = f"{PREFIX}_norm"
    if _opset(out) >= 18:
        axes = f"{PREFIX}_axes"
        g.initializer.append(numpy_helper.from_array(np.array([1], np.int64), axes))
        nodes.append(helper.make_node("ReduceL2", [x, axes], [norm], keepdims=1,
                                      name=f"{PREFIX}_reducel2"))
    else:
        nodes.append(helper.make_node("ReduceL2", [x], [norm], axes=[1], keepdims=1,
                                      name=f"{PREFIX}_reducel2"))
    eps = f"{PREFIX}_eps"
    g.initializer.append(numpy_helper.from_array(np.array(EPS, np.float32), eps))
    nodes += [helper.make_node("Max", [norm, eps], [f"{PREFIX}_clamped"], name=f"{PREFIX}_max"),
              helper.make_node("Div", [x, f"{PREFIX}_clamped"], [spec.OUTPUT_NAME],
                               name=f"{PREFIX}_div")]
    g.node.extend(nodes)

    batch = onnx.TypeProto()
    batch.CopyFrom(desc.type)
    dims = batch.tensor_type.shape.dim
    dims[1].Clear()
    dims[1].dim_value = params.dims_out
    desc.type.CopyFrom(batch)

    meta = out.metadata_props.add()
    meta.key, meta.value = METADATA_KEY, json.dumps(params.record(), sort_keys=True)
    try:
        onnx.checker.check_model(out)
    except Exception as e:  # noqa: BLE001
        raise GraphError(f"the postprocessed graph does not check: {e}") from None
    return out
