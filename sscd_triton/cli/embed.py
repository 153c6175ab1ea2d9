#!/usr/bin/env python3
"""Embed image collections with SSCD descriptors through Triton, fast, losing nothing.

    python client/embed.py photos/ --url 127.0.0.1:8001 --output runs/photos
    find /data -name '*.jpg' | python client/embed.py - --url h1:8001 --url h2:8001 --output out/
    python client/embed.py @list.txt 'shots/**/*.png' --url 127.0.0.1:8001 --output small.npz

INPUT: files; directories (walked recursively: image extensions, plus files without
one whose first bytes are an image signature; any other file is recorded as a failure,
"not an accepted image type", counted by type in the summary); glob patterns; list files
(`@list.txt`, or any existing `.txt`/`.lst` file: one path per line); `-` for paths on
stdin. Inputs are enumerated lazily and de-duplicated. Ids: a file found through a file,
folder or glob argument is named by its resolved absolute path (symbolic links
resolved), so `dir`, `./dir`, `/abs/dir` and a link to it are the same inputs; lines of
list files and stdin are kept as given. A path that does not exist is a usage error
(exit 2), found before anything runs.

--output DIR (the form for large collections): Parquet shards
`DIR/embeddings/*.parquet` (`id` string, `embedding` fixed-size list of float32) and
`DIR/failures/*.parquet` (`id`, `reason`), the producing model (name, version, weights
fingerprint, preprocessing) in every file's metadata and in `DIR/manifest.json`.
pyarrow, DuckDB (`SELECT * FROM 'DIR/embeddings/*.parquet'`), Spark, Ray and pandas read
them. --output OUT.npz (small jobs): arrays `ids` and `embeddings`, failures in
`OUT.failures.jsonl`. Read any form with
`from sscd_triton import load_embeddings; ids, emb = load_embeddings(path)`.
Every input ends up exactly once in the embeddings or in the failures.

Resume: rerun the same command after a crash, kill -9 or exit status 3: what is in a
shard is kept and only the rest is embedded; the result is the same as that of an
uninterrupted run. Rerunning with new inputs adds them. When every INPUT is a listing
(list files, `-`) and the output a folder, the inputs are cut into partitions of
--partition-size lines, each de-duplicated on its own (a path listed in two partitions
is embedded in each); a finished partition is marked done and skipped on resume without
reading its ids, so resuming needs memory for one partition, not for every id. A
partitioned input must be given again unchanged (checked by a hash of each partition's
lines). Other inputs are de-duplicated across the run, and resuming reads every
recorded id (12 bytes each in memory). Resuming into an output written by another model,
version, weights or preprocessing is refused (exit 2).

Exit status:
  0  every input embedded
  1  the run completed, but some inputs failed (listed with reasons in the failures file)
  2  bad usage: arguments, an input that does not exist, an output written by another
     model or preprocessing (or being written by another embed.py), a partitioned input
     that changed, a model the server does not serve, an unusable --checkpoint
  3  could not start: no server at --url within a few seconds (refused, unknown host,
     not gRPC); or could not finish: no server answered for --give-up-after seconds (or
     a shard could not be written); everything done so far is kept and rerunning the
     same command resumes
  4  --check-parity: a parity bound failed (takes precedence over 1)
  130 interrupted (Ctrl-C, SIGTERM); resumable like 3
"""
from __future__ import annotations

import os
import sys
import argparse

from sscd_triton import spec
from sscd_triton.cli._help import DefaultsHelpFormatter
from sscd_triton.client import io as outio
from sscd_triton.client import job, sources
from sscd_triton.client.exceptions import Interrupted, Unfinished, UsageError
from sscd_triton.client.model_info import DEFAULT_BATCH, START_TIMEOUT
from sscd_triton.cli._main import command, plural, run_main

EXIT_OK, EXIT_FAILURES, EXIT_USAGE, EXIT_UNFINISHED, EXIT_PARITY = 0, 1, 2, 3, 4
EXIT_INTERRUPTED = 130
DEFAULT_URL = "127.0.0.1:8001"
FIRST_FAILURES = 5  # reasons shown at the end of a run
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


class _Formatter(argparse.RawDescriptionHelpFormatter, DefaultsHelpFormatter):
    """The description and epilog as written; every option's default shown."""


