#!/usr/bin/env python
"""Latency and throughput of every way to get an SSCD descriptor, side by side, one run.

    python benchmarks/bench.py                       # local cpu repository, demo weights
    python benchmarks/bench.py --url HOST:8001       # an already-running server (e.g. gpu)

Rows (all on the same machine, in the same run, same weights, square320 preprocessing):
  torch-eager          PyTorch eager fp32 (torch.inference_mode) on preprocessed tensors
  ort-fp32             ONNX Runtime, the fp32 ONNX, on the same tensors
  ort-fp16             ONNX Runtime, the fp16 ONNX with its fp32 island (--precision fp16)
  ort-int8             ONNX Runtime, the int8 Q/DQ ONNX (--precision int8: cpu form, calibrated
                       on the bundled photographs)
  triton-descriptor    Triton `sscd_descriptor`: float32 tensors in over gRPC
  triton-ensemble-1    Triton `sscd` ensemble: one encoded JPEG per request
  triton-ensemble-B    Triton `sscd` ensemble: B JPEGs per request (zero-padded uint8 [B, L])
  triton-ensemble-B-int8  the same on an int8 cpu repository (--precision int8, local server
                       only), started once the fp32 server has stopped: the served int8 /
                       fp32 ratio is printed
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
import os
import shutil
import sys
import tempfile
import time

from sscd_triton import spec
from sscd_triton.bench import device, local, reporting, served
from sscd_triton.bench.common import ROW_IDS, Budget, Row, load_inputs


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
                   help="ONNX Runtime rows: fp32, fp16 (fp16-island ONNX) and/or int8 (also "
                        "served, on the local server), e.g. --precision fp32 int8")
    p.add_argument("--url", help="benchmark an already-running server at HOST:PORT (gRPC) "
                                 "instead of building and starting the local cpu one")
    p.add_argument("--checkpoint", help="SSCD checkpoint for the local rows and the local "
                                        "server (default: the untrained demo weights)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="PyTorch / ONNX Runtime rows (auto: cuda when torch sees a GPU)")
    p.add_argument("--admin-key", default=os.environ.get("SSCD_ADMIN_KEY"),
                   help=f"the server's admin key (docker/entrypoint.sh), sent as gRPC header "
                        f"{spec.GRPC_ADMIN_HEADER} for the restricted statistics and model-config "
                        "protocols (default: $SSCD_ADMIN_KEY)")
    p.add_argument("--json", metavar="OUT", help="write every result to this JSON file")
    p.add_argument("--keep-log", action="store_true", help="keep the local server's log")
    args = p.parse_args(argv)
    args.precision = sorted({x for v in args.precision for x in v.split(",") if x},
                            key=spec.PRECISIONS.index) if all(
        x in spec.PRECISIONS for v in args.precision for x in v.split(",") if x) else None
    for name in ("images", "batch", "concurrency"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if not args.precision:
        p.error(f"--precision takes {', '.join(spec.PRECISIONS)}")
    return args


def build_local(checkpoint: str, work: str, args, precision: str = "fp32") -> tuple[str, str]:
    """Build the cpu repository of `precision` from `checkpoint`: (its folder, its ONNX)."""
    t = time.perf_counter()
    repo = os.path.join(work, f"repository-{precision}")
    onnx = served.build_cpu_repository(checkpoint, repo, max(16, args.batch), precision)
    print(f"[bench] built the {precision} cpu repository in {time.perf_counter() - t:.0f} s",
          flush=True)
    return repo, onnx


def start_local_server(repo: str, args):
    """tritonserver on `repo`: (server, a one-line note)."""
    from sscd_triton.serving.server import TritonServer

    t = time.perf_counter()
    log = None
    if args.keep_log:
        fd, log = tempfile.mkstemp(prefix="sscd-bench-tritonserver-", suffix=".log")
        os.close(fd)
        print(f"server log: {log}")
    server = TritonServer(repo, log_path=log).start()
    note = (f"local cpu repository (demo weights unless --checkpoint), max batch "
            f"{max(16, args.batch)}: server ready in {time.perf_counter() - t:.0f} s")
    return server, note


def int8_served_rows(server, repos: dict | None, tensors, jpegs, budget: Budget,
                     args) -> list:
    """triton-ensemble-B-int8: the fp32 server (when local) stops first, so that the two
    never share the cores; then the int8 repository's server, the same row."""
    if repos is None:
        return [Row("triton-ensemble-B-int8", budget.batch, budget.concurrency,
                    skipped="--url: the server serves one precision, whatever it was built with")]
    import tritonclient.grpc as grpcclient

    server.stop()
    server, _ = start_local_server(repos["int8"], args)
    client = None
    try:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        return served.served_rows(client, tensors, jpegs, budget, None,
                                  which=("triton-ensemble-B",), suffix="-int8")
    finally:
        if client is not None:
            client.close()
        server.stop()


