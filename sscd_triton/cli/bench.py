#!/usr/bin/env python
"""Latency and throughput of every way to get an SSCD descriptor, side by side, one run.

    python benchmarks/bench.py                       # local cpu repository, demo weights
    python benchmarks/bench.py --url HOST:8001       # an already-running server (e.g. gpu)

Rows (all on the same machine, in the same run, same weights, square320 preprocessing):
  torch-eager          PyTorch eager fp32 (torch.inference_mode) on preprocessed tensors
  ort-fp32             ONNX Runtime, the fp32 ONNX, on the same tensors
  ort-fp16             ONNX Runtime, the fp16 ONNX with its fp32 island (--precision fp16)
  triton-descriptor    Triton `sscd_descriptor`: float32 tensors in over gRPC
  triton-ensemble-1    Triton `sscd` ensemble: one encoded JPEG per request
  triton-ensemble-B    Triton `sscd` ensemble: B JPEGs per request (zero-padded uint8 [B, L])
  client-decode-1p     PIL decode + preprocess (sscd_triton.images.load_tensor), 1 process
  client-decode-Np     the same on N processes (every core): the client's decode ceiling

Latency is per request (per call for the local rows), from the client. Triton rows run
closed-loop with C threads each keeping one request in flight (perf_analyzer's
"concurrency" mode) over one shared gRPC client and pre-built inputs. Server-side mean
batch size and queue / compute times come from the deltas of Triton's statistics
extension over the timed requests only. Exit status: 0, or 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import math
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from sscd_triton import images, samples, spec

PRE = spec.PREPROCESS["square320"]
JPEG_QUALITY = 90
# docker/entrypoint.sh restricts the statistics and model-config protocols behind the header
# `sscd-admin-key`; over gRPC Triton expects it with this prefix (its error message says so).
ADMIN_HEADER = "sscd-admin-key"
GRPC_ADMIN_HEADER = f"triton-grpc-protocol-{ADMIN_HEADER}"

# Row ids in print order; B and N are filled in from the arguments.
ROW_IDS = ("torch-eager", "ort-fp32", "ort-fp16", "triton-descriptor", "triton-ensemble-1",
           "triton-ensemble-B", "client-decode-1p", "client-decode-Np")
ROW_HELP = {
    "torch-eager": "PyTorch eager fp32, inference_mode, preprocessed tensors",
    "ort-fp32": "ONNX Runtime direct, fp32 ONNX, same tensors",
    "ort-fp16": "ONNX Runtime direct, fp16 ONNX with fp32 GeM/Linear/L2 island",
    "triton-descriptor": f"Triton {spec.DESCRIPTOR_MODEL}: float32 tensors over gRPC",
    "triton-ensemble-1": f"Triton {spec.ENSEMBLE_NAME} ensemble: 1 JPEG per request, server decodes",
    "triton-ensemble-B": f"Triton {spec.ENSEMBLE_NAME} ensemble: B JPEGs per request (uint8 [B, L])",
    "client-decode-1p": "client PIL decode + preprocess only (images.load_tensor), 1 process",
    "client-decode-Np": "client PIL decode + preprocess only, one process per core",
}


# --- results ---------------------------------------------------------------------------
@dataclass
class Row:
    id: str
    batch: int  # images per request
    concurrency: int
    images: int = 0  # images timed
    wall_s: float = 0.0
    latencies_ms: list = field(default_factory=list)  # one per request
    skipped: str = ""  # why the row did not run
    note: str = ""
    server: dict = field(default_factory=dict)  # model -> statistics deltas (Triton rows)
    load1: float = field(default_factory=lambda: round(os.getloadavg()[0], 2))  # at row start

    @property
    def images_per_s(self) -> float:
        return self.images / self.wall_s if self.wall_s > 0 else float("nan")

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    def summary(self, baseline: float | None) -> dict:
        out = {"path": self.id, "batch": self.batch, "concurrency": self.concurrency,
               "requests": len(self.latencies_ms), "images": self.images,
               "wall_s": round(self.wall_s, 3), "load1_at_start": self.load1}
        if self.skipped:
            return {**out, "skipped": self.skipped}
        out.update(images_per_s=round(self.images_per_s, 3),
                   p50_ms=round(self.pct(50), 2), p90_ms=round(self.pct(90), 2),
                   p99_ms=round(self.pct(99), 2),
                   ratio_vs_torch_eager=(round(self.images_per_s / baseline, 3)
                                         if baseline else None))
        if self.note:
            out["note"] = self.note
        if self.server:
            out["server"] = self.server
        return out


# --- the device ------------------------------------------------------------------------
def _cmd(args: list[str]) -> str:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def describe_device(server_meta: dict | None, url: str | None) -> dict:
    """What these numbers were measured on: never quote them without it."""
    lscpu = {}
    for line in _cmd(["lscpu"]).splitlines():
        key, _, value = line.partition(":")
        lscpu[key.strip()] = value.strip()
    info = {
        "cpu_model": lscpu.get("Model name") or platform.processor() or "unknown",
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "hypervisor": lscpu.get("Hypervisor vendor", ""),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "gpus": [line for line in _cmd(["nvidia-smi", "-L"]).splitlines() if line.strip()],
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        import torch
        info["torch"] = f"{torch.__version__} ({torch.get_num_threads()} threads)"
        info["cuda"] = torch.version.cuda if torch.cuda.is_available() else None
    except ImportError:
        info["torch"] = None
    try:
        import onnxruntime as ort
        info["onnxruntime"] = f"{ort.__version__} ({', '.join(ort.get_available_providers())})"
    except ImportError:
        info["onnxruntime"] = None
    try:
        from importlib.metadata import version
        info["tritonclient"] = version("tritonclient")
    except Exception:
        info["tritonclient"] = None
    if server_meta:
        where = f"remote {url}" if url else "local, 127.0.0.1, same machine as the client"
        info["tritonserver"] = f"{server_meta.get('version', '?')} ({where})"
    else:
        info["tritonserver"] = None
    return info


def print_device(info: dict) -> None:
    print("=" * 100)
    print("sscd-triton benchmark: device")
    gpus = "; ".join(info["gpus"]) or "none"
    print(f"  cpu          {info['cpu_model']}: {info['cpu_count']} logical cpus"
          f" ({info['cpus_usable']} usable){', ' + info['hypervisor'] + ' VM' if info['hypervisor'] else ''}")
    print(f"  load avg     {info['load_average_at_start']} (1/5/15 min) at start")
    print(f"  gpu          {gpus}")
    for key in ("python", "torch", "onnxruntime", "tritonclient", "tritonserver"):
        print(f"  {key:<12} {info.get(key) or 'not available'}")
    print("=" * 100)


# --- inputs ----------------------------------------------------------------------------
def load_inputs() -> tuple[list[bytes], np.ndarray]:
    """The fixed photographs as JPEG bytes, and their square320 tensors [P, 3, 320, 320]."""
    jpegs = [images.encode(img, "JPEG", quality=JPEG_QUALITY) for _, img in samples.photographs()]
    tensors = np.stack([images.load_tensor(j, PRE) for j in jpegs])
    return jpegs, tensors


def request_items(i: int, per_request: int, pool: int) -> list[int]:
    """Photograph indices of request i: the fixed set, cycled."""
    return [(i * per_request + k) % pool for k in range(per_request)]


# --- local rows ------------------------------------------------------------------------
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


def torch_row(model, tensors, args, device: str) -> Row:
    import torch

    row = Row("torch-eager", args.batch, 1)
    model = model.to(device).eval()

    def fn(x):
        with torch.inference_mode():
            # Host tensor in, host descriptors out: what a serving path has to do too.
            out = model(torch.from_numpy(x).to(device))
            return out.cpu().numpy()
    if device != "cpu":
        row.note = f"on {device}, host->device copy and back included"
    return time_calls(row, batched_call(tensors, args.batch, fn), args.requests, args.warmup)


def ort_row(row_id: str, path: str, tensors, args, providers: list[str]) -> tuple[Row, object]:
    from sscd_triton import runtime

    session = runtime.onnx_session(path, providers=providers)
    row = Row(row_id, args.batch, 1, note=f"providers {','.join(session.get_providers())}")
    run = runtime.onnx_runner(session)
    return time_calls(row, batched_call(tensors, args.batch, run), args.requests, args.warmup), run


_JPEGS: list[bytes] = []


def _decode_init(jpegs: list[bytes]) -> None:
    global _JPEGS
    _JPEGS = jpegs


def _decode_one(i: int) -> float:
    t = time.perf_counter()
    images.load_tensor(_JPEGS[i % len(_JPEGS)], PRE)
    return (time.perf_counter() - t) * 1e3


def decode_rows(jpegs: list[bytes], args) -> list[Row]:
    """Client-side decode + preprocess, per image: 1 process, then one per core."""
    one = Row("client-decode-1p", 1, 1)
    _decode_init(jpegs)
    time_calls(one, _decode_one, args.images, max(args.warmup, len(jpegs)))
    procs = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    many = Row("client-decode-Np", 1, procs, note=f"{procs} processes (spawn), tensors not returned")
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(procs, initializer=_decode_init, initargs=(jpegs,)) as pool:
        pool.map(_decode_one, range(max(procs * args.warmup, len(jpegs))), chunksize=1)
        start = time.perf_counter()
        many.latencies_ms = pool.map(_decode_one, range(args.images), chunksize=1)
        many.wall_s = time.perf_counter() - start
    many.images = args.images
    return [one, many]


# --- Triton rows -----------------------------------------------------------------------
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


# --- setup -----------------------------------------------------------------------------
def build_cpu_repository(checkpoint: str, out: str, max_batch: int) -> None:
    from sscd_triton.cli import build_repository

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = build_repository.main(["--checkpoint", checkpoint, "--target", "cpu",
                                      "--output", out, "--max-batch", str(max_batch)])
    if code != 0:
        sys.stdout.write(buf.getvalue())
        raise RuntimeError(f"building the cpu repository failed (exit {code})")


def export_onnx(model, path: str, precision: str) -> str:
    import onnx

    from sscd_triton.export import onnx_export

    static = PRE.size if precision == "fp16" else None
    onnx.save(onnx_export.to_onnx(model, static, precision), path)
    return path


# --- output ----------------------------------------------------------------------------
def _f(x: float, digits: int = 1) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def print_table(rows: list[Row], baseline: float | None, args) -> None:
    head = (f"{'path':<20} {'batch':>5} {'conc':>4} {'reqs':>5} {'images/s':>9} "
            f"{'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'ratio vs torch-eager':>21} {'load':>5}")
    print("\n" + head)
    print("-" * len(head))
    for r in rows:
        if r.skipped:
            continue
        ratio = f"x{r.images_per_s / baseline:.2f}" if baseline else "n/a"
        print(f"{r.id:<20} {r.batch:>5} {r.concurrency:>4} {len(r.latencies_ms):>5} "
              f"{_f(r.images_per_s, 2):>9} {_f(r.pct(50)):>9} {_f(r.pct(90)):>9} "
              f"{_f(r.pct(99)):>9} {ratio:>21} {r.load1:>5.2f}")
    print("-" * len(head))
    print(f"latency: per request (local rows: per call; batch = images per request), "
          f"percentiles over 'reqs' samples; {args.warmup} warm-up round(s) before each row;\n"
          f"load = 1-minute load average when the row started (other processes share these cores)")
    for r in rows:
        if r.skipped:
            continue
        extra = f" [{r.note}]" if r.note else ""
        print(f"  {r.id:<20} {ROW_HELP[r.id].replace('B ', f'{r.batch} ', 1)}{extra}")
    for r in rows:
        if r.skipped:
            print(f"  skipped {r.id}: {r.skipped}")
    if not baseline:
        print("  ratio n/a: the torch-eager row did not run")


def print_server(rows: list[Row]) -> None:
    served = [r for r in rows if r.server]
    if not served:
        if any(r.id.startswith("triton") and not r.skipped for r in rows):
            print("\nserver statistics: not available (statistics protocol restricted? give "
                  "--admin-key or set SSCD_ADMIN_KEY)")
        return
    head = (f"{'path':<20} {'model':<16} {'infers':>6} {'execs':>5} {'mean batch':>10} "
            f"{'queue':>8} {'c.input':>8} {'c.infer':>8} {'c.output':>8} {'server':>8}")
    print("\nserver side (Triton statistics over the timed requests; ms are per-request means)")
    print(head)
    print("-" * len(head))
    for r in served:
        for model, s in r.server.items():
            print(f"{r.id:<20} {model:<16} {s['inferences']:>6} {s['executions']:>5} "
                  f"{_f(s['mean_batch'], 2):>10} {_f(s['queue_ms']):>8} "
                  f"{_f(s['compute_input_ms']):>8} {_f(s['compute_infer_ms']):>8} "
                  f"{_f(s['compute_output_ms']):>8} {_f(s['success_ms']):>8}")
    print("-" * len(head))
    print("mean batch = inference_count / execution_count: what the dynamic batcher formed (the ensemble\n"
          "itself never batches: its 'mean batch' is just images per request). queue = waiting in the\n"
          "scheduler; c.* = compute input/infer/output; server = the whole request inside the server.\n"
          "For the ensemble the composing models show where the time goes; client p50 minus 'server'\n"
          "is gRPC + client overhead.")


# --- main ------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=64,
                   help="images timed per row (default 64: 1-2.5 min on a shared 2-core CPU)")
    p.add_argument("--batch", type=int, default=8, help="images per request/call (default 8)")
    p.add_argument("--concurrency", type=int, default=4,
                   help="requests in flight for the Triton rows (default 4)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed warm-up rounds per row (a round: one call, or C requests)")
    p.add_argument("--precision", nargs="+", default=["fp32"],
                   help="ONNX Runtime rows: fp32 and/or fp16 (fp16-island ONNX), e.g. "
                        "--precision fp32 fp16")
    p.add_argument("--url", help="benchmark an already-running server at HOST:PORT (gRPC) "
                                 "instead of building and starting the local cpu one")
    p.add_argument("--checkpoint", help="SSCD checkpoint for the local rows and the local "
                                        "server (default: the untrained demo weights)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="PyTorch / ONNX Runtime rows (auto: cuda when torch sees a GPU)")
    p.add_argument("--admin-key", default=os.environ.get("SSCD_ADMIN_KEY"),
                   help=f"the server's admin key (docker/entrypoint.sh), sent as gRPC header "
                        f"{GRPC_ADMIN_HEADER} for the restricted statistics and model-config "
                        "protocols (default: $SSCD_ADMIN_KEY)")
    p.add_argument("--json", metavar="OUT", help="write every result to this JSON file")
    p.add_argument("--keep-log", action="store_true", help="keep the local server's log")
    args = p.parse_args(argv)
    args.precision = sorted({x for v in args.precision for x in v.split(",") if x},
                            key=("fp32", "fp16").index) if all(
        x in ("fp32", "fp16") for v in args.precision for x in v.split(",") if x) else None
    for name in ("images", "batch", "concurrency"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if not args.precision:
        p.error("--precision takes fp32 and/or fp16")
    args.requests = math.ceil(args.images / args.batch)  # batched rows
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    jpegs, tensors = load_inputs()
    rows: dict[str, Row] = {}

    def skip(row_id: str, batch: int, conc: int, why: str):
        rows[row_id] = Row(row_id, batch, conc, skipped=why)

    # Local models: the same weights as the local server.
    have_torch = True
    try:
        import torch
        from sscd_triton.export import checkpoints, demo
    except ImportError as e:
        have_torch = False
        torch_missing = f"not importable here: {e}"
    device = "cpu"
    if have_torch:
        if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
            device = "cuda"
        checkpoint = args.checkpoint or demo.write_demo_checkpoint()
        try:
            model = checkpoints.load(checkpoint).model.eval()
        except (OSError, checkpoints.CheckpointError) as e:
            print(f"error: --checkpoint: {e}", file=sys.stderr)
            return 2

    work = tempfile.mkdtemp(prefix="sscd-bench-")
    server = None
    try:
        # Server first: its version belongs in the header.
        url = args.url
        if url is None:
            if not have_torch:
                print(f"error: no --url and the local repository cannot be built ({torch_missing})",
                      file=sys.stderr)
                return 2
            from sscd_triton.serving.server import TritonServer

            repo = os.path.join(work, "repository")
            t = time.perf_counter()
            build_cpu_repository(checkpoint, repo, max(16, args.batch))
            build_s = time.perf_counter() - t
            t = time.perf_counter()
            log = None
            if args.keep_log:
                fd, log = tempfile.mkstemp(prefix="sscd-bench-tritonserver-", suffix=".log")
                os.close(fd)
                print(f"server log: {log}")
            server = TritonServer(repo, log_path=log).start()
            url = server.grpc_url
            setup_note = (f"local cpu repository (demo weights unless --checkpoint), max batch "
                          f"{max(16, args.batch)}: built in {build_s:.0f} s, server ready in "
                          f"{time.perf_counter() - t:.0f} s")
        else:
            setup_note = f"remote server {url}: its weights are whatever it serves"
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(url)
        try:
            meta = client.get_server_metadata(as_json=True)
        except Exception as e:  # noqa: BLE001
            print(f"error: no Triton server answering at {url}: {e}", file=sys.stderr)
            return 2
        info = describe_device(meta, args.url)
        print_device(info)
        print(f"setup: {setup_note}")
        print(f"inputs: {len(jpegs)} real photographs (sscd_triton.samples) as JPEG q{JPEG_QUALITY},"
              f" cycled; {PRE.upstream_name} ({PRE.size}x{PRE.size}); {args.images} images per "
              f"row, batch {args.batch}, concurrency {args.concurrency}")
        sys.stdout.flush()

        # 1-2: PyTorch and ONNX Runtime on the same tensors.
        ort_outputs = None
        if have_torch:
            onnx_files = {}
            for precision in args.precision:
                path = os.path.join(work, f"sscd-{precision}.onnx")
                built = os.path.join(work, "repository", spec.DESCRIPTOR_MODEL, "1", "model.onnx")
                if precision == "fp32" and args.url is None and os.path.exists(built):
                    onnx_files[precision] = built  # exactly what the local server serves
                else:
                    onnx_files[precision] = export_onnx(model, path, precision)
            rows["torch-eager"] = torch_row(model, tensors, args, device)
            model.to("cpu")
            try:
                import onnxruntime as ort
                providers = ["CPUExecutionProvider"]
                if device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
                    providers.insert(0, "CUDAExecutionProvider")
                for precision, path in onnx_files.items():
                    row, run = ort_row(f"ort-{precision}", path, tensors, args, providers)
                    rows[row.id] = row
                    if precision == "fp32":
                        ort_outputs = run(tensors[: args.batch])
            except ImportError as e:
                for precision in args.precision:
                    skip(f"ort-{precision}", args.batch, 1, f"onnxruntime not importable: {e}")
        else:
            skip("torch-eager", args.batch, 1, torch_missing)
            for precision in args.precision:
                skip(f"ort-{precision}", args.batch, 1, torch_missing)

        # 5: client decode ceiling (before the server rows load the CPU).
        for row in decode_rows(jpegs, args):
            rows[row.id] = row
        sys.stdout.flush()

        # 3 and 4: the descriptor model (tensors in), the ensemble (bytes in, 1 and B per
        # request). A row the server cannot take is skipped with the reason, not fatal.
        headers = {GRPC_ADMIN_HEADER: args.admin_key} if args.admin_key else None
        triton = [("triton-descriptor", spec.DESCRIPTOR_MODEL, args.batch, "TYPE_FP32",
                   descriptor_inputs(tensors), [spec.DESCRIPTOR_MODEL]),
                  *[(row_id, spec.ENSEMBLE_NAME, batch, "TYPE_UINT8", ensemble_inputs(jpegs),
                     [spec.ENSEMBLE_NAME, spec.PREPROCESS_MODEL, spec.DESCRIPTOR_MODEL])
                    for row_id, batch in (("triton-ensemble-1", 1),
                                          ("triton-ensemble-B", args.batch))]]
        for row_id, model_name, batch, dtype, make_inputs, stat_models in triton:
            why = model_check(client, model_name, batch, dtype, headers)
            if why:
                skip(row_id, batch, args.concurrency, why)
                continue
            try:
                row = triton_row(Row(row_id, batch, args.concurrency), client, model_name,
                                 make_inputs, math.ceil(args.images / batch), args.warmup,
                                 stat_models, headers)
            except Exception as e:  # noqa: BLE001
                msg = e.message() if hasattr(e, "message") and callable(e.message) else str(e)
                skip(row_id, batch, args.concurrency, f"failed: {str(msg).strip()[:300]}")
                continue
            if row_id == "triton-descriptor" and ort_outputs is not None:
                served = client.infer(model_name, make_inputs(list(range(batch)))).as_numpy(
                    spec.OUTPUT_NAME)
                row.note = f"max |served - ort-fp32| = {float(np.abs(served - ort_outputs).max()):.1e}"
            rows[row_id] = row
        client.close()
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)

    ordered = [rows[i] for i in ROW_IDS if i in rows]
    base = rows.get("torch-eager")
    baseline = base.images_per_s if base and not base.skipped else None
    print_table(ordered, baseline, args)
    print_server(ordered)
    info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    total = time.perf_counter() - t_start
    print(f"\nload average at end {info['load_average_at_end']}; total {total:.0f} s. "
          f"Quote these numbers with the device above.")
    if args.json:
        result = {"device": info, "setup": setup_note,
                  "config": {k: v for k, v in vars(args).items() if k != "json"},
                  "preprocess": PRE.upstream_name, "photographs": len(jpegs),
                  "rows": [r.summary(baseline) for r in ordered], "total_s": round(total, 1)}
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
