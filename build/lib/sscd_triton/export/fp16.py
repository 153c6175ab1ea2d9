"""Half-precision ONNX with an fp32 island for GeM, the Linear and L2 normalisation.

Generic converters (onnxconverter-common, onnxruntime.transformers.float16) round the
island's constants to fp16 (GeM's 1/3 becomes 0.33325, normalize's eps 1e-12 becomes 0)
and cast blocked outputs back to fp16, where `clamp(x) ** 3` overflows to inf. Here the
cut is explicit: every node up to the trunk's final ReLU runs in fp16, everything after
it in fp32; the graph's input and output stay float32.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def trunk_end(graph: onnx.GraphProto) -> int:
    """Index of the trunk's final ReLU: GeM's clamp (Clip or Max) consumes its output."""
    relus = [i for i, n in enumerate(graph.node) if n.op_type == "Relu"]
    if not relus:
        raise ValueError("graph has no ReLU: not an SSCD ResNet trunk")
    end = relus[-1]
    out = graph.node[end].output[0]
    consumers = [n.op_type for n in graph.node if out in n.input]
    if not set(consumers) & {"Clip", "Max"}:
        raise ValueError(f"the trunk's last ReLU feeds {consumers}, not GeM's clamp")
    return end


def half_trunk(model: onnx.ModelProto) -> onnx.ModelProto:
    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    end = trunk_end(g)
    trunk, head = list(g.node[: end + 1]), list(g.node[end + 1:])
    head_inputs = {i for n in head for i in n.input}
    trunk_inputs = {i for n in trunk for i in n.input}
    shared = {init.name for init in g.initializer} & head_inputs & trunk_inputs
    if shared:
        raise ValueError(f"initializers used on both sides of the fp16 cut: {sorted(shared)}")
    for init in g.initializer:
        if init.name in trunk_inputs and init.data_type == TensorProto.FLOAT:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16),
                                                  init.name))
    for n in trunk:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value" and a.t.data_type == TensorProto.FLOAT:
                    a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float16)))
    (inp,) = [i.name for i in g.input if i.name not in {x.name for x in g.initializer}]
    half_in, trunk_out = inp + "_fp16", g.node[end].output[0]
    float_out = trunk_out + "_fp32"
    for n in trunk:
        n.input[:] = [half_in if i == inp else i for i in n.input]
    for n in head:
        n.input[:] = [float_out if i == trunk_out else i for i in n.input]
    del g.node[:]
    g.node.extend([helper.make_node("Cast", [inp], [half_in], to=TensorProto.FLOAT16,
                                    name="cast_input_fp16")]
                  + trunk
                  + [helper.make_node("Cast", [trunk_out], [float_out], to=TensorProto.FLOAT,
                                      name="cast_trunk_fp32")]
                  + head)
    del g.value_info[:]  # stale element types; ONNX Runtime re-infers shapes
    onnx.checker.check_model(model)
    return model
