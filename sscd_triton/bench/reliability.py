"""Reliability against the real local tritonserver: soak, faults, overload, hostile traffic,
security. The library behind `benchmarks/reliability.py` (sscd_triton.cli.reliability only
parses arguments and prints).

Every scenario starts its own `TritonServer` (127.0.0.1, free ports) on one cpu repository
built once; the faults and overload scenarios drive the real client (`sscd-embed`, run as a
subprocess exactly as a user runs it), the others raw `tritonclient.grpc` requests. Each
scenario returns a dict of figures and a list of checks `{"name", "ok", "detail"}`.

Memory is the resident set (VmRSS) of the whole server process group: tritonserver plus
the python backend's stub processes, which hold the models on the cpu target.
"""
from __future__ import annotations

import concurrent.futures as cf
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sscd_triton import images, samples, spec
from sscd_triton.serving.repository import GPU_SERVER_FLAGS
from sscd_triton.serving.server import HOST, TritonServer

ROOT = Path(__file__).resolve().parents[2]
# What docker/entrypoint.sh restricts (read from it when present, so the two cannot drift).
DEFAULT_RESTRICTED = "shared-memory,model-repository,model-config,statistics,trace,logging"
DEFAULT_EXIT_TIMEOUT = 30
QUEUE_FULL = "exceeds maximum queue size"


@dataclass(frozen=True)
class Sizes:
    """How long and how hard each scenario runs."""

    soak_s: float
    soak_concurrency: int
    fault_inputs: int
    kills: int
    hostile_s: float
    hostile_concurrency: int
    burst: int
    overload_inputs: int


SHORT = Sizes(soak_s=20, soak_concurrency=4, fault_inputs=96, kills=1, hostile_s=12,
              hostile_concurrency=8, burst=40, overload_inputs=48)
FULL = Sizes(soak_s=180, soak_concurrency=4, fault_inputs=320, kills=3, hostile_s=60,
             hostile_concurrency=8, burst=64, overload_inputs=96)


def check(name: str, ok: bool, detail: str) -> dict:
    return {"name": name, "ok": bool(ok), "detail": detail}


# --- production flags ----------------------------------------------------------------------
def production_flags(key: str) -> tuple[list[str], int]:
    """The tritonserver flags of docker/entrypoint.sh (restricted protocols behind
    `sscd-admin-key`, exit timeout, no auto-completed configs) with `key`; and the exit
    timeout in seconds."""
    restricted, timeout = DEFAULT_RESTRICTED, DEFAULT_EXIT_TIMEOUT
    try:
        text = (ROOT / "docker" / "entrypoint.sh").read_text()
        m = re.search(r'admin="([a-z,-]+):' + spec.ADMIN_HEADER, text)
        restricted = m.group(1) if m else restricted
        m = re.search(r"--exit-timeout-secs=(\d+)", text)
        timeout = int(m.group(1)) if m else timeout
    except OSError:
        pass
    admin = f"{restricted}:{spec.ADMIN_HEADER}={key}"
    return [*GPU_SERVER_FLAGS, f"--exit-timeout-secs={timeout}",
            f"--grpc-restricted-protocol={admin}", f"--http-restricted-api={admin}"], timeout


# --- processes and memory ------------------------------------------------------------------
def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def group_rss_mb(pgid: int) -> float:
    """VmRSS of every process in group `pgid` (the server and its backend stubs), MB."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            total += _rss_kb(int(entry))
    return round(total / 1024, 1)


def self_rss_mb() -> float:
    return round(_rss_kb(os.getpid()) / 1024, 1)


def server_rss_mb(server: TritonServer) -> float:
    return group_rss_mb(server.process.pid)


def flat(start: float, end: float) -> bool:
    """Memory counts as flat when it grew by at most 64 MB or 15% of the start."""
    return end - start <= max(64.0, 0.15 * start)


def _pct(values, q) -> float | None:
    return round(float(np.percentile(values, q)), 1) if len(values) else None


# --- requests ------------------------------------------------------------------------------
def photo_bytes() -> list[bytes]:
    """The 16 sample photographs as their JPEG files' bytes."""
    return [Path(p).read_bytes() for p in samples.photograph_paths()]


def request(client, rows: list[bytes], timeout: float = 120.0, headers=None):
    import tritonclient.grpc as grpcclient

    arr = images.pack_rows(rows)
    inp = grpcclient.InferInput(spec.ENSEMBLE_INPUT, list(arr.shape), "UINT8")
    inp.set_data_from_numpy(arr)
    return client.infer(spec.ENSEMBLE_NAME, [inp], client_timeout=timeout,
                        headers=headers).as_numpy(spec.OUTPUT_NAME)


