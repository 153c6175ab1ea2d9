"""Checkpoint -> ONNX (fp32, fp16 or calibrated int8), verified against PyTorch, written
atomically."""
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
    """Trace `model` (an SSCD or an upstream TorchScript module) to an fp32 or fp16 ONNX
    graph (int8 is quantised from the fp32 one: `export`).

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
           report: Report, opset: int = spec.ONNX_OPSET, *, calibration=None,
           target: str = "cpu", method: str | None = None,
           preprocess: spec.Preprocess | None = None) -> None:
    """Write `output` atomically and add its checks to `report` (the caller prints it).

    int8: `calibration` (export.int8.Calibration, preprocessed with `preprocess`) and
    `target` ("cpu" or "gpu": the Q/DQ form its backend runs) are required; `method` is
    the calibration method (default int8.DEFAULT_METHOD)."""
    if precision == "int8":
        return _export_int8(loaded, output, static_size, report, opset, calibration, target,
                            method, preprocess)
    graph = to_onnx(loaded.model, static_size, precision, opset)
    data = graph.SerializeToString()
    session = runtime.onnx_session(data)  # a graph ONNX Runtime cannot load is not written
    files.write_atomic(output, data)
    _log_written(output, precision, static_size, opset, report)
    validate_onnx(session, loaded, precision, static_size, report)


def _log_written(output: str, precision: str, static_size: int | None, opset: int,
                 report: Report) -> None:
    size_mb = os.path.getsize(output) / 1e6
    shape = f"[N,3,{static_size},{static_size}]" if static_size else "[N,3,H,W] (N, H, W dynamic)"
    report.log(f"exported ONNX opset {opset} {precision} {shape}: {size_mb:.1f} MB -> {output}",
               onnx=output, precision=precision, opset=opset, static_size=static_size,
               size_mb=round(size_mb, 1))


def _export_int8(loaded, output, static_size, report, opset, calibration, target, method,
                 preprocess) -> None:
    """fp32 graph (checked against PyTorch) -> calibrated QDQ int8 graph, and what int8
    costs against that fp32 graph on images calibration never saw."""
    from sscd_triton.export import int8

    if calibration is None or preprocess is None:
        raise ValueError("int8 export needs a calibration and its preprocessing")
    method = method or int8.DEFAULT_METHOD
    fp32 = to_onnx(loaded.model, static_size, "fp32", opset).SerializeToString()
    fp32_session = runtime.onnx_session(fp32)
    report.log(f"traced the fp32 graph; calibrating int8 for the {target} target "
               f"({int8.TARGET_ACTIVATIONS[target]} activations, int8 per-channel weights, "
               f"{method}) on {calibration.describe()}", calibration=calibration.describe(),
               calibration_images=len(calibration.tensors), calibration_method=method,
               calibration_bundled=calibration.bundled, int8_target=target)
    for path, why in calibration.skipped[:3]:
        report.note(f"skipped {path}: {why}")
    if len(calibration.skipped) > 3:
        report.note(f"... and {len(calibration.skipped) - 3} more files skipped")
    data = int8.quantize(fp32, calibration, target, method)
    session = runtime.onnx_session(data)
    files.write_atomic(output, data)
    _log_written(output, "int8", static_size, opset, report)
    report.add(io_checks(session, loaded.dims, static_size))
    report.add([Check(f"fp32 graph vs PyTorch: {c.name}", c.ok, c.detail, c.bound, c.figures)
                for c in validate.model_parity(runtime.onnx_runner(fp32_session),
                                               validate.torch_runner(loaded.model), "fp32",
                                               static_size)])
    checks, figures = int8.cost_checks(runtime.onnx_runner(fp32_session),
                                       runtime.onnx_runner(session), preprocess, calibration)
    report.add(checks)
    report.log(f"measured int8 against fp32 on {figures.get('held_out_photographs', 0)} "
               f"held-out photographs and {figures.get('held_out_queries', 0)} edited copies "
               f"({preprocess.upstream_name})", int8=figures)
    if target == "gpu":
        report.note("the gpu form was measured with ONNX Runtime's CPU kernels; the plan's own "
                    "figures: build_tensorrt.py --checkpoint on the serving GPU")


def validate_onnx(session, loaded: checkpoints.Loaded, precision: str, static_size: int | None,
                  report: Report, preprocess: spec.Preprocess | None = None) -> None:
    """Add the ONNX's names and shapes and its parity against the checkpoint's PyTorch
    model (`session`: runtime.onnx_session of the graph) to `report`, and log the step.
    An int8 graph is measured with `_export_int8`'s checks, against the PyTorch model here,
    on the copy-detection set (`preprocess`, default square) less the photographs its
    metadata says calibration used (none recorded: the report says they may be included)."""
    import onnxruntime as ort

    report.add(io_checks(session, loaded.dims, static_size))
    if precision == "int8":
        from sscd_triton.export import int8

        pre = preprocess or spec.PREPROCESS[spec.DEFAULT_PREPROCESS]
        calibration = int8.recorded_calibration(session.get_modelmeta().custom_metadata_map)
        if calibration is None:
            report.note("this int8 ONNX records no calibration images, so the 'held-out' "
                        "photographs below may include them")
            calibration = int8.Calibration([], [], set())
        checks, figures = int8.cost_checks(validate.torch_runner(loaded.model),
                                           runtime.onnx_runner(session), pre, calibration)
        report.add(checks)
        report.facts["int8"] = figures
    else:
        report.add(validate.model_parity(runtime.onnx_runner(session),
                                         validate.torch_runner(loaded.model), precision,
                                         static_size))
    report.log(f"validated with ONNX Runtime {ort.__version__} (ORT_ENABLE_ALL) against PyTorch "
               f"{torch.__version__} on real photographs", onnxruntime=ort.__version__,
               torch=torch.__version__)
