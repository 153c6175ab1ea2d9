#!/usr/bin/env python
"""Reliability of the served model, measured against the real local tritonserver.

    python benchmarks/reliability.py --short           # CI: about 1 min of scenarios after the build
    python benchmarks/reliability.py --json runs/reliability.json   # full: about 8 min

Builds a cpu model repository (untrained demo weights unless --checkpoint; max batch 4) once,
or serves --repository, then runs, each on its own server on 127.0.0.1:
  security  the production flags of docker/entrypoint.sh (restricted protocols behind the
            header key sscd-admin-key, --exit-timeout-secs): listening addresses; every
            restricted gRPC API and HTTP's model config refused without the key, answered with it
  soak      closed loop at a sustained concurrency (tritonclient gRPC, 1 image a request):
            failures, p50/p99 latency in the first vs the last quarter, RSS of the server
            (its whole process group) and of this client at start and end
  hostile   the bad-input corpus mixed with good photographs at concurrency: each bad
            input refused alone with a reason, good ones answered, readiness polled, RSS
  sigterm   requests in flight, then SIGTERM: they complete, new ones are refused, the
            server exits within its exit timeout
  faults    sscd-embed (subprocess) while the server is SIGKILLed and restarted on the same
            ports: it finishes, every input exactly once, descriptors unchanged
  overload  a copy of the repository with max_queue_size 2: a concurrent burst is refused
            at once (UNAVAILABLE "Exceeds maximum queue size"), then sscd-embed at
            concurrency 32 backs off and completes

A check that depends on the machine's other load (steady soak latency) is "not judged"
when the machine's load average rose during it; it is listed, not counted as passed.
Exit status: 0 no check failed, 1 a check failed, 2 bad arguments.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

from sscd_triton.files import write_atomic


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--short", action="store_true",
                   help="CI sizes (soak 20 s, hostile 12 s, 1 kill) instead of the full run "
                        "(soak 180 s, hostile 60 s, 3 kills)")
    p.add_argument("--soak-seconds", type=float, help="override the soak's duration")
    p.add_argument("--hostile-seconds", type=float, help="override the hostile traffic's duration")
    p.add_argument("--kills", type=int, help="override how many times the server is SIGKILLed")
    p.add_argument("--checkpoint", help="weights to serve (default: untrained demo weights)")
    p.add_argument("--repository", help="serve this cpu repository instead of building one")
    p.add_argument("--json", metavar="OUT", help="write every figure and check as JSON")
    p.add_argument("--keep", action="store_true", help="keep the work folder (server logs)")
    return p.parse_args(argv)


def machine() -> dict:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu_model": model, "cpus_usable": usable,
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
            "platform": platform.platform(), "python": platform.python_version()}


def table(result: dict) -> str:
    """One row per scenario: requests, failures and the figures that matter."""
    s = result["scenarios"]
    rows = []
    if "soak" in s:
        x = s["soak"]
        rows.append(("soak", f"{x['seconds']:g} s, c={x['concurrency']}", x["requests"],
                     x["failures"],
                     f"p50 {x['p50_ms_start']}->{x['p50_ms_end']} ms, p99 {x['p99_ms_start']}->"
                     f"{x['p99_ms_end']} ms; RSS server {x['server_rss_mb_start']:.0f}->"
                     f"{x['server_rss_mb_end']:.0f} MB, client {x['client_rss_mb_start']:.0f}->"
                     f"{x['client_rss_mb_end']:.0f} MB"))
    if "hostile" in s:
        x = s["hostile"]
        rows.append(("hostile", f"{x['seconds']:g} s, c={x['concurrency']}", x["requests"],
                     x["unexpected"],
                     f"{x['bad_requests']} bad ({x['kinds']} kinds) + {x['good_requests']} good; "
                     f"ready {x['readiness_polls'] - x['not_ready']}/{x['readiness_polls']} polls; "
                     f"RSS server {x['server_rss_mb_start']:.0f}->{x['server_rss_mb_end']:.0f} MB"))
    if "sigterm" in s:
        x = s["sigterm"]
        rows.append(("sigterm", f"exit timeout {x['exit_timeout_s']} s",
                     x["in_flight_at_sigterm"] + x["sent_during_drain"],
                     x["in_flight_at_sigterm"] - x["in_flight_completed"]
                     - x["in_flight_refused_server_stopping"],
                     f"{x['in_flight_completed']}/{x['in_flight_at_sigterm']} in flight completed, "
                     f"{x['in_flight_refused_server_stopping']} refused 'Server is stopping' "
                     "between ensemble steps; "
                     f"{x['refused_during_drain']} new refused UNAVAILABLE, "
                     f"{x.get('unknown_model_after_unload', 0)} 'no available versions'; exit {x['exit_code']} after "
                     f"{x['exit_s']} s"))
    if "faults" in s:
        x = s["faults"]
        rows.append(("faults", f"{x['inputs']} inputs, sscd-embed", x["inputs"],
                     x["lost"] + x["duplicated"] + x["failures"],
                     f"{x['kills']} SIGKILL+restart survived (down {x['downtime_s']} s); "
                     f"client exit {x['client_exit']}; {x['embedded']} embedded, "
                     f"{x['duplicated']} duplicated, {x['lost']} lost"))
    if "overload" in s:
        x = s["overload"]
        rows.append(("overload", f"queue {x['max_queue_size']}, burst {x['burst']}",
                     x["burst"] + x["embed_inputs"], x["other_errors"] + x["embed_lost"],
                     f"{x['refused_queue_full']} refused in p50 {x['refusal_ms_p50']} ms (max "
                     f"{x['refusal_ms_max']}) vs answers p50 {x['answer_ms_p50']} ms; sscd-embed "
                     f"c=32 exit {x['embed_exit']}, {x['embed_embedded']}/{x['embed_inputs']} "
                     f"embedded, {x['embed_refusals_backed_off']} refusals backed off"))
    if "security" in s:
        x = s["security"]
        g = x["grpc"]
        rows.append(("security", "production flags", len(g) * 2 + 2, 0,
                     f"listening {sorted({a for v in x['bound'].values() for a in v})}; "
                     f"{sum(r['without key'] == 'restricted' for r in g.values())}/{len(g)} gRPC "
                     f"admin APIs refused without key, "
                     f"{sum(r['with key'] != 'restricted' for r in g.values())}/{len(g)} answered "
                     f"with it; HTTP {x['http_model_config']['without key'][:3]} without key"))
    head = ("scenario", "load", "requests", "failures", "figures")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(str(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    from sscd_triton.bench import reliability as rel

    sizes = rel.SHORT if args.short else rel.FULL
    for name, value in (("soak_s", args.soak_seconds), ("hostile_s", args.hostile_seconds),
                        ("kills", args.kills)):
        if value is not None:
            if value < (0 if name == "kills" else 1):
                print(f"error: --{name.replace('_s', '-seconds')} {value} is too small", file=sys.stderr)
                return 2
            sizes = replace(sizes, **{name: value})
    if args.repository and not os.path.isdir(args.repository):
        print(f"error: --repository {args.repository}: no such folder", file=sys.stderr)
        return 2
    info = machine()
    print(f"machine: {info['cpu_model']}, {info['cpus_usable']} usable cpus, load "
          f"{info['load_average_at_start']} at start; mode {'short' if args.short else 'full'}",
          flush=True)
    work = Path(tempfile.mkdtemp(prefix="sscd-reliability-"))
    started = time.monotonic()
    try:
        if args.repository:
            repo = Path(args.repository).resolve()
        else:
            t = time.monotonic()
            print("building the cpu repository (demo weights)" if not args.checkpoint
                  else f"building the cpu repository from {args.checkpoint}", flush=True)
            repo = rel.build(work, args.checkpoint)
            print(f"  built in {time.monotonic() - t:.0f} s", flush=True)
        ctx = rel.Context(repository=repo, work=work, sizes=sizes,
                          log=lambda m: print(m, flush=True))
        result = rel.run_all(ctx, log=ctx.log)
    finally:
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    result.update(mode="short" if args.short else "full", sizes=asdict(sizes), machine=info,
                  weights=args.checkpoint or "demo-untrained",
                  total_s=round(time.monotonic() - started, 1))
    print()
    print(table(result))
    failed = [c for c in result["checks"] if c["ok"] is False]
    unjudged = [c for c in result["checks"] if c["ok"] is None]
    passed = len(result["checks"]) - len(failed) - len(unjudged)
    print(f"\n{passed}/{len(result['checks'])} checks passed, {len(unjudged)} not judged "
          f"in {result['total_s']:.0f} s" + "".join(f"\nFAILED {c['name']}: {c['detail']}" for c in failed)
          + "".join(f"\nnot judged: {c['name']}: {c['detail']}" for c in unjudged))
    if args.json:
        write_atomic(args.json, (json.dumps(result, indent=2, default=str) + "\n").encode())
        print(f"wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
