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
import math
import os
import shutil
import sys
import tempfile
import time

from sscd_triton import spec
from sscd_triton.bench import device, local, reporting, served
from sscd_triton.bench.common import ROW_IDS, Row, load_inputs


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
                        f"{spec.GRPC_ADMIN_HEADER} for the restricted statistics and model-config "
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


def start_local_server(checkpoint: str, work: str, args):
    """Build the cpu repository from `checkpoint` and start tritonserver on it:
    (server, the served ONNX, a one-line note)."""
    from sscd_triton.serving.server import TritonServer

    max_batch = max(16, args.batch)
    t = time.perf_counter()
    onnx = served.build_cpu_repository(checkpoint, os.path.join(work, "repository"), max_batch)
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    log = None
    if args.keep_log:
        fd, log = tempfile.mkstemp(prefix="sscd-bench-tritonserver-", suffix=".log")
        os.close(fd)
        print(f"server log: {log}")
    server = TritonServer(os.path.join(work, "repository"), log_path=log).start()
    note = (f"local cpu repository (demo weights unless --checkpoint), max batch {max_batch}: "
            f"built in {build_s:.0f} s, server ready in {time.perf_counter() - t:.0f} s")
    return server, onnx, note


def main(argv=None) -> int:
    args = parse_args(argv)
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
    server, served_onnx, rows = None, None, []
    try:
        # Server first: its version belongs in the header.
        if args.url is None:
            server, served_onnx, setup_note = start_local_server(checkpoint, work, args)
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
        reporting.print_header(info, setup_note, len(jpegs), args)

        ort_outputs = None
        if model is not None:
            files = local.onnx_files(model, args.precision, work, served_onnx)
            model_rows, ort_outputs = local.model_rows(model, tensors, args, where, files)
            rows += model_rows
        else:
            rows += [Row(i, args.batch, 1, skipped=missing)
                     for i in ["torch-eager", *(f"ort-{p}" for p in args.precision)]]
        rows += local.decode_rows(jpegs, args)  # before the server rows load the CPU
        sys.stdout.flush()
        rows += served.served_rows(client, tensors, jpegs, args, ort_outputs)
        client.close()
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)

    ordered = sorted(rows, key=lambda r: ROW_IDS.index(r.id))
    reporting.print_table(ordered, reporting.baseline_of(ordered), args)
    reporting.print_server(ordered)
    info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    total = time.perf_counter() - t_start
    print(f"\nload average at end {info['load_average_at_end']}; total {total:.0f} s. "
          f"Quote these numbers with the device above.")
    if args.json:
        reporting.write_json(args.json, ordered, info, setup_note, len(jpegs), args, total)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
