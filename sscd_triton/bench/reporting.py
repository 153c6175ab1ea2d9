"""The printed tables and the JSON result."""
from __future__ import annotations

import math

from sscd_triton.bench.common import ROW_HELP, Budget, Row

def _f(x: float, digits: int = 1) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def print_table(rows: list[Row], baseline: float | None, budget: Budget) -> None:
    head = (f"{'path':<22} {'batch':>5} {'conc':>4} {'reqs':>5} {'images/s':>9} "
            f"{'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'ratio vs torch-eager':>21} {'load':>5}")
    print("\n" + head)
    print("-" * len(head))
    for r in rows:
        if r.skipped:
            continue
        ratio = f"x{r.images_per_s / baseline:.2f}" if baseline else "n/a"
        print(f"{r.id:<22} {r.batch:>5} {r.concurrency:>4} {len(r.latencies_ms):>5} "
              f"{_f(r.images_per_s, 2):>9} {_f(r.pct(50)):>9} {_f(r.pct(90)):>9} "
              f"{_f(r.pct(99)):>9} {ratio:>21} {r.load1:>5.2f}")
    print("-" * len(head))
    print(f"latency: per request (local rows: per call; batch = images per request), "
          f"percentiles over 'reqs' samples; {budget.warmup} warm-up round(s) before each row;\n"
          f"load = 1-minute load average when the row started (other processes share these cores)")
    for r in rows:
        if r.skipped:
            continue
        extra = f" [{r.note}]" if r.note else ""
        print(f"  {r.id:<22} {ROW_HELP[r.id].replace('B ', f'{r.batch} ', 1)}{extra}")
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
    head = (f"{'path':<22} {'model':<16} {'infers':>6} {'execs':>5} {'mean batch':>10} "
            f"{'queue':>8} {'c.input':>8} {'c.infer':>8} {'c.output':>8} {'server':>8}")
    print("\nserver side (Triton statistics over the timed requests; ms are per-request means)")
    print(head)
    print("-" * len(head))
    for r in served:
        for model, s in r.server.items():
            print(f"{r.id:<22} {model:<16} {s['inferences']:>6} {s['executions']:>5} "
                  f"{_f(s['mean_batch'], 2):>10} {_f(s['queue_ms']):>8} "
                  f"{_f(s['compute_input_ms']):>8} {_f(s['compute_infer_ms']):>8} "
                  f"{_f(s['compute_output_ms']):>8} {_f(s['success_ms']):>8}")
    print("-" * len(head))
    print("mean batch = inference_count / execution_count: what the dynamic batcher formed (the ensemble\n"
          "itself never batches: its 'mean batch' is just images per request). queue = waiting in the\n"
          "scheduler; c.* = compute input/infer/output; server = the whole request inside the server.\n"
          "For the ensemble the composing models show where the time goes; client p50 minus 'server'\n"
          "is gRPC + client overhead.")


def print_header(info: dict, setup_note: str, photographs: int, budget: Budget) -> None:
    from sscd_triton.bench.common import JPEG_QUALITY, PRE
    from sscd_triton.bench.device import print_device

    print_device(info)
    print(f"setup: {setup_note}")
    print(f"inputs: {photographs} real photographs (sscd_triton.samples) as JPEG q{JPEG_QUALITY},"
          f" cycled; {PRE.upstream_name} ({PRE.size}x{PRE.size}); {budget.images} images per "
          f"row, batch {budget.batch}, concurrency {budget.concurrency}", flush=True)


# int8 against fp32, measured side by side in the same run.
INT8_PAIRS = (("ort-int8", "ort-fp32"), ("triton-ensemble-B-int8", "triton-ensemble-B"))


def int8_ratios(rows: list[Row]) -> dict[str, float]:
    """{"ort-int8 / ort-fp32": images/s ratio, ...} for the pairs that both ran."""
    by_id = {r.id: r for r in rows if not r.skipped and r.images}
    return {f"{a} / {b}": round(by_id[a].images_per_s / by_id[b].images_per_s, 3)
            for a, b in INT8_PAIRS if a in by_id and b in by_id}


def print_int8(rows: list[Row]) -> None:
    for pair, ratio in int8_ratios(rows).items():
        print(f"int8 speed-up, same run: {pair} = x{ratio:.2f}")


def baseline_of(rows: list[Row]) -> float | None:
    base = next((r for r in rows if r.id == "torch-eager"), None)
    return base.images_per_s if base and not base.skipped else None


def write_json(path: str, rows: list[Row], info: dict, setup_note: str, photographs: int,
               config: dict, total_s: float) -> None:
    import json

    from sscd_triton.bench.common import PRE
    from sscd_triton.files import write_atomic

    baseline = baseline_of(rows)
    result = {"device": info, "setup": setup_note,
              "config": config,
              "preprocess": PRE.upstream_name, "photographs": photographs,
              "rows": [r.summary(baseline) for r in rows], "int8_ratios": int8_ratios(rows),
              "total_s": round(total_s, 1)}
    write_atomic(path, json.dumps(result, indent=2))
