#!/usr/bin/env python3
"""Embed image collections with SSCD descriptors through Triton, fast, losing nothing.

    python client/embed.py photos/ --url 127.0.0.1:8001 --output runs/photos
    find /data -name '*.jpg' | python client/embed.py - --url h1:8001 --url h2:8001 --output out/
    python client/embed.py @list.txt 'shots/**/*.png' --url 127.0.0.1:8001 --output small.npz

INPUT: files; directories (walked recursively: image extensions, plus files without
one whose first bytes are an image signature); glob patterns; list files (`@list.txt`,
or any existing `.txt`/`.lst` file: one path per line); `-` for paths on stdin.
Inputs are enumerated lazily and de-duplicated; ids are the paths as given.

--output DIR (the form for large collections): numpy shards `embeddings-NNNNN.npy` +
`ids-NNNNN.npy`, a `manifest.json` and `failures.jsonl`. --output OUT.npz: arrays `ids`
and `embeddings`, failures in `OUT.failures.jsonl`. Read either with
`client.io.load_embeddings(path) -> (ids, embeddings)`. Every input ends up exactly once
in the embeddings or in the failures (JSON lines with `id` and `reason`).

Resume: rerun the same command after a crash, kill -9 or exit status 3: completed shards
and failures are kept and only the rest is embedded; the result is the same as that of
an uninterrupted run. Rerunning with new inputs adds them.

Exit status:
  0  every input embedded
  1  the run completed, but some inputs failed (listed with reasons in the failures file)
  2  bad usage: arguments, an output written with another model or preprocessing (or being
     written by another embed.py), a model the server does not serve, an unusable
     --checkpoint
  3  could not finish: no server answered for --give-up-after seconds; everything done so
     far is kept and rerunning the same command resumes
  4  --check-parity: a parity bound failed (takes precedence over 1)
  130 interrupted (Ctrl-C, SIGTERM); resumable like 3
"""
from __future__ import annotations

import os
import sys
import argparse
import asyncio
import signal
import time

from sscd_triton.client import io as outio
from sscd_triton.client import pipeline, sources, transport
from sscd_triton.client.idset import IdSet
from tritonclient.utils import InferenceServerException
from sscd_triton import spec

EXIT_OK, EXIT_FAILURES, EXIT_USAGE, EXIT_UNFINISHED, EXIT_PARITY = 0, 1, 2, 3, 4
EXIT_INTERRUPTED = 130
DEFAULT_BATCH = 16
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


class UsageError(Exception):
    pass


def parse_args(argv=None) -> argparse.Namespace:
    doc = __doc__.split("\n\n")
    p = argparse.ArgumentParser(
        prog="embed.py", description=doc[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(doc[2:]))
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="files, folders, glob patterns, @list files, or - for stdin")
    p.add_argument("--url", action="append", required=True, metavar="HOST:PORT",
                   help="Triton gRPC endpoint; repeat to spread requests over servers")
    p.add_argument("--output", required=True, help="a folder (sharded) or a file name ending .npz")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per request (default 16; capped at the model's max_batch_size)")
    p.add_argument("--concurrency", type=int, default=8,
                   help="requests in flight, all servers together")
    p.add_argument("--read-threads", type=int, default=8,
                   help="threads reading (and decoding) files")
    p.add_argument("--preprocess", choices=("server", "client"), default="server",
                   help="server: send file bytes to the ensemble; client: decode and "
                        "preprocess here and send float32 tensors to the descriptor model")
    p.add_argument("--preprocess-mode", choices=sorted(spec.PREPROCESS),
                   help="preprocessing preset; must match the server's (default: the one the "
                        "server reports, else square320)")
    p.add_argument("--shared-memory", choices=("none", "system"), default="none",
                   help="system: pass tensors through /dev/shm (servers on this host only)")
    p.add_argument("--header", action="append", default=[], metavar="NAME=VALUE",
                   help="gRPC header sent with every call, e.g. the key of a server started "
                        "with --grpc-restricted-protocol=...:KEY=VALUE, which expects header "
                        "triton-grpc-protocol-KEY (docker/entrypoint.sh restricts shared-memory "
                        "and model-config: --header "
                        "triton-grpc-protocol-sscd-admin-key=$SSCD_ADMIN_KEY)")
    p.add_argument("--model", help="model to call (default: 'sscd', or 'sscd_descriptor' "
                                    "with --preprocess client)")
    p.add_argument("--give-up-after", type=float, default=120.0, metavar="SECONDS",
                   help="stop (exit 3) when no server has answered for this long")
    p.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS",
                   help="deadline of one request")
    p.add_argument("--shard-size", type=int, default=10000, help="descriptors per shard file")
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
    return p.parse_args(argv)


