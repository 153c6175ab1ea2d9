"""The served sweep with NVIDIA's perf_analyzer, the in-process rows beside it, a CSV and a plot.

perf_analyzer (installed by scripts/install_perf_analyzer.py, or the NGC -py3-sdk
container's) drives the server:
  - ensemble `sscd`, one real JPEG per request (the 16 photographs as JSON b64 steps),
    concurrency sweep, then request-rate mode at fractions of the best concurrency's rate;
  - descriptor `sscd_descriptor`, float32 [B, 3, 320, 320] tensors (a real preprocessed
    photograph), concurrency sweep.
Each point is one perf_analyzer run (`-f` CSV, `--verbose-csv`); its composing-model
statistics (printed, not in its CSV) are parsed from its output and appended as columns.
In-process rows that perf_analyzer cannot measure (PyTorch, ONNX Runtime, decode, and the
pipeline decode + resize + ONNX Runtime with no server) come from sscd_triton.bench.local
on the same photographs.
"""
from __future__ import annotations

import base64
import csv
import math
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field

import numpy as np

from sscd_triton import images, spec
from sscd_triton.bench.common import PRE, Budget, Row

COMPOSING = (spec.PREPROCESS_MODEL, spec.DESCRIPTOR_MODEL)
# Columns this module appends after perf_analyzer's own.
EXTRA = ("Mode", "Batch", "Images/Second", "Stability %", "Window ms", "Load Average")
MODEL_COLS = ("mean batch", "queue us", "compute infer us", "request us")


def find_perf_analyzer(explicit: str | None = None) -> str | None:
    """--perf-analyzer, else the venv's wrapper beside this interpreter, else PATH."""
    import sys

    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    for cand in (os.path.join(os.path.dirname(sys.executable), "perf_analyzer"),
                 shutil.which("perf_analyzer")):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


# --- perf_analyzer inputs -------------------------------------------------------------------
def write_ensemble_data(jpegs: list[bytes], path: str) -> str:
    """JSON input data: one step per photograph, its JPEG bytes as the `image` input."""
    import json

    steps = [{spec.ENSEMBLE_INPUT: {"b64": base64.b64encode(j).decode(), "shape": [len(j)]}}
             for j in jpegs]
    with open(path, "w") as f:
        json.dump({"data": steps}, f)
    return path


def write_descriptor_data(tensor: np.ndarray, folder: str) -> str:
    """Directory input data: one raw float32 file named after the input."""
    os.makedirs(folder, exist_ok=True)
    np.ascontiguousarray(tensor, np.float32).tofile(os.path.join(folder, spec.INPUT_NAME))
    return folder


# --- one perf_analyzer run -------------------------------------------------------------------
@dataclass
class Point:
    path: str  # "ensemble" | "descriptor"
    mode: str  # "concurrency" | "request_rate"
    value: float
    batch: int
    row: dict = field(default_factory=dict)  # perf_analyzer's CSV row + EXTRA + composing
    error: str = ""


_MODEL_RE = re.compile(r"^\s*(\S+), version: \S+\s*$")
_NUM = r"([0-9.]+)"


def parse_composing(stdout: str) -> dict[str, dict]:
    """Per composing model (or the model itself under "Server:"): counts and mean times (us)
    from perf_analyzer's printed summary of its last measurement."""
    out: dict[str, dict] = {}
    current = None
    # The last measurement block ("Request concurrency: N" / "Request Rate: R inference
    # requests per seconds"), not the closing summary ("Request Rate: R, throughput: ...").
    starts = [m.end() for m in re.finditer(
        r"^(Request concurrency: \S+|Request Rate: \S+ inference requests.*)$", stdout, re.M)]
    section = stdout[starts[-1]:] if starts else stdout
    for line in section.splitlines():
        m = _MODEL_RE.match(line)
        if m:
            current = out.setdefault(m.group(1), {})
            continue
        if line.strip() == "Server:":
            current = out.setdefault("_server", {})
            continue
        if current is None:
            continue
        for key, pat in (("inferences", r"Inference count: (\d+)"),
                         ("executions", r"Execution count: (\d+)"),
                         ("request us", r"Avg request latency: (\d+) usec"),
                         ("queue us", r"queue (\d+) usec"),
                         ("compute infer us", r"compute infer (\d+) usec"),
                         ("compute us", r"compute (\d+) usec")):
            m = re.search(pat, line)
            if m:
                current[key] = int(m.group(1))
    for stats in out.values():
        if stats.get("executions"):
            stats["mean batch"] = round(stats.get("inferences", 0) / stats["executions"], 2)
        stats.setdefault("compute infer us", stats.get("compute us"))
    return out