def timed(client, rows, timeout: float = 120.0) -> tuple[float, object, str, str]:
    """(latency ms, descriptors or None, gRPC status or "", message)."""
    from tritonclient.utils import InferenceServerException

    t = time.perf_counter()
    try:
        out = request(client, rows, timeout)
        return (time.perf_counter() - t) * 1e3, out, "", ""
    except InferenceServerException as e:
        return (time.perf_counter() - t) * 1e3, None, str(e.status()), e.message() or str(e)


def _png_claiming(width: int, height: int) -> bytes:
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def hostile_corpus(photos: list[bytes]) -> dict[str, bytes]:
    """Bad inputs every one of which the server must refuse alone, with a reason (the
    kinds tests/test_repository.py checks one by one; there is no library copy of them)."""
    from PIL import Image

    side = int(spec.MAX_IMAGE_PIXELS ** 0.5) + 100
    png = images.encode(Image.open(samples.photograph_paths()[0]).convert("RGB"), "PNG")
    return {
        "empty": b"",
        "random bytes": np.random.default_rng(0).integers(0, 256, 5000, np.uint8).tobytes(),
        "html": b"<!DOCTYPE html><html><body>404 Not Found</body></html>",
        "truncated jpeg": photos[0][:3000],
        "header-only jpeg": photos[1][:620],
        "header-only png": png[:33],
        "bomb 60000x60000": _png_claiming(60000, 60000),
        f"over the limit {side}x{side}": _png_claiming(side, side),
        "jpeg magic + zeros": b"\xff\xd8\xff\xe0" + b"\0" * 4096,
        "gif magic + noise": b"GIF89a" + np.random.default_rng(1).integers(0, 256, 2000, np.uint8).tobytes(),
    }


# --- scenarios -----------------------------------------------------------------------------
@dataclass
class Context:
    repository: Path
    work: Path
    sizes: Sizes
    key: str = "reliability-key"
    log: callable = print
    photos: list = field(default_factory=photo_bytes)
    references: dict = field(default_factory=dict)  # photo index -> descriptor
    servers_started: int = 0

    def server(self, name: str, repository: Path | None = None, extra_args=(), **ports) -> TritonServer:
        self.servers_started += 1
        return TritonServer(repository or self.repository, extra_args=list(extra_args),
                            log_path=self.work / f"{name}-{self.servers_started}.log", **ports).start()


def _listening(port: int) -> list[str]:
    """Local addresses listening on TCP `port` (from /proc/net/tcp and tcp6)."""
    found = []
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            addr, hexport = parts[1].split(":")
            if parts[3] == "0A" and int(hexport, 16) == port:
                if width == 8:
                    found.append(socket.inet_ntop(socket.AF_INET, bytes.fromhex(addr)[::-1]))
                else:
                    raw = b"".join(bytes.fromhex(addr[i:i + 8])[::-1] for i in range(0, 32, 8))
                    found.append(socket.inet_ntop(socket.AF_INET6, raw))
    return found


