"""An embedding job: inputs (files, folders, globs, listings) -> an output that holds
every input exactly once, as a descriptor or as a failure with its reason.

    summary = job.run(["photos/"], "runs/photos", job.Settings(urls=["127.0.0.1:8001"]))

This is the engine of `sscd-embed` (and of `Client.embed_files`): it asks the server what
it serves (`model_info.describe`), opens the output (`io.ShardStore`: Parquet shards, or
`io.NpzOutput`), resumes what an earlier run left, and runs the pipeline
(`pipeline.run`: read, batch, send, isolate bad files). It returns a `Summary` or raises
the errors of `client.exceptions`: UsageError (the output was written by another model,
the server does not serve the model, ...), ServerUnavailable (no server within
`START_TIMEOUT` s at start, or for `give_up_after` s later; ServerOverloaded or
RequestTimeout when it was a full queue or the request timeout), OutputUnwritable, and
Interrupted (SIGINT/SIGTERM while `handle_signals`); on each of the last three what is
finished is kept and the same call resumes.
"""
from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from sscd_triton import spec
from sscd_triton.client import io as outio
from sscd_triton.client import model_info, pipeline, sources, transport
from sscd_triton.client.exceptions import (Interrupted, OutputUnwritable, RequestTimeout,
                                           ServerOverloaded, ServerUnavailable, UsageError)
from sscd_triton.client.progress import Progress


@dataclass
class Settings:
    """How to embed; every field is the `sscd-embed` flag of the same name."""

    urls: list[str] = field(default_factory=lambda: ["127.0.0.1:8001"])
    batch_size: int | None = None  # None: spec.CLIENT_BATCH, capped at max_batch_size
    concurrency: int = 8
    read_threads: int = 8
    preprocess: str = "server"  # "server" (file bytes to the ensemble) or "client"
    preprocess_mode: str | None = None  # None: the server's preset
    shared_memory: str = "none"  # or "system"
    headers: dict[str, str] | None = None
    model: str | None = None  # None: model_info.default_model
    give_up_after: float = 120.0
    timeout: float = 300.0
    shard_size: int = 10000
    partition_size: int = 100_000
    flush_seconds: float = 60.0
    max_file_bytes: int = 64 << 20
    max_request_bytes: int = 64 << 20
    quiet: bool = True  # plain log lines instead of a progress bar

    def problems(self, flags: bool = True) -> list[str]:
        """What is wrong with these settings, one line each, naming each setting as
        sscd-embed's flag (`flags`) or as this class's field."""
        def name(key: str) -> str:
            return f"--{key.replace('_', '-')}" if flags else key

        out = []
        for key in ("batch_size", "concurrency", "read_threads", "shard_size",
                    "max_file_bytes", "max_request_bytes"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or value < 1):
                out.append(f"{name(key)} must be >= 1")
        if not isinstance(self.partition_size, int) or self.partition_size < 0:
            out.append(f"{name('partition_size')} must be >= 0")
        if not (_positive(self.give_up_after) and _positive(self.timeout)):
            out.append(f"{name('give_up_after')} and {name('timeout')} must be positive")
        if self.preprocess not in ("server", "client"):
            out.append(f"{name('preprocess')}: server or client, not {self.preprocess!r}")
        if self.shared_memory not in ("none", "system"):
            out.append(f"{name('shared_memory')}: none or system, not {self.shared_memory!r}")
        if not self.urls:
            out.append(f"{name('urls' if not flags else 'url')}: give at least one HOST:PORT")
        for url in self.urls:
            if not isinstance(url, str) or "://" in url or ":" not in url:
                out.append(f"{'--url' if flags else 'url'} {url!r}: give HOST:PORT (the gRPC "
                           "port), e.g. 127.0.0.1:8001")
        return out

    @property
    def client_side(self) -> bool:
        return self.preprocess == "client"

    @property
    def model_name(self) -> str:
        return self.model or model_info.default_model(self.client_side)