# (stability %, window x) per try. A shared machine can fail 25% stability, and on a slow or
# busy one a window can end with no request completed ("No valid requests recorded"): the
# last try accepts 100% over a doubled window. The CSV's Stability % and Window ms say which.
ATTEMPTS = ((25, 1), (100, 1), (100, 2))
# --quick is the test's size on a shared 2-core machine, where a point of a few requests per
# window can miss even 100%: its last try takes whatever the windows give (max / min within
# 101x), so the run shows every point; Stability % 10000 in the CSV marks such a number.
QUICK_ATTEMPTS = ATTEMPTS + ((10000, 2),)
# What another try can cure (perf_analyzer's own words, src/inference_profiler.cc); a
# refused protocol, an unknown model or no server ends the point at once.
RETRYABLE = re.compile(r"stable|no valid requests|timed out", re.I)


def admin_args(key: str | None) -> list[str]:
    """perf_analyzer's header for a server whose model-config and statistics protocols are
    restricted (docker/entrypoint.sh): without it perf_analyzer cannot read the model's
    config and measures nothing."""
    return ["-H", f"{spec.GRPC_ADMIN_HEADER}:{key}"] if key else []


def run_point(pa: str, url: str, model: str, point: Point, data: list[str], window_ms: int,
              work: str, timeout_s: float, max_trials: int,
              attempts: tuple[tuple[int, int], ...] = ATTEMPTS) -> Point:
    """One perf_analyzer measurement, stabilised on average latency and throughput (max / min
    of its last 3 windows within the stability bound), tried with each (stability %, window
    scale) of `attempts` in turn while the failure is one a longer or laxer measurement can
    cure; a point that still fails carries every try's reason in .error."""
    errors = []
    for stability, scale in attempts:
        point.error = ""
        _run_point(pa, url, model, point, data, window_ms * scale, work, timeout_s * scale,
                   max_trials, stability)
        if point.row:
            return point
        errors.append(f"[{stability}%, {window_ms * scale} ms] {point.error}")
        if not RETRYABLE.search(point.error):
            break
    point.error = "; ".join(errors)
    return point


def _run_point(pa: str, url: str, model: str, point: Point, data: list[str], window_ms: int,
               work: str, timeout_s: float, max_trials: int, stability: int) -> Point:
    csv_path = os.path.join(work, f"pa-{point.path}-{point.mode}-{point.value:g}.csv")
    mode_args = (["--concurrency-range", f"{int(point.value)}:{int(point.value)}"]
                 if point.mode == "concurrency" else
                 ["--request-rate-range", f"{point.value:g}:{point.value:g}",
                  "--max-threads", "32"])
    cmd = [pa, "-m", model, "-i", "grpc", "-u", url, "-b", str(point.batch), *data, *mode_args,
           "--measurement-interval", str(window_ms), "--stability-percentage", str(stability),
           "--max-trials", str(max_trials), "-f", csv_path,
           "--verbose-csv"]
    load = round(os.getloadavg()[0], 2)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        point.error = f"perf_analyzer timed out after {timeout_s:.0f} s"
        return point
    if proc.returncode != 0 or not os.path.exists(csv_path):
        lines = [x.strip() for x in (proc.stderr + proc.stdout).splitlines() if x.strip()]
        said = [x for x in lines if re.search(r"error|fail|unstable|stable", x, re.I)]
        point.error = ((said or lines or [f"exit {proc.returncode}"])[-1])[:300]
        return point
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        point.error = "perf_analyzer wrote an empty CSV"
        return point
    row = dict(rows[-1])
    if point.mode == "concurrency":
        row.setdefault("Request Rate", "")
    else:
        row.setdefault("Concurrency", "")
    ips = float(row["Inferences/Second"])  # perf_analyzer counts batch x requests
    row.update({"Mode": point.mode, "Batch": point.batch, "Images/Second": round(ips, 3),
                "Stability %": stability, "Window ms": window_ms, "Load Average": load})
    stats = parse_composing(proc.stdout)
    models = COMPOSING if point.path == "ensemble" else (spec.DESCRIPTOR_MODEL,)
    for name in models:
        s = stats.get(name) or (stats.get("_server") if point.path == "descriptor" else None) or {}
        for col in MODEL_COLS:
            row[f"{name} {col}"] = s.get(col, "")
    point.row = row
    return point


# --- in-process rows -------------------------------------------------------------------------
def pipeline_row(jpegs: list[bytes], run, batch: int, requests: int, warmup: int) -> Row:
    """decode + resize + normalise (PIL, as the server's preprocess) + ONNX Runtime, one
    process, no server: B photographs per call, the fixed set cycled."""
    from sscd_triton.bench.common import request_items
    from sscd_triton.bench.local import time_calls

    def call(i):
        x = np.stack([images.load_tensor(jpegs[k], PRE) for k in request_items(i, batch, len(jpegs))])
        return run(x)
    return time_calls(Row(f"pipeline-b{batch}", batch, 1), call, requests, warmup)