def _outside_address() -> str | None:
    """This host's address on its default route (no packet is sent), if not loopback."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))
            addr = s.getsockname()[0]
    except OSError:
        return None
    return None if addr.startswith("127.") or addr == "0.0.0.0" else addr


def _reachable(addr: str, port: int) -> bool:
    try:
        with socket.create_connection((addr, port), timeout=1.0):
            return True
    except OSError:
        return False


def security(ctx: Context, server: TritonServer) -> tuple[dict, list]:
    """Bind address, then the restricted APIs without and with the key (gRPC and HTTP)."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    ports = {"grpc": server.grpc_port, "http": server.http_port, "metrics": server.metrics_port}
    bound = {name: _listening(port) for name, port in ports.items()}
    outside = _outside_address()
    reachable_outside = {n: _reachable(outside, p) for n, p in ports.items()} if outside else {}
    checks = [check("security: binds 127.0.0.1 only",
                    all(addrs and set(addrs) <= {HOST, "::ffff:" + HOST} for addrs in bound.values()),
                    f"listening {bound}; from {outside or 'no non-loopback address'}: "
                    f"{reachable_outside or 'n/a'}")]
    if outside:
        checks.append(check("security: not reachable on " + outside,
                             not any(reachable_outside.values()), str(reachable_outside)))
    client = grpcclient.InferenceServerClient(server.grpc_url)
    key = {spec.GRPC_ADMIN_HEADER: ctx.key}
    calls = {
        "model-config": lambda h: client.get_model_config(spec.ENSEMBLE_NAME, headers=h),
        "statistics": lambda h: client.get_inference_statistics(spec.ENSEMBLE_NAME, headers=h),
        "shared-memory status": lambda h: client.get_system_shared_memory_status(headers=h),
        "shared-memory register": lambda h: client.register_system_shared_memory(
            "reliability", "/sscd-reliability-none", 64, headers=h),
        "model-repository index": lambda h: client.get_model_repository_index(headers=h),
        "logging": lambda h: client.get_log_settings(headers=h),
        "trace": lambda h: client.get_trace_settings(headers=h),
    }
    results = {}
    for name, call in calls.items():
        row = {}
        for label, headers in (("without key", None), ("with key", key)):
            try:
                call(headers)
                row[label] = "allowed"
            except InferenceServerException as e:
                msg = e.message() or str(e)
                row[label] = "restricted" if "restricted" in msg else f"error: {msg[:80]}"
        results[name] = row
    refused = all(r["without key"] == "restricted" for r in results.values())
    # With the key every API answers; registering a region that does not exist is then
    # refused by the shared-memory manager itself, not by the restriction.
    allowed = all(r["with key"] != "restricted" for r in results.values())
    http = httpclient.InferenceServerClient(server.http_url)
    http_rows = {}
    for label, headers in (("without key", None), ("with key", {spec.ADMIN_HEADER: ctx.key})):
        try:
            http.get_model_config(spec.ENSEMBLE_NAME, headers=headers)
            http_rows[label] = "allowed"
        except InferenceServerException as e:
            http_rows[label] = f"{e.status()} {(e.message() or '')[:60]}"
    http.close()
    infer_ok = request(client, [ctx.photos[0]]).shape == (1, 512)
    client.close()
    checks += [
        check("security: restricted APIs refused without the key", refused,
              f"{sum(r['without key'] == 'restricted' for r in results.values())}/{len(results)} "
              "gRPC APIs refused"),
        check("security: restricted APIs answer with the key", allowed,
              f"{sum(r['with key'] != 'restricted' for r in results.values())}/{len(results)}"),
        check("security: HTTP restricted API refused without the key (403)",
              http_rows["without key"].startswith("403") and http_rows["with key"] == "allowed",
              str(http_rows)),
        check("security: inference needs no key", infer_ok, "sscd infer without header"),
    ]
    return {"bound": bound, "outside_address": outside, "reachable_outside": reachable_outside,
            "grpc": results, "http_model_config": http_rows}, checks