def parse_args(argv=None) -> argparse.Namespace:
    doc = __doc__.split("\n\n")
    p = argparse.ArgumentParser(
        prog=command("client/embed.py"), description=doc[0], formatter_class=_Formatter,
        epilog="\n\n".join(doc[2:]))
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="files, folders, glob patterns, @list files, or - for stdin")
    p.add_argument("--url", action="append", metavar="HOST:PORT",
                   help=f"Triton gRPC endpoint ({DEFAULT_URL} when not given; gRPC is port "
                        "8001 by default, not the HTTP 8000); repeat to spread requests over "
                        "servers")
    p.add_argument("--output", required=True,
                   help="a folder (Parquet shards) or a file name ending .npz")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"images per request ({DEFAULT_BATCH} when not given; capped at the "
                        "model's max_batch_size)")
    p.add_argument("--concurrency", type=int, default=8,
                   help="requests in flight, all servers together")
    p.add_argument("--read-threads", type=int, default=8,
                   help="threads reading (and decoding) files")
    p.add_argument("--preprocess", choices=("server", "client"), default="server",
                   help="server: send file bytes to the ensemble; client: decode and "
                        "preprocess here and send float32 tensors to the descriptor model")
    p.add_argument("--preprocess-mode", choices=sorted(spec.PREPROCESS),
                   help="preprocessing preset; must match the server's (when not given: the "
                        f"one the server reports, else {spec.DEFAULT_PREPROCESS})")
    p.add_argument("--shared-memory", choices=("none", "system"), default="none",
                   help="system: pass tensors through /dev/shm (servers on this host only)")
    p.add_argument("--header", action="append", metavar="NAME=VALUE",
                   help="gRPC header sent with every call, e.g. the key of a server started "
                        "with --grpc-restricted-protocol=...:KEY=VALUE, which expects header "
                        "triton-grpc-protocol-KEY (docker/entrypoint.sh restricts shared-memory "
                        "and model-config: --header "
                        "triton-grpc-protocol-sscd-admin-key=$SSCD_ADMIN_KEY)")
    p.add_argument("--model", help=f"model to call (when not given: {spec.ENSEMBLE_NAME!r}, or "
                                    f"{spec.DESCRIPTOR_MODEL!r} with --preprocess client)")
    p.add_argument("--give-up-after", type=float, default=120.0, metavar="SECONDS",
                   help="stop (exit 3) when no server has answered for this long (a server "
                        f"lost mid-run; one not there at start fails within {START_TIMEOUT:g}s)")
    p.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS",
                   help="deadline of one request")
    p.add_argument("--shard-size", type=int, default=10000, help="descriptors per shard file")
    p.add_argument("--partition-size", type=int, default=100_000, metavar="LINES",
                   help="lines of a listing (list files, -) per partition, the unit of resume "
                        "(0: no partitions; resume by reading every recorded id)")
    p.add_argument("--flush-seconds", type=float, default=60.0,
                   help="also write a (smaller) shard when the last one is this old")
    p.add_argument("--max-file-bytes", type=int, default=64 << 20,
                   help="inputs larger than this fail without being read")
    p.add_argument("--max-request-bytes", type=int, default=64 << 20,
                   help="cap on one request's padded size")
    p.add_argument("--check-parity", type=int, metavar="N", default=0,
                   help="afterwards, re-embed N sampled inputs with PyTorch and bound the "
                        "difference (needs --checkpoint; exit 4 when a bound fails)")
    p.add_argument("--checkpoint", help="the SSCD checkpoint the server was built from")
    p.add_argument("--seed", type=int, default=0, help="seed of the parity sample")
    p.add_argument("--quiet", action="store_true", help="plain log lines instead of a progress bar")
    p.add_argument("--ray", metavar="ADDRESS",
                   help="run on Ray Data (pip install 'ray[data]'): 'local' starts a local "
                        "instance, an address (auto, HOST:6379, ray://...) joins a cluster; "
                        "every input is cut into --partition-size partitions embedded by an "
                        "actor pool (inputs and --output on a file system the workers share)")
    p.add_argument("--ray-actors", type=int, default=0, metavar="N",
                   help="with --ray: actors in the pool, each with --concurrency requests in "
                        "flight (0: one per CPU of the Ray cluster)")
    args = p.parse_args(argv)
    args.url = args.url or [DEFAULT_URL]
    return args


def validate(args) -> list[str]:
    problems = settings_of(args).problems()
    if args.ray_actors < 0:
        problems.append("--ray-actors must be >= 0")
    for url in args.url:
        if "://" not in url and ":" in url and url.rsplit(":", 1)[1] == "8000":
            print(f"warning: --url {url}: 8000 is Triton's HTTP port by default; gRPC is "
                  "usually 8001", file=sys.stderr)
    args.header = args.header or []
    for header in args.header:
        if "=" not in header or not header.split("=", 1)[0].strip():
            problems.append(f"--header {header!r}: give NAME=VALUE")
    if args.check_parity == 1 or args.check_parity < 0:
        problems.append("--check-parity N: N must be 0 (off) or >= 2 (parity needs other images)")
    if args.check_parity and not args.checkpoint:
        problems.append("--check-parity needs --checkpoint (the checkpoint the server serves)")
    if args.checkpoint and not os.path.isfile(args.checkpoint):
        problems.append(f"--checkpoint {args.checkpoint}: no such file")
    if args.shared_memory == "system":
        remote = [u for u in args.url if u.rsplit(":", 1)[0] not in LOCAL_HOSTS]
        if remote:
            print(f"warning: --shared-memory system needs servers on this host; {remote[0]} "
                  "does not look local", file=sys.stderr)
    return problems + sources.check_args(args.inputs)