def inprocess_rows(model, onnx_path: str, jpegs: list[bytes], tensors: np.ndarray,
                   batches: list[int], images_per_row: int, warmup: int,
                   with_torch: bool = True, precision: str = "fp32") -> list[Row]:
    """pipeline-bB and ort-PRECISION-bB per batch B (`onnx_path` holds that precision),
    then torch and the decode-only rows."""
    from sscd_triton import runtime
    from sscd_triton.bench import local

    rows = []
    session = runtime.onnx_session(onnx_path)
    run = runtime.onnx_runner(session)
    for b in batches:
        requests = max(1, math.ceil(images_per_row / b))
        rows.append(pipeline_row(jpegs, run, b, requests, warmup))
        budget = Budget(images=images_per_row, batch=b, warmup=warmup)
        ort, _ = local.ort_row(f"ort-{precision}", onnx_path, tensors, budget,
                               ["CPUExecutionProvider"])
        ort.id = f"ort-{precision}-b{b}"
        rows.append(ort)
    big = max(batches)
    budget = Budget(images=images_per_row, batch=big, warmup=warmup)
    if with_torch and model is not None:
        rows.append(local.torch_row(model, tensors, budget, "cpu"))
    rows += local.decode_rows(jpegs, budget)
    return rows


# --- outputs ---------------------------------------------------------------------------------
def write_perf_csv(points: list[Point], path: str) -> None:
    good = [p.row for p in points if p.row]
    if not good:
        return
    cols: list[str] = []
    for r in good:
        cols += [c for c in r if c not in cols]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(good)
    os.replace(path + ".tmp", path)


def write_inprocess_csv(rows: list[Row], path: str) -> None:
    with open(path + ".tmp", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Path", "Batch", "Concurrency", "Images/Second", "p50 latency",
                    "p90 latency", "p99 latency", "Requests", "Load Average", "Note"])
        for r in rows:
            w.writerow([r.id, r.batch, r.concurrency, round(r.images_per_s, 3),
                        *(round(r.pct(q) * 1e3) for q in (50, 90, 99)),
                        len(r.latencies_ms), r.load1, r.note])
    os.replace(path + ".tmp", path)


def plot(points: list[Point], rows: list[Row], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    series = [("ensemble", "concurrency", "o-", "ensemble sscd, 1 JPEG/request (concurrency)"),
              ("ensemble", "request_rate", "s--", "ensemble sscd (request rate)"),
              ("descriptor", "concurrency", "^-", "descriptor sscd_descriptor, tensors")]
    for path_name, mode, style, label in series:
        pts = [p for p in points if p.row and p.path == path_name and p.mode == mode]
        if not pts:
            continue
        if path_name == "descriptor":
            label += f", batch {pts[0].batch}"
        xs = [float(p.row["p99 latency"]) / 1e3 for p in pts]
        ys = [float(p.row["Images/Second"]) for p in pts]
        ax.plot(xs, ys, style, label=label)
        for p, x, y in zip(pts, xs, ys):
            tag = f"c{int(p.value)}" if mode == "concurrency" else f"{p.value:g}/s"
            ax.annotate(tag, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    for prefix, style, label in (("pipeline-b", "D-", "in-process decode+resize+ORT (no server)"),
                                 ("ort-", "x:", "in-process ORT on tensors")):
        sel = [r for r in rows if r.id.startswith(prefix)]
        if sel:
            xs, ys = [r.pct(99) for r in sel], [r.images_per_s for r in sel]
            ax.plot(xs, ys, style, label=label)
            for r, x, y in zip(sel, xs, ys):
                ax.annotate(f"b{r.batch}", (x, y), textcoords="offset points", xytext=(4, -10),
                            fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("p99 latency per request (ms, log)")
    ax.set_ylabel("throughput (images/s)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path + ".tmp.png")
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


def write_machine(info: dict, path: str, extra: dict) -> None:
    lines = [f"{k}: {v}" for k, v in {**info, **extra}.items()]
    try:
        with open("/proc/meminfo") as f:
            mem = next(line for line in f if line.startswith("MemTotal"))
        lines.insert(3, f"memory: {int(mem.split()[1]) / 1024 ** 2:.1f} GiB")
    except (OSError, StopIteration):
        pass
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def server_statistics_note(client, headers: dict | None = None) -> dict:
    """Lifetime per-model totals from Triton's statistics (mean batch, queue, compute)."""
    from sscd_triton.bench.served import read_stats

    out = {}
    for name in (spec.ENSEMBLE_NAME, *COMPOSING):
        s = read_stats(client, name, headers)
        if not s or not s["execution_count"]:
            continue
        n = max(s["success"][0], 1)
        out[name] = {"mean batch": round(s["inference_count"] / s["execution_count"], 2),
                     "queue ms": round(s["queue"][1] / n / 1e6, 1),
                     "compute infer ms": round(s["compute_infer"][1] / n / 1e6, 1)}
    return out


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z")