def _closed_loop(ctx: Context, server: TritonServer, seconds: float, concurrency: int,
                 jobs: list[tuple[str, bytes]], classify) -> list[tuple]:
    """`concurrency` threads over one shared client sending `jobs` round-robin for
    `seconds`; returns (t since start, latency ms, kind, status, message, output)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.grpc_url)
    records, lock = [], threading.Lock()
    start = time.monotonic()
    stop_at = start + seconds
    counter = iter(range(10 ** 9))

    def worker():
        while time.monotonic() < stop_at:
            with lock:
                i = next(counter)
            kind, data = jobs[i % len(jobs)]
            sent = time.monotonic() - start
            ms, out, status, msg = timed(client, [data])
            rec = (sent, ms, kind, status, msg, classify(i % len(jobs), out))
            with lock:
                records.append(rec)

    with cf.ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(worker) for _ in range(concurrency)]:
            f.result()
    client.close()
    return records


def soak(ctx: Context, server: TritonServer) -> tuple[dict, list]:
    """Sustained concurrency for `soak_s`: failures, latency at start vs end, RSS."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.grpc_url)
    for i, data in enumerate(ctx.photos):  # warm-up, and the reference descriptors
        ctx.references[i] = request(client, [data])[0]
    client.close()
    jobs = [("photo", p) for p in ctx.photos]
    s = ctx.sizes
    warm = min(15.0, s.soak_s / 4)  # batches of every size, so the arenas have grown
    _closed_loop(ctx, server, warm, s.soak_concurrency, jobs, lambda i, out: None)
    rss0, self0 = server_rss_mb(server), self_rss_mb()
    load0 = os.getloadavg()[0]
    samples_mb = []
    worst = [0.0]

    def compare(i, out):
        if out is not None:
            worst[0] = max(worst[0], float(np.abs(out[0] - ctx.references[i]).max()))
        return None

    stop = threading.Event()

    def sample():
        while not stop.wait(max(1.0, s.soak_s / 12)):
            samples_mb.append(server_rss_mb(server))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t = time.monotonic()
    recs = _closed_loop(ctx, server, s.soak_s, s.soak_concurrency, jobs, compare)
    stop.set()
    sampler.join()
    wall = time.monotonic() - t
    rss1, self1 = server_rss_mb(server), self_rss_mb()
    load1 = os.getloadavg()[0]
    failed = [r for r in recs if r[3]]
    window = s.soak_s / 4
    first = [r[1] for r in recs if r[0] < window and not r[3]]
    last = [r[1] for r in recs if r[0] >= s.soak_s - window and not r[3]]
    fig = {"seconds": round(wall, 1), "concurrency": s.soak_concurrency,
           "requests": len(recs), "failures": len(failed),
           "images_per_s": round(len(recs) / wall, 2),
           "p50_ms_start": _pct(first, 50), "p99_ms_start": _pct(first, 99),
           "p50_ms_end": _pct(last, 50), "p99_ms_end": _pct(last, 99),
           "warmup_s": warm, "server_rss_mb_start": rss0, "server_rss_mb_end": rss1,
           "server_rss_mb_samples": samples_mb, "client_rss_mb_start": self0, "client_rss_mb_end": self1,
           "max_abs_diff_vs_first_answer": worst[0],
           "machine_load1_start": round(load0, 2), "machine_load1_end": round(load1, 2),
           "failure_examples": sorted({f"{r[3]} {r[4][:80]}" for r in failed})[:3]}
    steady = (fig["p50_ms_end"] is not None and fig["p50_ms_start"] is not None
              and fig["p50_ms_end"] <= 1.5 * fig["p50_ms_start"] + 50)
    latency = (f"p50 {fig['p50_ms_start']} -> {fig['p50_ms_end']} ms, p99 {fig['p99_ms_start']} "
               f"-> {fig['p99_ms_end']} ms; machine load {load0:.1f} -> {load1:.1f}")
    # On a shared machine other processes' load moves latency too: a rise that comes with
    # a rise of the machine's load is not judged (ok None: inconclusive), not passed.
    busier = load1 > 1.25 * load0 + 0.5
    checks = [
        check("soak: zero failed requests", not failed and len(recs) > 0,
              f"{len(recs)} requests, {len(failed)} failed"),
        {**check("soak: steady latency (p50 end <= 1.5x start + 50 ms)", steady, latency),
         **({} if steady or not busier else
            {"ok": None, "detail": latency + ": the machine got busier, not judged"})},
        check("soak: server memory flat", flat(rss0, rss1), f"{rss0} -> {rss1} MB"),
        check("soak: client memory flat", flat(self0, self1), f"{self0} -> {self1} MB"),
        check("soak: same descriptors throughout", worst[0] <= 1e-5, f"max |diff| {worst[0]:.2g}"),
    ]
    return fig, checks


def hostile(ctx: Context, server: TritonServer) -> tuple[dict, list]:
    """The bad-input corpus, mixed with good photographs, at concurrency for `hostile_s`:
    every bad one refused alone with a reason, every good one answered, the server ready
    throughout, its memory flat."""
    corpus = hostile_corpus(ctx.photos)
    jobs = [("bad:" + name, data) for name, data in corpus.items()] \
        + [("good", p) for p in ctx.photos[:len(corpus)]]
    order = np.random.default_rng(2).permutation(len(jobs))
    jobs = [jobs[i] for i in order]
    ready_url = f"http://{server.http_url}/v2/health/ready"
    polls, not_ready, stop = [0], [0], threading.Event()

    def poll():
        while not stop.is_set():
            polls[0] += 1
            try:
                with urllib.request.urlopen(ready_url, timeout=2.0) as r:
                    ok = r.status == 200
            except (urllib.error.URLError, OSError):
                ok = False
            not_ready[0] += not ok
            stop.wait(0.5)

    rss0 = server_rss_mb(server)
    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    s = ctx.sizes
    t = time.monotonic()
    recs = _closed_loop(ctx, server, s.hostile_s, s.hostile_concurrency, jobs, lambda i, out: None)
    wall = time.monotonic() - t
    stop.set()
    poller.join()
    rss1 = server_rss_mb(server)
    wrong = []
    for _, _, kind, status, msg, _ in recs:
        if kind == "good" and status:
            wrong.append(f"good image failed: {status} {msg[:80]}")
        elif kind.startswith("bad:") and not ("INVALID_ARGUMENT" in status and "bad image" in msg):
            wrong.append(f"{kind}: {status or 'answered'} {msg[:80]}")
    bad = sum(r[2].startswith("bad:") for r in recs)
    fig = {"seconds": round(wall, 1), "concurrency": s.hostile_concurrency,
           "requests": len(recs), "bad_requests": bad, "good_requests": len(recs) - bad,
           "kinds": len(corpus), "unexpected": len(wrong),
           "unexpected_examples": sorted(set(wrong))[:5],
           "readiness_polls": polls[0], "not_ready": not_ready[0],
           "server_rss_mb_start": rss0, "server_rss_mb_end": rss1}
    checks = [
        check("hostile: every bad input refused alone, every good one answered", not wrong,
              f"{bad} bad + {len(recs) - bad} good requests, {len(wrong)} unexpected"),
        check("hostile: server ready throughout", not_ready[0] == 0 and polls[0] > 0,
              f"{polls[0] - not_ready[0]}/{polls[0]} readiness polls ready"),
        check("hostile: server memory flat", flat(rss0, rss1), f"{rss0} -> {rss1} MB"),
    ]
    return fig, checks