def by_type(unaccepted) -> str:
    """The summary's count of files of a type not accepted (a Counter by file type)."""
    if not unaccepted:
        return ""
    types = ", ".join(f"{t} {n}" for t, n in unaccepted.most_common())
    return f" ({sum(unaccepted.values())} {sources.NOT_ACCEPTED}: {types})"


def end_notes(output: str, failed: int, sscd_model: str | None) -> None:
    """After the summary: the first failures' reasons, and what demo weights mean."""
    if failed:
        shown = outio.first_failures(output, FIRST_FAILURES)
        which = (f"first {len(shown)}, {failed - len(shown)} more" if failed > len(shown)
                 else str(failed))
        print(f"failures ({which}; all in {outio.failures_path(output)}):")
        for record in shown:
            print(f"  {record['id']}: {record['reason']}")
    if sscd_model == spec.DEMO_MODEL_NAME:
        print(f"note: the server serves {spec.DEMO_NOTE}", flush=True)


def with_parity(args, status: int, mode: spec.Preprocess, resampled: bool,
                int8: bool = False) -> int:
    """`status`, or EXIT_PARITY when --check-parity's bound fails on the finished output
    (`resampled`: the server decodes/resizes otherwise than PIL; `int8`: it serves an int8
    model; see spec)."""
    if not args.check_parity:
        return status
    from sscd_triton.client import parity_check

    try:
        ok = parity_check.check(args.output, args.check_parity, args.checkpoint, mode,
                                args.max_file_bytes, args.seed, resampled=resampled,
                                int8=int8)
    except parity_check.ParityUsageError as e:
        raise UsageError(str(e)) from None
    return status if ok else EXIT_PARITY


def settings_of(args) -> job.Settings:
    """The library's settings from the parsed command line."""
    return job.Settings(
        urls=list(args.url), batch_size=args.batch_size, concurrency=args.concurrency,
        read_threads=args.read_threads, preprocess=args.preprocess,
        preprocess_mode=args.preprocess_mode, shared_memory=args.shared_memory,
        headers=dict(h.split("=", 1) for h in args.header or [] if "=" in h) or None,
        model=args.model,
        give_up_after=args.give_up_after, timeout=args.timeout, shard_size=args.shard_size,
        partition_size=args.partition_size, flush_seconds=args.flush_seconds,
        max_file_bytes=args.max_file_bytes, max_request_bytes=args.max_request_bytes,
        quiet=args.quiet)


def report(summary: job.Summary) -> None:
    """The summary line and the end notes of a finished run, on stdout."""
    new = summary.new_embedded + summary.new_failed
    how = (plural(summary.requests, "request") if summary.requests is not None else
           f"{plural(summary.partitions, 'partition')} on {plural(summary.actors, 'Ray actor')}")
    print(f"summary: embedded {summary.new_embedded}, failed {summary.new_failed}"
          f"{by_type(summary.unaccepted)}, skipped "
          f"{summary.skipped} (done before, or named twice), elapsed {summary.elapsed:.1f}s, "
          f"{new / max(summary.elapsed, 1e-9):.1f} images/s "
          f"({how}); {summary.output} holds {summary.embedded} "
          f"descriptors, {summary.failed} failures in {outio.failures_path(summary.output)}",
          flush=True)
    end_notes(summary.output, summary.failed, summary.info.get("sscd_model"))


def unfinished(e: Unfinished) -> int:
    """The one message of a run that stopped early (resumable), and its exit status."""
    if isinstance(e, Interrupted):
        print(f"interrupted: {e.kept}; rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    if not e.started:
        print(f"error: could not start: {e}. Nothing was written; rerun when a "
              "server is up.", file=sys.stderr)
    else:
        print(f"error: could not finish: {e}.\n{e.what_kept} is kept "
              f"({e.kept}); rerun the same command to resume.", file=sys.stderr)
    return EXIT_UNFINISHED


def run(args) -> int:
    try:
        if args.ray:
            from sscd_triton.client import ray_embed  # ray is imported only here

            summary = ray_embed.run(args.inputs, args.output, settings_of(args), args.ray,
                                    args.ray_actors)
        else:
            summary = job.run(args.inputs, args.output, settings_of(args))
    except Unfinished as e:
        return unfinished(e)
    report(summary)
    status = EXIT_FAILURES if summary.failed else EXIT_OK
    return with_parity(args, status, summary.preprocess, summary.resampled,
                       summary.info.get("precision") == "int8")


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_main(validate(args), lambda: run(args), (UsageError,))


if __name__ == "__main__":
    sys.exit(main())
