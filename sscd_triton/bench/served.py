"""Rows served by Triton: closed-loop clients, server statistics, the local cpu server."""
from __future__ import annotations

import itertools
import math
import threading
import time

import numpy as np

from sscd_triton import images, samples, spec
from sscd_triton.bench.common import PRE, Budget, Row, request_items

STAT_FIELDS = ("success", "queue", "compute_input", "compute_infer", "compute_output")


def read_stats(client, model: str, headers: dict | None = None) -> dict | None:
    try:
        stats = client.get_inference_statistics(model, headers=headers, as_json=True)["model_stats"]
    except Exception:
        return None  # statistics protocol restricted, or model unknown
    out = {"inference_count": 0, "execution_count": 0, **{f: [0, 0] for f in STAT_FIELDS}}
    for s in stats:  # every version
        out["inference_count"] += int(s.get("inference_count", 0))
        out["execution_count"] += int(s.get("execution_count", 0))
        for f in STAT_FIELDS:
            d = s.get("inference_stats", {}).get(f, {})
            out[f][0] += int(d.get("count", 0))
            out[f][1] += int(d.get("ns", 0))
    return out


def settled_stats(client, models: list[str], headers: dict | None, timeout: float = 2.0) -> dict:
    """Statistics once they stop moving: a response can reach the client before the
    server has counted it (the ensemble's own counters lag its composing models')."""
    now = {m: read_stats(client, m, headers) for m in models}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(v is not None for v in now.values()):
        time.sleep(0.05)
        again = {m: read_stats(client, m, headers) for m in models}
        if again == now:
            break
        now = again
    return now


def stats_delta(before: dict | None, after: dict | None) -> dict | None:
    if before is None or after is None:
        return None
    inf = after["inference_count"] - before["inference_count"]
    exe = after["execution_count"] - before["execution_count"]
    out = {"inferences": inf, "executions": exe,
           "mean_batch": round(inf / exe, 2) if exe else None}
    for f in STAT_FIELDS:
        count = after[f][0] - before[f][0]
        ns = after[f][1] - before[f][1]
        out[f"{f}_ms"] = round(ns / count / 1e6, 2) if count else None
    return out


