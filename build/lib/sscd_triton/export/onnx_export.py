"""Checkpoint -> ONNX (fp32 or fp16), verified against PyTorch, written atomically."""
from __future__ import annotations

import os
import tempfile
import warnings

import onnx
import torch

from sscd_triton.export import checkpoints, fp16, validate
from sscd_triton.report import Check, Report
from sscd_triton import files, runtime, spec

PRECISIONS = spec.PRECISIONS



def to_onnx(model: torch.nn.Module, static_size: int | None = None,
            precision: str = "fp32", opset: int = spec.ONNX_OPSET) -> onnx.ModelProto:
    """Trace `model` (an SSCD or an upstream TorchScript module) to an ONNX graph.

    Input `images` float32 [N, 3, H, W] (H = W = static_size when given), output
    `descriptors` float32 [N, dims]; N, H, W dynamic unless fixed.
    """
    size = static_size or 320
    dynamic = {spec.INPUT_NAME: {0: "batch"}, spec.OUTPUT_NAME: {0: "batch"}}
    if static_size is None:
        dynamic[spec.INPUT_NAME].update({2: "height", 3: "width"})
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        path = os.path.join(tmp, "model.onnx")
        # dynamo=False: the TorchScript-based exporter is the one that takes ScriptModules.
        torch.onnx.export(model.eval(), (torch.randn(2, 3, size, size),), path,
                          input_names=[spec.INPUT_NAME], output_names=[spec.OUTPUT_NAME],
                          dynamic_axes=dynamic, opset_version=opset, do_constant_folding=True,
                          dynamo=False)
        graph = onnx.load(path)
    if precision == "fp16":
        graph = fp16.half_trunk(graph)
    graph.producer_name = "sscd-triton"
    onnx.checker.check_model(graph)
    return graph


def _dims(shape: list) -> str:
    return "[" + ",".join(map(str, shape)) + "]"


def io_checks(session, dims: int, static_size: int | None) -> list[Check]:
    hw = [static_size, static_size] if static_size else ["H", "W"]
    want = {spec.INPUT_NAME: (["N", 3, *hw], "tensor(float)"),
            spec.OUTPUT_NAME: (["N", dims], "tensor(float)")}
    checks = []
    for arg in [*session.get_inputs(), *session.get_outputs()]:
        shape = [d if isinstance(d, int) else "N" if i == 0 else "HW"[i - 2]
                 for i, d in enumerate(arg.shape)]
        exp = want.pop(arg.name, None)
        ok = exp is not None and shape == exp[0] and arg.type == exp[1]
        checks.append(Check(f"io {arg.name}", ok, f"{_dims(shape)} {arg.type[7:-1]}",
                            f"{_dims(exp[0])} float" if exp else "unexpected name"))
    checks += [Check(f"io {name}", False, "missing", _dims(shape)) for name, (shape, _) in want.items()]
    return checks


def export(loaded: checkpoints.Loaded, output: str, precision: str, static_size: int | None,
           report: Report, opset: int = spec.ONNX_OPSET) -> None:
    """Write `output` atomically and add its checks to `report` (the caller prints it)."""
    graph = to_onnx(loaded.model, static_size, precision, opset)
    data = graph.SerializeToString()
    session = runtime.onnx_session(data)  # a graph ONNX Runtime cannot load is not written
    files.write_atomic(output, data)
    size_mb = os.path.getsize(output) / 1e6
    shape = f"[N,3,{static_size},{static_size}]" if static_size else "[N,3,H,W] (N, H, W dynamic)"
    report.log(f"exported ONNX opset {opset} {precision} {shape}: {size_mb:.1f} MB -> {output}",
               onnx=output, precision=precision, opset=opset, static_size=static_size,
               size_mb=round(size_mb, 1))
    validate_onnx(session, loaded, precision, static_size, report)


def validate_onnx(session, loaded: checkpoints.Loaded, precision: str, static_size: int | None,
                  report: Report) -> None:
    """Add the ONNX's names and shapes and its parity against the checkpoint's PyTorch
    model (`session`: runtime.onnx_session of the graph) to `report`, and log the step."""
    import onnxruntime as ort

    report.add(io_checks(session, loaded.dims, static_size))
    report.add(validate.model_parity(runtime.onnx_runner(session),
                                     validate.torch_runner(loaded.model), precision, static_size))
    report.log(f"validated with ONNX Runtime {ort.__version__} (ORT_ENABLE_ALL) against PyTorch "
               f"{torch.__version__} on real photographs", onnxruntime=ort.__version__,
               torch=torch.__version__)
