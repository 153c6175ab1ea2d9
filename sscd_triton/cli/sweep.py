#!/usr/bin/env python
"""The served sweep with NVIDIA's perf_analyzer, in-process rows beside it, CSV + plot.

    python benchmarks/sweep.py                      # build + serve a cpu repository, full sweep
    python benchmarks/sweep.py --reference          # the same, rewriting benchmarks/results
    python benchmarks/sweep.py --quick --out /tmp/s # a few seconds per point (the test)
    python benchmarks/sweep.py --url HOST:8001 --tag gpu --no-inprocess   # a running server
    python benchmarks/sweep.py --precision fp32 int8   # both, one after the other, one run

Writes into --out (default runs/benchmarks, git-ignored; --reference: benchmarks/results,
the committed reference results): perf-ensemble-TAG.csv and
perf-descriptor-TAG.csv (perf_analyzer's CSV columns, one row per point, then Mode, Batch,
Images/Second, Stability %, Window ms, Load Average and the composing models' mean batch /
queue / compute),
inprocess-TAG.csv, machine-TAG.txt and throughput-latency-TAG.png (TAG-int8 for int8). Prints the ratio of the
served ensemble at its best concurrency to the in-process pipeline (decode + resize + ONNX
Runtime, no server) on the same photographs. Exit status 0; 1 when a point could not be
measured (the others are still written); 2 on bad arguments or without perf_analyzer
(scripts/setup.sh installs it).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

from sscd_triton import spec
from sscd_triton.bench import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
USER_OUT = os.path.join(ROOT, "runs", "benchmarks")
REFERENCE_OUT = os.path.join(ROOT, "benchmarks", "results")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="folder for the CSVs, machine file and plot (default "
                                 f"{os.path.relpath(USER_OUT, ROOT)}, git-ignored)")
    p.add_argument("--reference", action="store_true",
                   help="write the committed reference results, "
                        f"{os.path.relpath(REFERENCE_OUT, ROOT)} (not with --out)")
    p.add_argument("--tag", help="file name suffix (default: gpu when nvidia-smi sees one, else cpu)")
    p.add_argument("--repository", help="serve this model repository instead of building a cpu "
                                        "one (its sscd_descriptor/1/model.onnx feeds the in-process rows)")
    p.add_argument("--url", help="an already-running server's gRPC HOST:PORT (nothing is built "
                                 "or started; in-process rows need --checkpoint or run on demo weights)")
    p.add_argument("--checkpoint", help="SSCD checkpoint (default: the untrained demo weights)")
    p.add_argument("--admin-key", default=os.environ.get("SSCD_ADMIN_KEY"),
                   help=f"the server's admin key (docker/entrypoint.sh), sent as the header "
                        f"{spec.GRPC_ADMIN_HEADER}: perf_analyzer reads the model config, which "
                        "the production server restricts; it is on perf_analyzer's command "
                        "line, visible to other users of this host (default: $SSCD_ADMIN_KEY)")
    p.add_argument("--concurrency", type=_ints, default=[1, 2, 4, 8],
                   help="ensemble concurrency sweep (default 1,2,4,8)")
    p.add_argument("--rates", default="auto",
                   help="ensemble request rates (requests/s, comma-separated), or 'auto': 0.5, "
                        "0.75 and 1.0 x the best concurrency throughput (default)")
    p.add_argument("--batch", type=int, default=8,
                   help="descriptor images per request, and the largest in-process batch (default 8)")
    p.add_argument("--descriptor-concurrency", type=_ints, default=[1, 2, 4],
                   help="descriptor concurrency sweep (default 1,2,4)")
    p.add_argument("--window-ms", type=int, default=6000,
                   help="perf_analyzer measurement window (default 6000)")
    p.add_argument("--max-trials", type=int, default=6,
                   help="perf_analyzer windows before it gives up on stability (default 6)")
    p.add_argument("--images", type=int, default=48, help="images per in-process row (default 48)")
    p.add_argument("--no-inprocess", action="store_true", help="served points only")
    p.add_argument("--precision", nargs="+", default=["fp32"], choices=("fp32", "int8"),
                   help="the local repository's precision(s), swept one after the other in "
                        "one run (int8: calibrated on the bundled photographs); files of int8 "
                        "end in -int8 (default fp32)")
    p.add_argument("--perf-analyzer", help="the perf_analyzer binary (default: the venv's, then PATH)")
    p.add_argument("--quick", action="store_true",
                   help="the test's size: concurrency 1,2, one rate, descriptor c1 batch 2, "
                        "1.5 s windows, 8 images per in-process row, no torch row")
    args = p.parse_args(argv)
    if args.quick:
        args.concurrency, args.descriptor_concurrency, args.batch = [1, 2], [1], 2
        args.window_ms, args.max_trials, args.images = 1500, 4, 8
        if args.rates == "auto":
            args.rates = "auto1"
    if args.rates not in ("auto", "auto1"):
        try:
            args.rates = [float(x) for x in args.rates.split(",") if x]
        except ValueError:
            p.error("--rates takes numbers, comma-separated, or auto")
    if min(args.concurrency + args.descriptor_concurrency + [args.batch, args.window_ms]) < 1:
        p.error("--concurrency, --descriptor-concurrency, --batch, --window-ms must be >= 1")
    if args.repository and args.url:
        p.error("--repository and --url exclude each other")
    args.precision = sorted(set(args.precision), key=spec.PRECISIONS.index)
    if (args.repository or args.url) and len(args.precision) > 1:
        p.error("one --precision with --repository or --url: a server serves what it was "
                "built with")
    if args.reference and args.out:
        p.error("--reference and --out exclude each other")
    # a user's run never rewrites the tracked reference results unless asked to
    args.out = args.out or (REFERENCE_OUT if args.reference else USER_OUT)
    return args


def _fmt(x, digits=1):
    try:
        return f"{float(x):.{digits}f}"
    except (TypeError, ValueError):
        return "-"


def print_points(points: list[sweep.Point]) -> None:
    print(f"\n{'path':<11} {'mode':<12} {'value':>6} {'b':>3} {'images/s':>9} {'p50 ms':>8} "
          f"{'p99 ms':>8}  {'pre batch/queue/infer ms':>25}  {'desc batch/queue/infer ms':>26} load")
    for p in points:
        if not p.row:
            print(f"{p.path:<11} {p.mode:<12} {p.value:>6g} {p.batch:>3}  failed: {p.error}")
            continue
        r = p.row

        def trio(m):
            return (f"{_fmt(r.get(f'{m} mean batch'), 2)}/{_fmt(float(r[f'{m} queue us']) / 1e3 if r.get(f'{m} queue us') not in (None, '') else None)}"
                    f"/{_fmt(float(r[f'{m} compute infer us']) / 1e3 if r.get(f'{m} compute infer us') not in (None, '') else None)}"
                    if f"{m} mean batch" in r else "")
        print(f"{p.path:<11} {p.mode:<12} {p.value:>6g} {p.batch:>3} {r['Images/Second']:>9.2f} "
              f"{float(r['p50 latency']) / 1e3:>8.0f} {float(r['p99 latency']) / 1e3:>8.0f}  "
              f"{trio(spec.PREPROCESS_MODEL):>25}  {trio(spec.DESCRIPTOR_MODEL):>26} {r['Load Average']}")


def sweep_one(precision: str, args, pa: str, model, jpegs, tensors, work: str) -> dict:
    """Build (unless --url/--repository) and serve the cpu repository of `precision`, run
    its in-process rows, then every perf_analyzer point against its server: {"ens",
    "desc", "rows", "best", "lifetime", "info"} (info None when no server answered)."""
    from sscd_triton.bench import device, local

    out = {"ens": [], "desc": [], "rows": [], "best": None, "lifetime": {}, "info": None}
    server = None
    try:
        load_at_start = [round(x, 2) for x in os.getloadavg()]
        repo, onnx = args.repository, None
        if repo:
            onnx = os.path.join(repo, spec.DESCRIPTOR_MODEL, "1", "model.onnx")
        elif model is not None:
            print(f"[sweep] exporting the {precision} ONNX", flush=True)
            onnx = local.export_onnx(model, os.path.join(work, f"sscd-{precision}.onnx"),
                                     precision)
            if not args.url:
                from sscd_triton.serving.build import build_repository

                repo = os.path.join(work, f"repository-{precision}")
                # The exported ONNX as is: parity is build_repository.py's job, not the sweep's.
                build_repository(repo, "cpu", onnx=onnx, max_batch=max(16, args.batch))

        if not args.no_inprocess and onnx and os.path.exists(onnx):
            batches = sorted({1, 4, args.batch}) if not args.quick else [1, args.batch]
            print(f"[sweep] {precision} in-process rows (batches {batches}, {args.images} "
                  "images each)", flush=True)
            out["rows"] = sweep.inprocess_rows(model, onnx, jpegs, tensors, batches,
                                               args.images, warmup=1,
                                               with_torch=not args.quick, precision=precision)

        if args.url:
            url = args.url
        else:
            from sscd_triton.serving.server import TritonServer

            server = TritonServer(repo).start()
            url = server.grpc_url
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(url)
        try:
            meta = client.get_server_metadata(as_json=True)
        except Exception as e:  # noqa: BLE001
            print(f"error: no Triton server answering at {url}: {e}", file=sys.stderr)
            return out
        info = device.describe_device(meta, args.url)
        info["load_average_at_start"] = load_at_start
        out["info"] = info

        admin = sweep.admin_args(args.admin_key)
        ens_data = [*admin, "--input-data",
                    sweep.write_ensemble_data(jpegs, os.path.join(work, "ens.json"))]
        desc_data = [*admin, "--input-data",
                     sweep.write_descriptor_data(tensors[0], os.path.join(work, "desc")),
                     "--shape", f"{spec.INPUT_NAME}:{','.join(map(str, tensors.shape[1:]))}"]
        timeout = max(60.0, args.window_ms / 1e3 * (args.max_trials + 2) * 2)

        def measure(path, model_name, mode, value, batch, data):
            print(f"[sweep] {precision} {path} {mode} {value:g} (batch {batch})", flush=True)
            pt = sweep.run_point(pa, url, model_name, sweep.Point(path, mode, value, batch), data,
                                 args.window_ms, work, timeout, args.max_trials,
                                 sweep.QUICK_ATTEMPTS if args.quick else sweep.ATTEMPTS)
            if pt.error:
                print(f"[sweep]   failed: {pt.error}", flush=True)
            return pt

        ens = [measure("ensemble", spec.ENSEMBLE_NAME, "concurrency", c, 1, ens_data)
               for c in args.concurrency]
        good = [p for p in ens if p.row]
        best = max(good, key=lambda p: p.row["Images/Second"]) if good else None
        if args.rates in ("auto", "auto1"):
            fractions = (0.5, 0.75, 1.0) if args.rates == "auto" else (0.5,)
            rates = [round(best.row["Images/Second"] * f, 2) for f in fractions] if best else []
        else:
            rates = args.rates
        ens += [measure("ensemble", spec.ENSEMBLE_NAME, "request_rate", r, 1, ens_data)
                for r in rates if r > 0]
        out["ens"], out["best"] = ens, best
        out["desc"] = [measure("descriptor", spec.DESCRIPTOR_MODEL, "concurrency", c, args.batch,
                               desc_data) for c in args.descriptor_concurrency]
        out["lifetime"] = sweep.server_statistics_note(
            client, {spec.GRPC_ADMIN_HEADER: args.admin_key} if args.admin_key else None)
        client.close()
        return out
    finally:
        if server is not None:
            server.stop()


def write_results(precision: str, res: dict, args, pa: str, tag: str, started: str,
                  t_start: float, checkpoint) -> float | None:
    """The CSVs, machine file and plot of one precision's sweep (files TAG, TAG-int8...), and
    its printed table; returns the served / in-process ratio."""
    ens, desc, rows, best, info = res["ens"], res["desc"], res["rows"], res["best"], res["info"]
    suffix = "" if precision == "fp32" else f"-{precision}"
    os.makedirs(args.out, exist_ok=True)
    files = {k: os.path.join(args.out, f"{k}-{tag}{suffix}.{ext}") for k, ext in
             (("perf-ensemble", "csv"), ("perf-descriptor", "csv"), ("inprocess", "csv"),
              ("machine", "txt"), ("throughput-latency", "png"))}
    sweep.write_perf_csv(ens, files["perf-ensemble"])
    sweep.write_perf_csv(desc, files["perf-descriptor"])
    if rows:
        sweep.write_inprocess_csv(rows, files["inprocess"])
    print(f"\n== {precision} ==")
    print_points(ens + desc)
    if rows:
        print(f"\n{'in-process':<20} {'b':>3} {'images/s':>9} {'p50 ms':>8} {'p99 ms':>8} load")
        for r in rows:
            print(f"{r.id:<20} {r.batch:>3} {r.images_per_s:>9.2f} {r.pct(50):>8.1f} "
                  f"{r.pct(99):>8.1f} {r.load1}")
    pipes = [r for r in rows if r.id.startswith("pipeline-b")]
    ratio_line = "ratio: n/a (no ensemble point or no in-process pipeline)"
    ratio = None
    if best and pipes:
        top = max(pipes, key=lambda r: r.images_per_s)
        ratio = best.row["Images/Second"] / top.images_per_s
        ratio_line = (f"{precision}: served ensemble at its best concurrency (c{int(best.value)}: "
                      f"{best.row['Images/Second']:.2f} images/s) / in-process pipeline "
                      f"(decode+resize+ORT, {top.id}: {top.images_per_s:.2f} images/s) = {ratio:.2f}")
    print("\n" + ratio_line)
    info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    stamp = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(pa))), "perf_analyzer",
                         ".installed")
    pa_version = open(stamp).read().strip() if os.path.exists(stamp) else "not from the installer"
    sweep.write_machine(info, files["machine"], {
        "started": started, "finished": sweep.now(),
        "total_s": round(time.perf_counter() - t_start),
        "perf_analyzer": f"{os.path.relpath(pa, ROOT) if pa.startswith(ROOT + os.sep) else pa} "
                         f"({pa_version}); measurement window {args.window_ms} ms, "
                         f"stability 25% (then 100%, then 100% over doubled windows"
                         f"{', then any (--quick)' if args.quick else ''}: see Stability %, "
                         f"Window ms), max trials {args.max_trials}, "
                         f"stabilised on average latency and throughput",
        "server_lifetime_statistics": res["lifetime"],
        "weights": checkpoint if args.checkpoint else "demo (untrained) weights",
        "precision": precision,
        "ratio_ensemble_best_vs_inprocess_pipeline": round(ratio, 3) if ratio else None,
    })
    title = (f"SSCD ResNet50 320x320 {precision}, {tag}: {info['cpu_model']} "
             f"({info['cpus_usable']} cpus), load {info['load_average_at_start'][0]}-"
             f"{info['load_average_at_end'][0]}")
    sweep.plot(ens + desc, rows, files["throughput-latency"], title)
    print(f"wrote {', '.join(files[k] for k in files if os.path.exists(files[k]))}")
    return ratio


def main(argv=None) -> int:
    args = parse_args(argv)
    pa = sweep.find_perf_analyzer(args.perf_analyzer)
    if pa is None:
        print("error: perf_analyzer not found: run scripts/setup.sh (or .venv/bin/python "
              "scripts/install_perf_analyzer.py), or pass --perf-analyzer PATH", file=sys.stderr)
        return 2
    from sscd_triton.bench import local
    from sscd_triton.bench.common import load_inputs

    t_start = time.perf_counter()
    started = sweep.now()
    jpegs, tensors = load_inputs()
    model, checkpoint = None, None
    try:
        model, checkpoint, _ = local.load_model(args.checkpoint, "cpu")
    except local.LocalUnavailable as e:
        if not args.url and not args.repository:
            print(f"error: cannot build the cpu repository: {e}", file=sys.stderr)
            return 2
    except (OSError, ValueError) as e:
        print(f"error: --checkpoint: {e}", file=sys.stderr)
        return 2
    results = {}
    work = tempfile.mkdtemp(prefix="sscd-sweep-")
    try:
        # one precision after the other: their servers never share the cores
        for precision in args.precision:
            results[precision] = sweep_one(precision, args, pa, model, jpegs, tensors, work)
            if results[precision]["info"] is None:
                return 2
    finally:
        shutil.rmtree(work, ignore_errors=True)
    info = results[args.precision[0]]["info"]
    tag = args.tag or ("gpu" if info["gpus"] else "cpu")
    from sscd_triton.bench import device

    device.print_device(info)
    for precision, res in results.items():
        write_results(precision, res, args, pa, tag, started, t_start, checkpoint)
    if "int8" in results and "fp32" in results and results["int8"]["best"] and \
            results["fp32"]["best"]:
        a, b = results["int8"]["best"], results["fp32"]["best"]
        print(f"\nint8 speed-up, same run: served ensemble at its best concurrency, int8 "
              f"(c{int(a.value)}: {a.row['Images/Second']:.2f} images/s) / fp32 "
              f"(c{int(b.value)}: {b.row['Images/Second']:.2f} images/s) = "
              f"x{a.row['Images/Second'] / b.row['Images/Second']:.2f}")
    print(f"load average at end {[round(x, 2) for x in os.getloadavg()]}; total "
          f"{time.perf_counter() - t_start:.0f} s. Quote these numbers with the machine files.")
    points = [p for res in results.values() for p in res["ens"] + res["desc"]]
    failed = [p for p in points if not p.row]
    if failed or not points:
        print(f"error: {len(failed)} of {len(points)} points could not be measured "
              "(reasons above)", file=sys.stderr)
        return 1
    return 0

if __name__ == "__main__":
    sys.exit(main())