def sigterm(ctx: Context, server: TritonServer, exit_timeout: int) -> tuple[dict, list]:
    """SIGTERM with requests in flight: those complete, new ones are refused, the server
    exits within --exit-timeout-secs."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.grpc_url)
    results, lock = [], threading.Lock()
    signalled = [None]
    inflight = 6
    rows = [ctx.photos[i % len(ctx.photos)] for i in range(4)]  # 4 images a request: slow ones

    def send(tag):
        sent = time.monotonic()
        ms, out, status, msg = timed(client, rows, timeout=exit_timeout + 30)
        with lock:
            results.append((tag, sent, sent + ms / 1e3, status, msg))

    threads = [threading.Thread(target=send, args=("before",)) for _ in range(inflight)]
    for th in threads:
        th.start()
    time.sleep(0.5)
    signalled[0] = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    late = []
    while server.process.poll() is None and time.monotonic() - signalled[0] < exit_timeout + 20:
        if len(late) < 20:  # new requests during the drain
            th = threading.Thread(target=send, args=("after",))
            th.start()
            late.append(th)
        time.sleep(0.25)
    try:
        server.process.wait(max(1.0, exit_timeout + 20 - (time.monotonic() - signalled[0])))
    except subprocess.TimeoutExpired:
        pass
    code = server.process.poll()
    exit_s = round(time.monotonic() - signalled[0], 1)
    for th in threads + late:
        th.join(60)
    client.close()
    before = [r for r in results if r[0] == "before"]
    in_flight = [r for r in before if r[2] > signalled[0]]
    lost = [r for r in in_flight if r[3]]
    after = [r for r in results if r[0] == "after"]
    # Once the ensemble is unloaded, Triton answers "Request for unknown model: 'sscd' has
    # no available versions" instead: also an answer at once, not a hang.
    unloaded = [r for r in after if r[3] and "no available versions" in r[4]]
    after_other = [r for r in after if r[3] and "UNAVAILABLE" not in r[3] and r not in unloaded]
    hung = sum(th.is_alive() for th in threads + late)
    # Triton 2.51 drains what a model's scheduler already holds, but an ensemble request
    # between its steps meets the next model's stopped scheduler: UNAVAILABLE "Server is
    # stopping", a retryable answer (sscd-embed sends it again), never a hang.
    stopping = [r for r in lost if "UNAVAILABLE" in r[3] and "server is stopping" in r[4].lower()]
    fig = {"in_flight_at_sigterm": len(in_flight), "in_flight_completed": len(in_flight) - len(lost),
           "in_flight_refused_server_stopping": len(stopping),
           "in_flight_failed_examples": sorted({f"{r[3]} {r[4][:90]}" for r in lost})[:3],
           "sent_during_drain": len(after),
           "answered_during_drain": sum(not r[3] for r in after),
           "refused_during_drain": sum("UNAVAILABLE" in r[3] for r in after),
           "unknown_model_after_unload": len(unloaded), "hung": hung,
           "refusal_examples": sorted({r[4][:90] for r in after if r[3]})[:2],
           "exit_code": code, "exit_s": exit_s, "exit_timeout_s": exit_timeout}
    checks = [
        # Completion is a figure, not a check: on Triton 2.51 the ensemble does not drain
        # (measured: 0/5 and 6/6 completed in two full runs, depending on where each was).
        check("sigterm: every in-flight request answered (descriptor, or retryable 'Server is "
              "stopping' between ensemble steps)", bool(in_flight) and len(stopping) == len(lost),
              f"{len(in_flight) - len(lost)}/{len(in_flight)} completed, {len(stopping)} refused "
              "UNAVAILABLE 'Server is stopping'"),
        check("sigterm: exits within the exit timeout", code is not None and exit_s <= exit_timeout + 5,
              f"exit code {code} after {exit_s} s (--exit-timeout-secs={exit_timeout})"),
        check("sigterm: new requests refused or answered, never hung", not after_other and not hung,
              f"{fig['answered_during_drain']} answered, {fig['refused_during_drain']} refused "
              f"UNAVAILABLE, {len(unloaded)} 'no available versions' (model unloaded), "
              f"{len(after_other)} other, {hung} hung of {len(after)}"),
    ]
    return fig, checks


def _input_folder(ctx: Context, name: str, count: int) -> tuple[Path, dict]:
    """`count` copies of the photographs (not links: sscd-embed names a link by its
    target): {path: photo index}."""
    folder = ctx.work / name
    folder.mkdir()
    paths = samples.photograph_paths()
    expected = {}
    for k in range(count):
        copy = folder / f"{k:05d}-{Path(paths[k % len(paths)]).name}"
        shutil.copyfile(paths[k % len(paths)], copy)
        expected[os.path.realpath(copy)] = k % len(paths)  # its id
    return folder, expected


# sscd-embed's own main(), unchanged, with one counter read at the end: how many times the
# server answered "queue full" and the request backed off (not printed by sscd-embed).
_EMBED = """import sys
from sscd_triton.cli import embed
from sscd_triton.client import transport
made = []
init = transport.Sender.__init__
def counting(self, *a, **k):
    init(self, *a, **k)
    made.append(self)