def main(argv=None) -> int:
    args = parse_args(argv)
    budget = Budget(images=args.images, batch=args.batch, warmup=args.warmup,
                    concurrency=args.concurrency, admin_key=args.admin_key)
    t_start = time.perf_counter()
    jpegs, tensors = load_inputs()
    try:  # the local rows and the local server use the same weights
        model, checkpoint, where = local.load_model(args.checkpoint, args.device)
        missing = ""
    except local.LocalUnavailable as e:
        model, missing = None, str(e)
    except (OSError, ValueError) as e:  # CheckpointError is a ValueError
        print(f"error: --checkpoint: {e}", file=sys.stderr)
        return 2
    if args.url is None and model is None:
        print(f"error: no --url and the local repository cannot be built ({missing})",
              file=sys.stderr)
        return 2

    work = tempfile.mkdtemp(prefix="sscd-bench-")
    server, served_onnx, rows = None, {}, []
    try:
        # Server first: its version belongs in the header.
        if args.url is None:
            repos = {}
            for precision in ("fp32", *(["int8"] if "int8" in args.precision else [])):
                repos[precision], served_onnx[precision] = build_local(checkpoint, work, args,
                                                                       precision)
            server, setup_note = start_local_server(repos["fp32"], args)
        else:
            setup_note = f"remote server {args.url}: its weights are whatever it serves"
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(args.url or server.grpc_url)
        try:
            meta = client.get_server_metadata(as_json=True)
        except Exception as e:  # noqa: BLE001
            print(f"error: no Triton server answering at {args.url or server.grpc_url}: {e}",
                  file=sys.stderr)
            return 2
        info = device.describe_device(meta, args.url)
        reporting.print_header(info, setup_note, len(jpegs), budget)

        ort_outputs = None
        if model is not None:
            files = local.onnx_files(model, args.precision, work, served_onnx)
            model_rows, ort_outputs = local.model_rows(model, tensors, budget, where, files)
            rows += model_rows
        else:
            rows += [Row(i, args.batch, 1, skipped=missing)
                     for i in ["torch-eager", *(f"ort-{p}" for p in args.precision)]]
        rows += local.decode_rows(jpegs, budget)  # before the server rows load the CPU
        sys.stdout.flush()
        rows += served.served_rows(client, tensors, jpegs, budget, ort_outputs)
        client.close()
        if "int8" in args.precision:
            rows += int8_served_rows(server, repos if args.url is None else None, tensors, jpegs,
                                     budget, args)
            server = None  # stopped there
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)

    ordered = sorted(rows, key=lambda r: ROW_IDS.index(r.id))
    reporting.print_table(ordered, reporting.baseline_of(ordered), budget)
    reporting.print_server(ordered)
    reporting.print_int8(ordered)
    info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    total = time.perf_counter() - t_start
    print(f"\nload average at end {info['load_average_at_end']}; total {total:.0f} s. "
          f"Quote these numbers with the device above.")
    if args.json:
        config = {**{k: v for k, v in vars(args).items() if k != "json"},
                  "requests": budget.requests}
        reporting.write_json(args.json, ordered, info, setup_note, len(jpegs), config, total)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