def triton_row(row: Row, client, model: str, make_inputs, requests: int, warmup_rounds: int,
               stat_models: list[str], headers: dict | None) -> Row:
    """Closed loop with `row.concurrency` threads over one shared client."""
    import tritonclient.grpc as grpcclient

    outputs = [grpcclient.InferRequestedOutput(spec.OUTPUT_NAME)]
    cache: dict = {}
    lock = threading.Lock()

    def inputs_for(i):
        key = (i * row.batch) % len(samples.PHOTOGRAPHS)
        with lock:
            if key not in cache:
                cache[key] = make_inputs(request_items(i, row.batch, len(samples.PHOTOGRAPHS)))
            return cache[key]

    first = client.infer(model, inputs_for(0), outputs=outputs).as_numpy(spec.OUTPUT_NAME)
    if first.shape[0] != row.batch or not np.isfinite(first).all():
        raise RuntimeError(f"{model}: unexpected output {first.shape} for a batch of {row.batch}")

    def run(total: int, latencies: list | None):
        counter = itertools.count()
        errors = []

        def worker():
            while True:
                with lock:
                    i = next(counter)
                if i >= total or errors:
                    return
                inputs = inputs_for(i)
                t = time.perf_counter()
                try:
                    client.infer(model, inputs, outputs=outputs)
                except Exception as e:  # noqa: BLE001  reported after the threads stop
                    errors.append(e)
                    return
                if latencies is not None:
                    latencies.append((time.perf_counter() - t) * 1e3)
        threads = [threading.Thread(target=worker) for _ in range(row.concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]

    run(warmup_rounds * row.concurrency, None)
    before = settled_stats(client, stat_models, headers)
    start = time.perf_counter()
    run(requests, row.latencies_ms)
    row.wall_s = time.perf_counter() - start
    row.images = requests * row.batch
    after = settled_stats(client, stat_models, headers)
    for m in stat_models:
        delta = stats_delta(before[m], after[m])
        if delta is not None:
            row.server[m] = delta
    return row


def descriptor_inputs(tensors: np.ndarray):
    import tritonclient.grpc as grpcclient

    def make(items):
        x = np.ascontiguousarray(tensors[items])
        inp = grpcclient.InferInput(spec.INPUT_NAME, list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        return [inp]
    return make


def ensemble_inputs(jpegs: list[bytes]):
    import tritonclient.grpc as grpcclient

    def make(items):
        arr = images.pack_rows([jpegs[i] for i in items])
        inp = grpcclient.InferInput(spec.ENSEMBLE_INPUT, list(arr.shape), "UINT8")
        inp.set_data_from_numpy(arr)
        return [inp]
    return make


def model_check(client, model: str, batch: int, want_dtype: str, headers: dict | None) -> str:
    """'' when `model` can take a request of `batch` items, else why not.

    A server that restricts the model-config protocol (docker/entrypoint.sh does, behind
    the admin key) cannot be asked: the row is then tried anyway."""
    try:
        if not client.is_model_ready(model):
            return f"model {model} not ready on the server"
    except Exception as e:  # noqa: BLE001
        return f"model {model}: {str(e).splitlines()[0][:160]}"
    try:
        cfg = client.get_model_config(model, headers=headers, as_json=True)["config"]
    except Exception:  # noqa: BLE001
        return ""
    max_batch = int(cfg.get("max_batch_size", 0))
    if max_batch and batch > max_batch:
        return f"batch {batch} > {model} max_batch_size {max_batch}"
    dtype = cfg["input"][0].get("data_type", "")
    if dtype != want_dtype:
        return f"{model} input is {dtype}, this benchmark sends {want_dtype}"
    dims = [int(d) for d in cfg["input"][0].get("dims", [])]
    if want_dtype == "TYPE_FP32" and dims not in ([3, PRE.size, PRE.size], [3, -1, -1]):
        return f"{model} input dims {dims} do not take [3, {PRE.size}, {PRE.size}]"
    return ""


# --- the local server ----------------------------------------------------------------------
def build_cpu_repository(checkpoint: str, out: str, max_batch: int,
                         precision: str = "fp32") -> str:
    """The cpu repository the local rows' weights are served from; returns its ONNX.
    int8 is calibrated on the bundled photographs (export.int8.bundled_calibration). A
    failed accuracy check is printed, not fatal: this measures speed (the export commands
    are where accuracy decides)."""
    from sscd_triton.serving.build import build_repository

    built = build_repository(out, "cpu", checkpoint, max_batch=max_batch, precision=precision)
    if not built.passed:
        failed = [f"{c.name}: {c.detail}" for c in built.report.checks if c.ok is False]
        print(f"[bench] note: the {precision} repository fails "
              f"{len(failed)} accuracy check(s), measured for speed anyway: "
              + "; ".join(failed[:3]), flush=True)
    return built.onnx


# --- the served rows, in order -------------------------------------------------------------
SERVED_ROWS = ("triton-descriptor", "triton-ensemble-1", "triton-ensemble-B")


def served_rows(client, tensors: np.ndarray, jpegs: list[bytes], budget: Budget,
                ort_outputs: np.ndarray | None, which: tuple[str, ...] = SERVED_ROWS,
                suffix: str = "") -> list[Row]:
    """triton-descriptor (tensors in), triton-ensemble-1 and -B (encoded bytes in), those of
    them in `which`, named with `suffix` (e.g. "-int8"). A row the server cannot take is
    skipped with the reason, not fatal."""
    headers = {spec.GRPC_ADMIN_HEADER: budget.admin_key} if budget.admin_key else None
    plan = [("triton-descriptor", spec.DESCRIPTOR_MODEL, budget.batch, "TYPE_FP32",
             descriptor_inputs(tensors), [spec.DESCRIPTOR_MODEL]),
            *[(row_id, spec.ENSEMBLE_NAME, batch, "TYPE_UINT8", ensemble_inputs(jpegs),
               [spec.ENSEMBLE_NAME, spec.PREPROCESS_MODEL, spec.DESCRIPTOR_MODEL])
              for row_id, batch in (("triton-ensemble-1", 1),
                                    ("triton-ensemble-B", budget.batch))]]
    rows = []
    for row_id, model_name, batch, dtype, make_inputs, stat_models in plan:
        if row_id not in which:
            continue
        row_id += suffix
        why = model_check(client, model_name, batch, dtype, headers)
        if why:
            rows.append(Row(row_id, batch, budget.concurrency, skipped=why))
            continue
        try:
            row = triton_row(Row(row_id, batch, budget.concurrency), client, model_name,
                             make_inputs, math.ceil(budget.images / batch), budget.warmup,
                             stat_models, headers)
        except Exception as e:  # noqa: BLE001
            msg = e.message() if hasattr(e, "message") and callable(e.message) else str(e)
            rows.append(Row(row_id, batch, budget.concurrency,
                            skipped=f"failed: {str(msg).strip()[:300]}"))
            continue
        if row_id == "triton-descriptor" and ort_outputs is not None:
            served = client.infer(model_name, make_inputs(list(range(batch)))).as_numpy(
                spec.OUTPUT_NAME)
            row.note = f"max |served - ort-fp32| = {float(np.abs(served - ort_outputs).max()):.1e}"
        rows.append(row)
    return rows