transport.Sender.__init__ = counting
code = embed.main(sys.argv[1:])
print("reliability: busy answers", sum(s.busy_answers for s in made), flush=True)
sys.exit(code)
"""


def _busy_answers(stdout: str) -> int | None:
    m = re.search(r"reliability: busy answers (\d+)", stdout)
    return int(m.group(1)) if m else None


def _embed(folder: Path, out: Path, url: str, *extra) -> subprocess.Popen:
    cmd = [sys.executable, "-c", _EMBED, str(folder), "--output", str(out),
           "--url", url, "--quiet", *map(str, extra)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _shards(out: Path) -> int:
    try:
        return sum(1 for n in os.listdir(out / "embeddings")
                   if n.endswith(".parquet") and not n.startswith("."))
    except FileNotFoundError:
        return 0


def _account(ctx: Context, out: Path, expected: dict) -> dict:
    """Every input exactly once, with the reference descriptor."""
    from sscd_triton import load_embeddings
    from sscd_triton.client.io import load_failures

    ids, emb = load_embeddings(str(out))
    ids = ids.tolist()
    failures = load_failures(str(out))
    dup = len(ids) - len(set(ids))
    missing = set(expected) - set(ids) - {f["id"] if isinstance(f, dict) else f[0] for f in failures}
    extra = set(ids) - set(expected)
    worst = max((float(np.abs(e - ctx.references[expected[i]]).max())
                 for i, e in zip(ids, emb) if i in expected), default=float("nan"))
    return {"inputs": len(expected), "embedded": len(ids), "failures": len(failures),
            "duplicated": dup, "lost": len(missing), "unexpected_ids": len(extra),
            "max_abs_diff_vs_reference": worst}


def faults(ctx: Context) -> tuple[dict, list]:
    """sscd-embed over `fault_inputs` inputs while the server is SIGKILLed `kills` times and
    restarted on the same ports: the client finishes, every input exactly once."""
    s = ctx.sizes
    folder, expected = _input_folder(ctx, "fault-inputs", s.fault_inputs)
    out = ctx.work / "fault-out"
    shard = 8
    server = ctx.server("faults")
    proc = _embed(folder, out, server.grpc_url, "--batch-size", 2, "--concurrency", 4,
                  "--shard-size", shard)
    total = -(-s.fault_inputs // shard)
    kills, downtime = [], []
    t0 = time.monotonic()
    try:
        for k in range(s.kills):
            target = max(1, total * (k + 1) // (s.kills + 1))
            while _shards(out) < target and proc.poll() is None:
                time.sleep(0.05)
            if proc.poll() is not None:
                break
            ports = dict(grpc_port=server.grpc_port, http_port=server.http_port,
                         metrics_port=server.metrics_port)
            os.killpg(server.process.pid, signal.SIGKILL)  # the server and its stubs, as an OOM kill
            killed = time.monotonic()
            server.stop()  # reaps, removes the shm regions the killed stubs left
            kills.append({"after_shards": _shards(out), "at_s": round(killed - t0, 1)})
            time.sleep(2.0)  # a real outage: the client finds nobody there
            server = ctx.server("faults", **ports)
            downtime.append(round(time.monotonic() - killed, 1))
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        server.stop()
    acc = _account(ctx, out, expected)
    summary = [line for line in stdout.splitlines() if line.startswith("summary:")]
    fig = {"inputs": s.fault_inputs, "kills": len(kills), "kill_points": kills,
           "downtime_s": downtime, "client_exit": proc.returncode,
           "client_busy_answers": _busy_answers(stdout),
           "wall_s": round(time.monotonic() - t0, 1), **acc,
           "client_summary": summary[-1] if summary else stderr.strip()[-300:]}
    checks = [
        check("faults: server SIGKILLed and restarted mid-run", len(kills) == s.kills,
              f"{len(kills)} kills, down {downtime} s"),
        check("faults: sscd-embed finishes (exit 0)", proc.returncode == 0,
              f"exit {proc.returncode}" + ("" if proc.returncode == 0 else f": {stderr.strip()[-200:]}")),
        check("faults: nothing lost or duplicated",
              acc["embedded"] == s.fault_inputs and not acc["duplicated"] and not acc["lost"]
              and not acc["failures"] and not acc["unexpected_ids"],
              f"{acc['embedded']}/{s.fault_inputs} embedded, {acc['duplicated']} duplicated, "
              f"{acc['lost']} lost, {acc['failures']} failures"),
        check("faults: same descriptors as before the kills", acc["max_abs_diff_vs_reference"] <= 1e-5,
              f"max |diff| {acc['max_abs_diff_vs_reference']:.2g}"),
    ]
    return fig, checks


def small_queue_repository(ctx: Context, queue: int) -> Path:
    """A copy of the repository (hard links) whose composing models queue at most `queue`."""
    out = ctx.work / f"repo-queue{queue}"
    try:
        shutil.copytree(ctx.repository, out, copy_function=os.link)
    except OSError:
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(ctx.repository, out)
    for model in (spec.PREPROCESS_MODEL, spec.DESCRIPTOR_MODEL):
        path = out / model / "config.pbtxt"
        text, n = re.subn(r"max_queue_size: \d+", f"max_queue_size: {queue}", path.read_text())
        assert n == 1, f"no max_queue_size in {path}"
        path.unlink()  # a hard link: never write through it into the original
        path.write_text(text)
    return out


def overload(ctx: Context, queue: int = 2) -> tuple[dict, list]:
    """Beyond the queue bound: a burst of concurrent requests gets UNAVAILABLE "Exceeds
    maximum queue size" at once (not after waiting), and sscd-embed at a concurrency far
    beyond the bound backs off and completes."""
    import tritonclient.grpc as grpcclient

    s = ctx.sizes
    repo = small_queue_repository(ctx, queue)
    server = ctx.server("overload", repository=repo)
    try:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        request(client, [ctx.photos[0]])
        barrier = threading.Barrier(s.burst)

        def one(i):
            barrier.wait()
            return timed(client, [ctx.photos[i % len(ctx.photos)]], timeout=120)

        t = time.monotonic()
        with cf.ThreadPoolExecutor(s.burst) as pool:
            recs = list(pool.map(one, range(s.burst)))
        burst_wall = time.monotonic() - t
        client.close()
        ok = [r[0] for r in recs if not r[2]]
        refused = [r[0] for r in recs if r[2] and QUEUE_FULL in r[3].lower()]
        other = [f"{r[2]} {r[3][:80]}" for r in recs if r[2] and QUEUE_FULL not in r[3].lower()]
        folder, expected = _input_folder(ctx, "overload-inputs", s.overload_inputs)
        out = ctx.work / "overload-out"
        t = time.monotonic()
        proc = _embed(folder, out, server.grpc_url, "--batch-size", 1, "--concurrency", 32,
                      "--shard-size", 16)
        stdout, stderr = proc.communicate(timeout=600)
        embed_wall = time.monotonic() - t
        rejected = _busy_answers(stdout)
    finally:
        server.stop()
    acc = _account(ctx, out, expected)
    fig = {"max_queue_size": queue, "burst": s.burst, "burst_wall_s": round(burst_wall, 1),
           "answered": len(ok), "refused_queue_full": len(refused), "other_errors": len(other),
           "other_examples": sorted(set(other))[:3],
           "refusal_ms_p50": _pct(refused, 50), "refusal_ms_max": _pct(refused, 100),
           "answer_ms_p50": _pct(ok, 50), "answer_ms_max": _pct(ok, 100),
           "embed_inputs": s.overload_inputs, "embed_concurrency": 32,
           "embed_exit": proc.returncode, "embed_wall_s": round(embed_wall, 1),
           "embed_refusals_backed_off": rejected, **{f"embed_{k}": v for k, v in acc.items()}}
    fast = bool(refused) and bool(ok) and fig["refusal_ms_p50"] < 0.25 * fig["answer_ms_p50"]
    checks = [
        check("overload: beyond the queue bound, requests are refused", bool(refused) and not other,
              f"{len(refused)} refused, {len(ok)} answered, {len(other)} other errors of {s.burst}"),
        check("overload: refusals are immediate (p50 < 1/4 of an answer's)", fast,
              f"refused in {fig['refusal_ms_p50']} ms (max {fig['refusal_ms_max']}), "
              f"answered in {fig['answer_ms_p50']} ms (max {fig['answer_ms_max']})"),
        check("overload: sscd-embed backs off and completes", proc.returncode == 0
              and acc["embedded"] == s.overload_inputs and not acc["duplicated"] and not acc["lost"],
              f"exit {proc.returncode}, {acc['embedded']}/{s.overload_inputs} embedded, "
              f"{rejected} refusals backed off" + ("" if proc.returncode == 0 else f": {stderr[-200:]}")),
    ]
    return fig, checks


# --- everything ----------------------------------------------------------------------------
def build(work: Path, checkpoint: str | None, log=print) -> Path:
    """build_repository --target cpu --max-batch 4, in a subprocess: this process is the
    load generator whose memory the soak reports, and stays torch-free."""
    out = work / "repository"
    cmd = [sys.executable, "-m", "sscd_triton.cli.build_repository", "--target", "cpu",
           "--output", str(out), "--max-batch", "4"]
    if checkpoint:
        cmd += ["--checkpoint", checkpoint]
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError("building the cpu repository failed:\n" + proc.stdout[-2000:]
                           + proc.stderr[-2000:])
    return out


def run_all(ctx: Context, log=print) -> dict:
    """Every scenario in order; returns {"scenarios": {name: figures}, "checks": [...]}."""
    scenarios, checks = {}, []

    def record(name, result, t):
        fig, cks = result
        fig["scenario_s"] = round(time.monotonic() - t, 1)
        scenarios[name] = fig
        checks.extend(cks)
        for c in cks:
            log(f"  [{ {True: 'ok', False: 'FAIL', None: 'n/a'}[c['ok']] }] {c['name']}: {c['detail']}")

    flags, exit_timeout = production_flags(ctx.key)
    t = time.monotonic()
    log(f"production server ({' '.join(f for f in flags if 'restricted' not in f)}, "
        "restricted protocols behind sscd-admin-key): security, soak, hostile, SIGTERM")
    server = ctx.server("production", extra_args=flags)
    try:
        record("security", security(ctx, server), t)
        t = time.monotonic()
        log(f"soak: {ctx.sizes.soak_s:g} s at concurrency {ctx.sizes.soak_concurrency}")
        record("soak", soak(ctx, server), t)
        t = time.monotonic()
        log(f"hostile: {ctx.sizes.hostile_s:g} s at concurrency {ctx.sizes.hostile_concurrency}")
        record("hostile", hostile(ctx, server), t)
        t = time.monotonic()
        log("sigterm: requests in flight, then SIGTERM")
        record("sigterm", sigterm(ctx, server, exit_timeout), t)
    finally:
        server.stop()
    t = time.monotonic()
    log(f"faults: sscd-embed of {ctx.sizes.fault_inputs} inputs, server SIGKILLed "
        f"{ctx.sizes.kills}x and restarted")
    record("faults", faults(ctx), t)
    t = time.monotonic()
    log(f"overload: max_queue_size 2, a burst of {ctx.sizes.burst}, then sscd-embed at concurrency 32")
    record("overload", overload(ctx), t)
    return {"scenarios": scenarios, "checks": checks, "servers_started": ctx.servers_started,
            "passed": all(c["ok"] is not False for c in checks)}