@dataclass
class Summary:
    """What a finished job did. `new_*`: this call; `embedded`/`failed`: the whole output."""

    output: str
    new_embedded: int
    new_failed: int
    embedded: int
    failed: int
    skipped: int  # done by an earlier call, or named twice
    unaccepted: Counter  # new inputs of a type not accepted, by type
    elapsed: float
    info: dict  # the served model's facts (model_info.describe)
    preprocess: spec.Preprocess
    requests: int | None = None  # gRPC requests sent (None on Ray)
    partitions: int | None = None  # on Ray: partitions embedded, by
    actors: int | None = None  # this many actors
    preprocess_on: str = "server"  # Settings.preprocess

    @property
    def resampled(self) -> bool:
        """The server decodes and resizes otherwise than PIL (DALI; spec's bounds)."""
        return self.preprocess_on == "server" and bool(self.info.get("resampled"))


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and value > 0


def kept(store, output: str) -> str:
    """What an unfinished job left in `output`, for its error message."""
    if store is None:
        return "nothing was written"
    return f"{store.embedded} embedded, {store.failed} failed in {output}"


def output_meta(settings: Settings, info: dict, mode: spec.Preprocess) -> dict:
    """The identity every shard and the manifest record (io.identity compares it)."""
    return {"model": settings.model_name, "model_version": info.get("version"),
            "sscd_model": info.get("sscd_model"),
            "weights_sha256": info.get("weights_sha256"), "dims": info["dims"],
            "precision": info.get("precision"),
            "preprocess": mode.name, "preprocess_on": settings.preprocess,
            "urls": list(settings.urls)}


def run(inputs: list[str], output: str, settings: Settings | None = None,
        progress=None, handle_signals: bool = True) -> Summary:
    """`embed_files` from synchronous code (runs its own event loop, so SIGINT/SIGTERM
    are the job's to handle by default). The same job on Ray Data is `ray_embed.run`."""
    return asyncio.run(embed_files(inputs, output, settings, progress, handle_signals))


async def embed_files(inputs: list[str], output: str, settings: Settings | None = None,
                      progress=None, handle_signals: bool = False) -> Summary:
    """Embed every input into `output` (a folder: Parquet shards; a name ending .npz: one
    file), resuming what is there. `progress`: a progress.Progress-like object (update,
    set_total, log, close); by default one that follows `settings.quiet`.
    `handle_signals`: SIGINT/SIGTERM stop the job cleanly (Interrupted) where the loop
    can take them (the main thread); off, the loop's signals stay the caller's."""
    settings = settings or Settings()
    started = time.monotonic()
    progress = progress or Progress(settings.quiet)
    log = progress.log
    hinted = set()

    def on_change(message: str) -> None:
        shown = model_info.http_hint(message, settings.urls)
        if shown != message:  # the hint once per run is enough
            key = shown[len(message):]
            shown = message if key in hinted else shown
            hinted.add(key)
        log(shown)

    endpoints = transport.Endpoints(settings.urls, settings.give_up_after, on_change=on_change)
    model = settings.model_name
    store = slots = sender = stats = None
    complete = signalled = False
    headers = settings.headers or None
    current, work = asyncio.current_task(), None

    def stop() -> None:  # the pipeline once it runs (it stops cleanly), else this job
        nonlocal signalled
        signalled = True
        (work or current).cancel()

    with _signals(stop if handle_signals else None):
        try:
            try:
                info = await model_info.describe(endpoints, model, headers)
                mode = model_info.resolve_preprocess(info, model, settings.preprocess_mode,
                                                     settings.client_side)
                batch = model_info.batch_size(info, settings.batch_size, log)
                meta = output_meta(settings, info, mode)
                out = open_output(inputs, output, meta, settings)
                try:
                    store = await asyncio.to_thread(out.open)
                except OSError as e:
                    raise outio.OutputError(str(e)) from None
                if store.embedded or store.failed:
                    how = "finished partitions are skipped unread" if store.partitioned else \
                        "their ids are skipped"
                    log(f"resuming {output}: {store.embedded} embedded and {store.failed} "
                        f"failed by earlier runs are kept ({how})")
                if meta["weights_sha256"] is None:
                    log("note: the server does not report its weights fingerprint (an older "
                        "repository, or a restricted model-config API: --header); the output "
                        "records it as unknown")
                opts = pipeline.Options(batch_size=batch, concurrency=settings.concurrency,
                                        read_threads=settings.read_threads, preprocess=mode,
                                        client_side=settings.client_side,
                                        max_file_bytes=settings.max_file_bytes,
                                        max_request_bytes=settings.max_request_bytes)
                if settings.shared_memory == "system":
                    slots = transport.ShmSlots(settings.concurrency, headers=headers)
                sink = pipeline.Sink(store, progress)
                sender = transport.Sender(endpoints, model, info["input"], info["dims"],
                                          sink.result, sink.failure, settings.timeout, slots,
                                          headers=headers, batch_mates=info["batch_mates"],
                                          log=log)
                units = pipeline.plan(store, inputs, exclude=[store.folder])
                work = asyncio.create_task(pipeline.run(units, sink, sender, opts, progress))
                stats = await work
                accounted = store.new_embedded + store.new_failed
                if accounted != stats.inputs:  # the invariant everything above exists for
                    raise OutputUnwritable(f"{stats.inputs} new inputs but {accounted} results",
                                           kept(store, output))
                complete = True
            finally:  # the one cleanup path, whatever happened above
                progress.close()
                if slots is not None:
                    await slots.close(endpoints.all)
                await endpoints.close()
                if store is not None:  # last: a WriteError here still leaves nothing open
                    await asyncio.to_thread(_finish, out, store, complete)
        except asyncio.CancelledError:
            if not signalled:
                raise
            if work is None:  # this task was cancelled: its cancellation is handled here
                current.uncancel()
            raise Interrupted("interrupted", kept(store, output), store is not None) from None
        except transport.GiveUp as e:
            raise unavailable(e)(model_info.http_hint(str(e), settings.urls),
                                 kept(store, output), store is not None) from None
        except outio.WriteError as e:
            raise OutputUnwritable(str(e), kept(store, output)) from None
        except OutputUnwritable as e:
            e.kept = kept(store, output)
            raise
        except (transport.Fatal, outio.OutputError) as e:
            raise UsageError(str(e)) from None
    return Summary(output=output, new_embedded=store.new_embedded, new_failed=store.new_failed,
                   embedded=store.embedded, failed=store.failed, skipped=stats.skipped,
                   unaccepted=stats.unaccepted, elapsed=time.monotonic() - started, info=info,
                   preprocess=mode, requests=sender.requests,
                   preprocess_on=settings.preprocess)