def validate(args) -> list[str]:
    problems = []
    for name in ("batch_size", "concurrency", "read_threads", "shard_size", "max_file_bytes",
                 "max_request_bytes"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1")
    if args.give_up_after <= 0 or args.timeout <= 0:
        problems.append("--give-up-after and --timeout must be positive")
    for url in args.url:
        if "://" in url or ":" not in url:
            problems.append(f"--url {url!r}: give HOST:PORT (the gRPC port), e.g. 127.0.0.1:8001")
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


class Progress:
    """A tqdm bar (images/s, ETA once the total is known, failures), or with --quiet
    plain log lines every 10 s."""

    def __init__(self, quiet: bool, every: float = 10.0):
        self.quiet = quiet
        self.embedded = self.failed = 0
        self.total = None
        self.start = time.monotonic()
        self._every, self._last = every, self.start
        self.bar = None
        if not quiet:
            from tqdm import tqdm

            self.bar = tqdm(total=None, unit="img", desc="embedding", file=sys.stderr,
                            mininterval=0.5, smoothing=0.05, dynamic_ncols=True)

    def update(self, embedded: int, failed: int) -> None:
        self.embedded += embedded
        self.failed += failed
        if self.bar is not None:
            if failed:
                self.bar.set_postfix_str(f"failed={self.failed}", refresh=False)
            self.bar.update(embedded + failed)
        elif time.monotonic() - self._last >= self._every:
            self._last = time.monotonic()
            self.log(self.line())

    def line(self) -> str:
        done = self.embedded + self.failed
        rate = done / max(time.monotonic() - self.start, 1e-9)
        of = f" of {self.total}" if self.total is not None else ""
        eta = ""
        if self.total is not None and rate > 0:
            eta = f", ETA {max(self.total - done, 0) / rate:.0f}s"
        return (f"{done}{of} done ({self.embedded} embedded, {self.failed} failed), "
                f"{rate:.1f} images/s{eta}")

    def set_total(self, total: int) -> None:
        self.total = total
        if self.bar is not None:
            self.bar.total = total
            self.bar.refresh()

    def log(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(f"[embed] {message}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


async def describe(endpoints: transport.Endpoints, model: str, headers: dict | None) -> dict:
    """The served model's facts from the first server that answers: dims, max batch,
    input name, and the repository's preprocessing preset when it can be read."""
    while True:
        ep = await endpoints.pick()
        try:
            info = await _model_facts(ep.client, model, headers)
        except transport.Fatal:
            await endpoints.report(ep, True)
            raise
        except (InferenceServerException, OSError) as e:
            if transport.classify(e) == transport.RESTRICTED:
                await endpoints.report(ep, True)
                raise transport.restricted(ep.url, e) from None
            await endpoints.report(ep, False, e)
            continue
        except BaseException:
            endpoints.release(ep)
            raise
        await endpoints.report(ep, True)
        return info


async def _model_facts(client, model: str, headers: dict | None) -> dict:
    try:
        cfg = (await client.get_model_config(model, headers=headers, as_json=True,
                                             client_timeout=10))["config"]
        first = cfg["input"][0]
        info = {"dims": int(cfg["output"][0]["dims"][-1]),
                "max_batch": int(cfg.get("max_batch_size", 0)),
                "input": first["name"], "input_dims": [int(d) for d in first["dims"]]}
    except Exception as e:  # noqa: BLE001
        if transport.classify(e) == transport.RETRY:
            raise
        if transport.status_name(e) == "NOT_FOUND":
            raise transport.Fatal(f"the server does not serve model {model!r} "
                                  f"({transport.clean_message(e)})") from None
        # the model-config API may be restricted: the metadata still gives names and shapes
        md = await client.get_model_metadata(model, headers=headers, as_json=True,
                                             client_timeout=10)
        first = md["inputs"][0]
        info = {"dims": int(md["outputs"][0]["shape"][-1]), "max_batch": 0,
                "input": first["name"], "input_dims": [int(d) for d in first["shape"][1:]]}
    try:
        pre = await client.get_model_config(spec.PREPROCESS_MODEL, headers=headers, as_json=True,
                                            client_timeout=10)
        info["preprocess"] = pre["config"]["parameters"]["preprocess"]["string_value"]
    except Exception:  # noqa: BLE001  (not this repository's layout, or API restricted)
        info["preprocess"] = None
    return info


def resolve_preprocess(args, info: dict) -> spec.Preprocess:
    served = info.get("preprocess")
    if args.preprocess_mode and served in spec.PREPROCESS and served != args.preprocess_mode:
        raise UsageError(f"--preprocess-mode {args.preprocess_mode}, but the server preprocesses "
                         f"with {served}: descriptors would not match; drop the flag or use "
                         f"{served}")
    mode = spec.PREPROCESS[args.preprocess_mode or (served if served in spec.PREPROCESS else
                                                    spec.DEFAULT_PREPROCESS)]
    dims = info.get("input_dims") or []
    if args.preprocess == "client" and len(dims) == 3 and dims[1] > 0 and (
            not mode.square or dims[1] != mode.size):
        raise UsageError(f"model {args.model} takes fixed {dims[1]}x{dims[2]} tensors; "
                         f"--preprocess-mode {mode.name} does not make those")
    return mode


async def run(args) -> int:
    started = time.monotonic()
    progress = Progress(args.quiet)
    log = progress.log
    endpoints = transport.Endpoints(args.url, args.give_up_after, on_change=log)
    client_side = args.preprocess == "client"
    args.model = args.model or (spec.DESCRIPTOR_MODEL if client_side else spec.ENSEMBLE_NAME)
    store = output = slots = None
    headers = dict(h.split("=", 1) for h in args.header) or None
    try:
        try:
            info = await describe(endpoints, args.model, headers)
        except transport.GiveUp as e:
            progress.close()
            print(f"error: could not start: {e}. Nothing was written; rerun when a server is "
                  "up.", file=sys.stderr)
            return EXIT_UNFINISHED
        except transport.Fatal as e:
            raise UsageError(str(e)) from None
        mode = resolve_preprocess(args, info)
        batch = args.batch_size or DEFAULT_BATCH
        if info["max_batch"] and batch > info["max_batch"]:
            if args.batch_size:
                log(f"--batch-size {batch} capped at the model's max_batch_size "
                    f"{info['max_batch']}")
            batch = info["max_batch"]
        meta = {"model": args.model, "dims": info["dims"], "preprocess": mode.name,
                "preprocess_on": args.preprocess, "urls": list(args.url)}
        if outio.is_npz(args.output):
            output = outio.NpzOutput(args.output, meta, args.shard_size, args.flush_seconds)
        else:
            output = outio.ShardStore(args.output, meta, args.shard_size, args.flush_seconds)
        try:
            store = output.open()
        except (outio.OutputError, OSError) as e:
            raise UsageError(str(e)) from None
        seen = IdSet()
        for ids in store.done_ids():
            seen.add_new(ids)
        if store.embedded or store.failed:
            log(f"resuming {args.output}: {store.embedded} embedded and {store.failed} failed "
                "by earlier runs are kept")
        opts = pipeline.Options(batch_size=batch, concurrency=args.concurrency,
                                read_threads=args.read_threads, preprocess=mode,
                                client_side=client_side, max_file_bytes=args.max_file_bytes,
                                max_request_bytes=args.max_request_bytes)
        if args.shared_memory == "system":
            slots = transport.ShmSlots(args.concurrency, headers=headers)
        sink = pipeline.Sink(store, progress)
        sender = transport.Sender(endpoints, args.model, info["input"], info["dims"],
                                  sink.result, sink.failure, args.timeout, slots,
                                  headers=headers)
        inputs = sources.iter_inputs(args.inputs, exclude=[store.folder])
        task = asyncio.create_task(pipeline.run(inputs, seen, sink, sender, opts, progress))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        try:
            try:
                stats = await task
            finally:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)
        except asyncio.CancelledError:
            progress.close()
            store.close(complete=False)
            print(f"interrupted: {store.embedded} embedded and {store.failed} failed so far are "
                  "kept; rerun the same command to resume", file=sys.stderr)
            return EXIT_INTERRUPTED
        except transport.GiveUp as e:
            progress.close()
            store.close(complete=False)
            print(f"error: could not finish: {e}.\nEverything finished so far is kept "
                  f"({store.embedded} embedded, {store.failed} failed in {args.output}); rerun "
                  "the same command to resume.", file=sys.stderr)
            return EXIT_UNFINISHED
        except transport.Fatal as e:
            progress.close()
            store.close(complete=False)
            raise UsageError(str(e)) from None
        except Exception:  # a bug or an unreadable stdin: keep what is done, then report
            progress.close()
            store.close(complete=False)
            raise
        progress.close()
        accounted = store.new_embedded + store.new_failed
        if accounted != stats.inputs:  # the invariant everything above exists for
            store.close(complete=False)
            print(f"internal error: {stats.inputs} new inputs but {accounted} results; the "
                  "output is kept as unfinished, rerun to complete it", file=sys.stderr)
            return EXIT_UNFINISHED
        if isinstance(output, outio.NpzOutput):
            output.finalize()
        else:
            store.close(complete=True)
        elapsed = time.monotonic() - started
        new = store.new_embedded + store.new_failed
        print(f"summary: embedded {store.new_embedded}, failed {store.new_failed}, skipped "
              f"{stats.skipped} (done before, or named twice), elapsed {elapsed:.1f}s, "
              f"{new / max(elapsed, 1e-9):.1f} images/s "
              f"({sender.requests} requests); {args.output} holds {store.embedded} descriptors, "
              f"{store.failed} failures in {outio.failures_path(args.output)}", flush=True)
        status = EXIT_FAILURES if store.failed else EXIT_OK
    finally:
        progress.close()
        if slots is not None:
            await slots.close(endpoints.all)
        await endpoints.close()
    if args.check_parity:
        from sscd_triton.client import parity_check

        try:
            ok = parity_check.check(args.output, args.check_parity, args.checkpoint, mode,
                                    args.max_file_bytes, args.seed)
        except parity_check.ParityUsageError as e:
            raise UsageError(str(e)) from None
        if not ok:
            return EXIT_PARITY
    return status


def main(argv=None) -> int:
    args = parse_args(argv)
    problems = validate(args)
    if problems:
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return asyncio.run(run(args))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
