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
import asyncio
import signal
import socket
import time

from tritonclient.utils import InferenceServerException

from sscd_triton import spec
from sscd_triton.cli._help import DefaultsHelpFormatter
from sscd_triton.client import io as outio
from sscd_triton.client import pipeline, sources, transport
from sscd_triton.cli._main import command, plural, run_main

EXIT_OK, EXIT_FAILURES, EXIT_USAGE, EXIT_UNFINISHED, EXIT_PARITY = 0, 1, 2, 3, 4
EXIT_INTERRUPTED = 130
DEFAULT_BATCH = spec.CLIENT_BATCH  # the gpu repository is sized for it (serving/repository.py)
DEFAULT_URL = "127.0.0.1:8001"
# A server that is not there at start fails the run this fast (a wrong address).
START_TIMEOUT = 5.0
FIRST_FAILURES = 5  # reasons shown at the end of a run
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


class UsageError(Exception):
    pass


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
    problems = []
    for name in ("batch_size", "concurrency", "read_threads", "shard_size", "max_file_bytes",
                 "max_request_bytes"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1")
    if args.ray_actors < 0:
        problems.append("--ray-actors must be >= 0")
    if args.partition_size < 0:
        problems.append("--partition-size must be >= 0")
    if args.give_up_after <= 0 or args.timeout <= 0:
        problems.append("--give-up-after and --timeout must be positive")
    for url in args.url:
        if "://" in url or ":" not in url:
            problems.append(f"--url {url!r}: give HOST:PORT (the gRPC port), e.g. 127.0.0.1:8001")
        elif url.rsplit(":", 1)[1] == "8000":
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


async def describe(endpoints: transport.Endpoints, model: str, headers: dict | None,
                   start_timeout: float = START_TIMEOUT) -> dict:
    """The served model's facts from the first server that answers: dims, max batch,
    input name, preprocessing preset and identity, as far as the server tells them.

    A server that is not there (refused, unknown host, not gRPC, silent) is GiveUp after
    `start_timeout` seconds, naming each address and why: only servers lost mid-run get
    the patient --give-up-after. One that answers, even "not ready", gets that budget."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + min(start_timeout, endpoints.give_up_after)
    heard = False
    # Endpoint notes wait until a server is heard: a failed start is the one error line.
    held: list[str] = []
    say, endpoints.on_change = endpoints.on_change, held.append

    def left() -> float | None:
        if heard:
            return None
        if loop.time() >= deadline:
            raise transport.GiveUp(not_there(endpoints, start_timeout))
        return deadline - loop.time()

    def hear() -> None:
        nonlocal heard
        heard, endpoints.on_change = True, say
        for message in held:
            say(message)
        held.clear()

    try:
        return await _first_facts(endpoints, model, headers, left, hear)
    finally:
        endpoints.on_change = say


async def _first_facts(endpoints, model, headers, left, hear) -> dict:
    """describe's loop: `left()` is the time left to hear a server (None once one was
    heard; raises GiveUp when it is over), `hear()` says one was."""
    while True:
        try:
            ep = await asyncio.wait_for(endpoints.pick(), left())
        except TimeoutError:
            left()  # raises GiveUp
            continue
        try:
            info = await asyncio.wait_for(_model_facts(ep.client, model, headers), left())
        except transport.Fatal:
            hear()
            await endpoints.report(ep, True)
            raise
        except TimeoutError:
            await endpoints.report(ep, False, TimeoutError("no answer"))
            continue
        except (InferenceServerException, OSError) as e:
            if transport.classify(e) == transport.RESTRICTED:
                hear()
                await endpoints.report(ep, True)
                raise transport.restricted(ep.url, e) from None
            if transport.answered(e):
                hear()
            await endpoints.report(ep, False, e)
            continue
        except BaseException:
            endpoints.release(ep)
            raise
        hear()
        await endpoints.report(ep, True)
        return info


def not_there(endpoints: transport.Endpoints, seconds: float) -> str:
    """Why no server could be reached at start, in one line."""
    return f"no server within {seconds:g}s: " + "; ".join(
        f"{e.url} ({e.last_error or 'no answer'})" for e in endpoints.all)


def _parameter(config: dict, key: str) -> str | None:
    value = (config.get("parameters") or {}).get(key) or {}
    return value.get("string_value") or None


async def _model_facts(client, model: str, headers: dict | None) -> dict:
    """Shapes from the model's config (or, when the model-config API is restricted, its
    metadata); identity from the `spec.PARAM_*` parameters the repository writes into
    the configs (None where absent: an older repository, or a restricted API) and the
    served version from the metadata."""
    cfg = None
    try:
        cfg = (await client.get_model_config(model, headers=headers, as_json=True,
                                             client_timeout=10))["config"]
    except Exception as e:  # noqa: BLE001
        # "Request for unknown model: 'x' is not found" is final (a restarting server says
        # "has no available versions" instead, which is retried).
        if transport.status_name(e) == "NOT_FOUND" and "is not found" in str(e):
            raise transport.Fatal(f"the server does not serve model {model!r} "
                                  f"({transport.clean_message(e)})") from None
        if transport.classify(e) == transport.RETRY:
            raise
    md = await client.get_model_metadata(model, headers=headers, as_json=True, client_timeout=10)
    versions = sorted(md.get("versions") or [], key=lambda v: (len(v), v))
    if cfg is not None:
        first = cfg["input"][0]
        info = {"dims": int(cfg["output"][0]["dims"][-1]),
                "max_batch": int(cfg.get("max_batch_size", 0)),
                "input": first["name"], "input_dims": [int(d) for d in first["dims"]]}
    else:  # the model-config API may be restricted: the metadata still gives the shapes
        first = md["inputs"][0]
        info = {"dims": int(md["outputs"][0]["shape"][-1]), "max_batch": 0,
                "input": first["name"], "input_dims": [int(d) for d in first["shape"][1:]]}
    cfg = cfg or {}
    info["version"] = versions[-1] if versions else None
    info["sscd_model"] = _parameter(cfg, spec.PARAM_MODEL_NAME)
    info["weights_sha256"] = _parameter(cfg, spec.PARAM_WEIGHTS_SHA256)
    info["preprocess"] = _parameter(cfg, spec.PARAM_PREPROCESS)
    info["precision"] = _parameter(cfg, spec.PARAM_PRECISION)
    # DALI (the gpu target) decodes and resizes otherwise than PIL: --check-parity then
    # applies the resampled-pipeline bounds (sscd_triton/spec.py).
    # A DALI model behind a dynamic batcher fails other requests' images with a corrupt
    # one: the client then isolates through its one-at-a-time lane (client/transport.py).
    # Assumed when the config cannot be read; this project's gpu repository has none.
    info["resampled"], info["batch_mates"] = False, True
    try:
        pre = (await client.get_model_config(spec.PREPROCESS_MODEL, headers=headers,
                                             as_json=True, client_timeout=10))["config"]
        info["preprocess"] = info["preprocess"] or _parameter(pre, spec.PARAM_PREPROCESS)
        info["resampled"] = pre.get("backend") == "dali"
        info["batch_mates"] = info["resampled"] and "dynamic_batching" in pre
    except Exception:  # noqa: BLE001  (not this repository's layout, or API restricted)
        pass
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


HTTP_HINT = "{url} looks like Triton's HTTP port; gRPC is usually 8001"
_HTTP_SIGNS = ("socket closed", "http/1", "http1", "protocol error")
_speaks_http: dict[str, bool] = {}


def speaks_http(url: str, timeout: float = 0.5) -> bool:
    """Whether HOST:PORT answers a plain HTTP/1 request (asked once per URL)."""
    if url not in _speaks_http:
        host, port = url.rsplit(":", 1)
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout) as sock:
                sock.settimeout(timeout)
                sock.sendall(b"GET /v2/health/live HTTP/1.0\r\nHost: x\r\n\r\n")
                _speaks_http[url] = sock.recv(5) == b"HTTP/"
        except (OSError, ValueError):
            _speaks_http[url] = False
    return _speaks_http[url]


def http_hint(message: str, urls: list[str]) -> str:
    """`message` (about failed requests), plus a hint for a URL named in it that fails the
    way gRPC fails against an HTTP/1 server and that does answer HTTP."""
    if not any(sign in message.lower() for sign in _HTTP_SIGNS):
        return message
    named = [u for u in urls if u in message and speaks_http(u)]
    return message + "".join(f"; {HTTP_HINT.format(url=u)}" for u in named)


def _finish(output, store, complete: bool) -> None:
    """The one cleanup of the output (on a thread: it fsyncs): finalize an .npz that is
    complete, else close the store, recording whether every input was accounted for."""
    try:
        if complete and isinstance(output, outio.NpzOutput):
            output.finalize()
        else:
            store.close(complete=complete)
    except OSError as e:  # disk full, read-only: resumable, not "completed with failures"
        raise outio.WriteError(f"writing the output failed: {e}") from e


async def run(args) -> int:
    started = time.monotonic()
    progress = Progress(args.quiet)
    log = progress.log
    hinted = set()

    def on_change(message: str) -> None:
        shown = http_hint(message, args.url)
        if shown != message:  # the hint once per run is enough
            key = shown[len(message):]
            shown = message if key in hinted else shown
            hinted.add(key)
        log(shown)

    endpoints = transport.Endpoints(args.url, args.give_up_after, on_change=on_change)
    client_side = args.preprocess == "client"
    args.model = args.model or (spec.DESCRIPTOR_MODEL if client_side else spec.ENSEMBLE_NAME)
    output = store = slots = sender = stats = None
    mode = None
    complete = False
    headers = dict(h.split("=", 1) for h in args.header or []) or None
    try:
        try:
            info = await describe(endpoints, args.model, headers)
            mode = resolve_preprocess(args, info)
            batch = args.batch_size or DEFAULT_BATCH
            if info["max_batch"] and batch > info["max_batch"]:
                if args.batch_size:
                    log(f"--batch-size {batch} capped at the model's max_batch_size "
                        f"{info['max_batch']}")
                batch = info["max_batch"]
            meta = {"model": args.model, "model_version": info.get("version"),
                    "sscd_model": info.get("sscd_model"),
                    "weights_sha256": info.get("weights_sha256"), "dims": info["dims"],
                "precision": info.get("precision"),
                    "preprocess": mode.name, "preprocess_on": args.preprocess,
                    "urls": list(args.url)}
            if outio.is_npz(args.output):
                output = outio.NpzOutput(args.output, meta, args.shard_size, args.flush_seconds)
            else:
                partitioned = args.partition_size > 0 and all(
                    sources.is_listing(a) for a in args.inputs)
                output = outio.ShardStore(args.output, meta, args.shard_size, args.flush_seconds,
                                          partitioned=partitioned,
                                          partition_size=args.partition_size)
            try:
                store = await asyncio.to_thread(output.open)
            except OSError as e:
                raise outio.OutputError(str(e)) from None
            if store.embedded or store.failed:
                how = "finished partitions are skipped unread" if store.partitioned else \
                    "their ids are skipped"
                log(f"resuming {args.output}: {store.embedded} embedded and {store.failed} "
                    f"failed by earlier runs are kept ({how})")
            if meta["weights_sha256"] is None:
                log("note: the server does not report its weights fingerprint (an older "
                    "repository, or a restricted model-config API: --header); the output "
                    "records it as unknown")
            opts = pipeline.Options(batch_size=batch, concurrency=args.concurrency,
                                    read_threads=args.read_threads, preprocess=mode,
                                    client_side=client_side, max_file_bytes=args.max_file_bytes,
                                    max_request_bytes=args.max_request_bytes)
            if args.shared_memory == "system":
                slots = transport.ShmSlots(args.concurrency, headers=headers)
            sink = pipeline.Sink(store, progress)
            sender = transport.Sender(endpoints, args.model, info["input"], info["dims"],
                                      sink.result, sink.failure, args.timeout, slots,
                                      headers=headers, batch_mates=info["batch_mates"],
                                      log=log)
            units = pipeline.plan(store, args.inputs, exclude=[store.folder])
            task = asyncio.create_task(pipeline.run(units, sink, sender, opts, progress))
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, task.cancel)
            try:
                stats = await task
            finally:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)
            accounted = store.new_embedded + store.new_failed
            if accounted != stats.inputs:  # the invariant everything above exists for
                raise Unaccounted(f"{stats.inputs} new inputs but {accounted} results")
            complete = True
        finally:  # the one cleanup path, whatever happened above
            progress.close()
            if slots is not None:
                await slots.close(endpoints.all)
            await endpoints.close()
            if store is not None:  # last: a WriteError here still leaves nothing open
                await asyncio.to_thread(_finish, output, store, complete)
    except asyncio.CancelledError:
        print(f"interrupted: {_kept(store, args)}; rerun the same command to resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except transport.GiveUp as e:
        message = http_hint(str(e), args.url)
        if store is None:
            print(f"error: could not start: {message}. Nothing was written; rerun when a "
                  "server is up.", file=sys.stderr)
        else:
            print(f"error: could not finish: {message}.\nEverything finished so far is kept "
                  f"({_kept(store, args)}); rerun the same command to resume.",
                  file=sys.stderr)
        return EXIT_UNFINISHED
    except (outio.WriteError, Unaccounted) as e:
        print(f"error: could not finish: {e}.\nEvery shard written so far is kept "
              f"({_kept(store, args)}); rerun the same command to resume.", file=sys.stderr)
        return EXIT_UNFINISHED
    except (transport.Fatal, outio.OutputError) as e:
        raise UsageError(str(e)) from None
    elapsed = time.monotonic() - started
    new = store.new_embedded + store.new_failed
    print(f"summary: embedded {store.new_embedded}, failed {store.new_failed}"
          f"{by_type(stats.unaccepted)}, skipped "
          f"{stats.skipped} (done before, or named twice), elapsed {elapsed:.1f}s, "
          f"{new / max(elapsed, 1e-9):.1f} images/s "
          f"({plural(sender.requests, 'request')}); {args.output} holds {store.embedded} "
          f"descriptors, {store.failed} failures in {outio.failures_path(args.output)}",
          flush=True)
    end_notes(args.output, store.failed, info.get("sscd_model"))
    status = EXIT_FAILURES if store.failed else EXIT_OK
    return with_parity(args, status, mode, not client_side and info.get("resampled", False),
                       info.get("precision") == "int8")


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


class Unaccounted(Exception):
    """Results and inputs do not add up (a bug): the output is kept as unfinished."""


def _kept(store, args) -> str:
    if store is None:
        return "nothing was written"
    return f"{store.embedded} embedded, {store.failed} failed in {args.output}"


def main(argv=None) -> int:
    args = parse_args(argv)

    def go() -> int:
        if args.ray:
            from sscd_triton.client import ray_embed  # ray is imported only here

            return ray_embed.run(args)
        return asyncio.run(run(args))

    return run_main(validate(args), go, (UsageError,))


if __name__ == "__main__":
    sys.exit(main())
