"""In-process rows: PyTorch eager, ONNX Runtime, and the client's own decode ceiling."""
from __future__ import annotations

import multiprocessing
import os
import time

import numpy as np

from sscd_triton import images
from sscd_triton.bench.common import PRE, Budget, Row, request_items

def time_calls(row: Row, call, requests: int, warmup: int) -> Row:
    """Closed loop, one call at a time: `call(i)` runs request i."""
    for i in range(warmup):
        call(i)
    start = time.perf_counter()
    for i in range(requests):
        t = time.perf_counter()
        call(i)
        row.latencies_ms.append((time.perf_counter() - t) * 1e3)
    row.wall_s = time.perf_counter() - start
    row.images = requests * row.batch
    return row


def batched_call(tensors: np.ndarray, batch: int, fn):
    cache = {}

    def call(i):
        key = (i * batch) % len(tensors)
        if key not in cache:
            cache[key] = np.ascontiguousarray(tensors[request_items(i, batch, len(tensors))])
        return fn(cache[key])
    return call


def torch_row(model, tensors, budget: Budget, device: str) -> Row:
    import torch

    row = Row("torch-eager", budget.batch, 1)
    model = model.to(device).eval()

    def fn(x):
        with torch.inference_mode():
            # Host tensor in, host descriptors out: what a serving path has to do too.
            out = model(torch.from_numpy(x).to(device))
            return out.cpu().numpy()
    if device != "cpu":
        row.note = f"on {device}, host->device copy and back included"
    return time_calls(row, batched_call(tensors, budget.batch, fn), budget.requests,
                      budget.warmup)


def ort_row(row_id: str, path: str, tensors, budget: Budget,
            providers: list[str]) -> tuple[Row, object]:
    from sscd_triton import runtime

    session = runtime.onnx_session(path, providers=providers)
    row = Row(row_id, budget.batch, 1, note=f"providers {','.join(session.get_providers())}")
    run = runtime.onnx_runner(session)
    timed = time_calls(row, batched_call(tensors, budget.batch, run), budget.requests,
                       budget.warmup)
    return timed, run


_JPEGS: list[bytes] = []


def _decode_init(jpegs: list[bytes]) -> None:
    global _JPEGS
    _JPEGS = jpegs


def _decode_one(i: int) -> float:
    t = time.perf_counter()
    images.load_tensor(_JPEGS[i % len(_JPEGS)], PRE)
    return (time.perf_counter() - t) * 1e3


def decode_rows(jpegs: list[bytes], budget: Budget) -> list[Row]:
    """Client-side decode + preprocess, per image: 1 process, then one per core."""
    one = Row("client-decode-1p", 1, 1)
    _decode_init(jpegs)
    time_calls(one, _decode_one, budget.images, max(budget.warmup, len(jpegs)))
    procs = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    many = Row("client-decode-Np", 1, procs, note=f"{procs} processes (spawn), tensors not returned")
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(procs, initializer=_decode_init, initargs=(jpegs,)) as pool:
        pool.map(_decode_one, range(max(procs * budget.warmup, len(jpegs))), chunksize=1)
        start = time.perf_counter()
        many.latencies_ms = pool.map(_decode_one, range(budget.images), chunksize=1)
        many.wall_s = time.perf_counter() - start
    many.images = budget.images
    return [one, many]


def export_onnx(model, path: str, precision: str) -> str:
    """fp32, fp16 (static 320, as the gpu target exports it) or int8 (the cpu Q/DQ form,
    calibrated on the bundled photographs, as build_repository does by default)."""
    import onnx

    from sscd_triton.export import int8, onnx_export

    if precision == "int8":
        fp32 = onnx_export.to_onnx(model).SerializeToString()
        data = int8.quantize(fp32, int8.bundled_calibration(PRE), "cpu")
        with open(path, "wb") as f:
            f.write(data)
        return path
    static = PRE.size if precision == "fp16" else None
    onnx.save(onnx_export.to_onnx(model, static, precision), path)
    return path


# --- the in-process rows, in order -------------------------------------------------------
class LocalUnavailable(Exception):
    """PyTorch (or this project's export code) cannot be imported here."""


def load_model(checkpoint: str | None, device_arg: str):
    """(model, checkpoint path, device) for the local rows and the local server: the
    checkpoint's PyTorch model, or the demo weights. Raises LocalUnavailable without torch,
    CheckpointError for a bad checkpoint."""
    try:
        import torch

        from sscd_triton.export import checkpoints, demo
    except ImportError as e:
        raise LocalUnavailable(f"not importable here: {e}") from None
    device = "cuda" if device_arg == "cuda" or (device_arg == "auto" and torch.cuda.is_available()) \
        else "cpu"
    checkpoint = checkpoint or demo.write_demo_checkpoint()
    return checkpoints.load(checkpoint).model.eval(), checkpoint, device


def model_rows(model, tensors: np.ndarray, budget: Budget, device: str,
               onnx_files: dict[str, str]):
    """torch-eager, then one ort-<precision> row per ONNX file; returns (rows, the fp32 ONNX's
    descriptors of the first batch, or None) for the served rows to compare against."""
    rows = [torch_row(model, tensors, budget, device)]
    model.to("cpu")
    ort_outputs = None
    try:
        import onnxruntime as ort
    except ImportError as e:
        return rows + [Row(f"ort-{p}", budget.batch, 1,
                           skipped=f"onnxruntime not importable: {e}")
                       for p in onnx_files], None
    providers = ["CPUExecutionProvider"]
    if device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    for precision, path in onnx_files.items():
        row, run = ort_row(f"ort-{precision}", path, tensors, budget, providers)
        rows.append(row)
        if precision == "fp32":
            ort_outputs = run(tensors[: budget.batch])
    return rows, ort_outputs


def onnx_files(model, precisions: list[str], work: str,
               served: dict[str, str]) -> dict[str, str]:
    """The ONNX file per precision: the served one (`served`: precision -> the local
    repository's ONNX) when there is one, exactly what the local server runs, else
    exported into `work`."""
    out = {}
    for precision in precisions:
        if served.get(precision) and os.path.exists(served[precision]):
            out[precision] = served[precision]
        else:
            out[precision] = export_onnx(model, os.path.join(work, f"sscd-{precision}.onnx"),
                                         precision)
    return out
