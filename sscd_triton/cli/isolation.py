#!/usr/bin/env python
"""What isolating corrupt files costs, with and without DALI batching requests together.

    python benchmarks/isolation.py                  # 0.1% and 1% corrupt, three server kinds
    python benchmarks/isolation.py --images 5000 --rates 0.01

Against a fake DALI server whose time is modelled (sscd_triton/bench/isolation.py): for
each server kind, images/s with no corrupt file and with each rate, their ratio, the
requests per corrupt file, and good images wrongly failed. Exit status 0; 1 when a
corrupt image was given a descriptor; 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import sys

from sscd_triton.bench import isolation


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--images", type=int, default=20000, help="images per run")
    p.add_argument("--rates", default="0.001,0.01", help="corrupt fractions, comma-separated")
    p.add_argument("--batch", type=int, default=16, help="images per request (sscd-embed's default)")
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    p.add_argument("--exec-ms", type=float, default=1.0, help="modelled time per DALI batch")
    p.add_argument("--row-ms", type=float, default=0.08,
                   help="modelled time per image (0.08: about 12k images/s in batches of 64)")
    p.add_argument("--max-rows", type=int, default=64, help="largest batch the batcher forms")
    p.add_argument("--reset-ms", type=float, default=0.0,
                   help="modelled DALI pipeline reset after each failed batch (every DALI error "
                        "resets the pipeline; unmeasured: a GPU run gives it)")
    args = p.parse_args(argv)
    try:
        args.rates = [float(x) for x in args.rates.split(",") if x]
    except ValueError:
        p.error("--rates takes fractions, comma-separated, e.g. 0.001,0.01")
    if not args.rates or not all(0 < r < 1 for r in args.rates):
        p.error("--rates: each fraction must lie between 0 and 1")
    if min(args.images, args.batch, args.concurrency, args.max_rows) < 1 or \
            min(args.exec_ms, args.row_ms, args.reset_ms) < 0:
        p.error("--images, --batch, --concurrency, --max-rows must be >= 1; times >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    print(f"{args.images} images, requests of {args.batch}, concurrency {args.concurrency}; "
          f"modelled server: 2 instances, each {args.exec_ms} ms per batch + {args.row_ms} ms "
          f"per image, {args.reset_ms} ms per pipeline reset; batches of up to {args.max_rows} "
          "(dynamic batching) or one request each")
    print(f"\n{'server':<17} {'corrupt':>8} {'images/s':>9} {'vs clean':>9} {'requests':>9} "
          f"{'per corrupt':>12} {'wrongly failed':>15} {'missed':>7} {'switched':>9}")
    missed = 0
    for kind in isolation.SERVERS:
        clean = None
        for rate in [0.0] + args.rates:
            r = isolation.run(kind, args.images, rate, args.batch, args.concurrency,
                              args.exec_ms, args.row_ms, args.max_rows,
                              reset_ms=args.reset_ms)
            clean = clean or r
            extra = (r.requests - clean.requests) / r.corrupt if r.corrupt else 0.0
            missed += r.missed
            print(f"{r.server:<17} {rate:>8.2%} {r.images_per_s:>9.0f} "
                  f"{r.images_per_s / clean.images_per_s:>9.2f} {r.requests:>9} {extra:>12.1f} "
                  f"{r.wrongly_failed:>15} {r.missed:>7} {'yes' if r.switched else '-':>9}",
                  flush=True)
    print("\nvs clean: images/s over the same server's with no corrupt file. per corrupt: extra "
          "requests per corrupt file. told-per-request: the server batches requests together, "
          "the client was told it does not and must find out (switched).")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