def unavailable(e: transport.GiveUp) -> type[ServerUnavailable]:
    """The ServerUnavailable kind a GiveUp of the transport means (same message and exit
    status whichever: sscd-embed maps them all to exit 3)."""
    if isinstance(e, transport.Overloaded):
        return ServerOverloaded
    if isinstance(e, transport.TimedOut):
        return RequestTimeout
    return ServerUnavailable


def open_output(inputs: list[str], output: str, meta: dict, settings: Settings):
    """The output to open: an .npz, or a folder of shards, partitioned when every input
    is a listing (list files, stdin) and partitions are on."""
    if outio.is_npz(output):
        return outio.NpzOutput(output, meta, settings.shard_size, settings.flush_seconds)
    partitioned = settings.partition_size > 0 and all(sources.is_listing(a) for a in inputs)
    return outio.ShardStore(output, meta, settings.shard_size, settings.flush_seconds,
                            partitioned=partitioned, partition_size=settings.partition_size)


class _signals:
    """SIGINT and SIGTERM call `stop` while inside (where the loop can take them)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, stop: Callable[[], None] | None):
        self.stop = stop
        self.installed = {}  # signal -> the handler it had before

    def __enter__(self):
        if self.stop is None:
            return self
        loop = asyncio.get_running_loop()
        for sig in self.SIGNALS:
            previous = signal.getsignal(sig)
            try:
                loop.add_signal_handler(sig, self.stop)
            except (RuntimeError, ValueError):  # not the main thread: the caller's signals
                break
            self.installed[sig] = previous
        return self

    def __exit__(self, *exc):
        loop = asyncio.get_running_loop()
        for sig, previous in self.installed.items():
            loop.remove_signal_handler(sig)  # resets to the default: give back the caller's
            if previous is not None:
                signal.signal(sig, previous)
        return False


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
