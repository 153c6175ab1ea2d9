"""The Python API: SSCD descriptors from a Triton server, as numpy arrays or a job output.

    from sscd_triton import Client, BadImage
    with Client("127.0.0.1:8001") as client:       # or Client(["h1:8001", "h2:8001"])
        emb = client.embed(["a.jpg", b"<encoded bytes>", pil_image])  # float32 [3, dims]
        summary = client.embed_files(["photos/"], output="runs/photos")

    async with AsyncClient("127.0.0.1:8001") as client:
        emb = await client.embed(items)

The engine is sscd-embed's: `model_info.describe` asks the server what it serves, items
become requests as in `pipeline` (`items.load`, `pipeline.make_batches`), and the
`transport.Sender` sends them across the endpoints in rotation with at most
`concurrency` requests in flight, retrying, and isolating bad images by splitting
rejected batches without re-sending the good ones. `embed_files` is `job.embed_files`
(same Parquet layout, resume, failures and manifest as sscd-embed).

Errors (client.exceptions): BadImage (per-item; after the good ones were embedded),
UsageError (a model the server does not serve, a bad setting), ServerUnavailable (no
server within `model_info.START_TIMEOUT` s at start, or for `give_up_after` s later),
ServerOverloaded (the queue stayed full), RequestTimeout (every try ran past `timeout`).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import os
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Sequence

import numpy as np

from sscd_triton.client import items as _items
from sscd_triton.client import job, model_info, pipeline, sources, transport
from sscd_triton.client.exceptions import BadImage, UsageError
from sscd_triton.client.items import ImageInput
from sscd_triton.client.progress import CallbackProgress, ProgressCallback

log = logging.getLogger("sscd_triton.client")

@dataclass(frozen=True)
class ModelInfo:
    """The served model, from the server's configs (None where the server does not say)."""

    model: str  # the Triton model called: the ensemble, or the descriptor model
    version: str | None  # the served version
    sscd_model: str | None  # the SSCD checkpoint's name
    weights_sha256: str | None  # the weights' fingerprint
    preprocess: str  # the preprocessing preset in use (spec.PREPROCESS)
    precision: str | None  # fp32, fp16, int8
    dims: int  # descriptor length
    max_batch: int  # the model's max_batch_size (0: none stated)


class AsyncClient:
    """Embeds images through one or more Triton servers, from asyncio code.

    Keywords are sscd-embed's flags (`job.Settings` fields): `model` (None: the ensemble,
    or the descriptor model with `preprocess="client"`), `preprocess` ("server": encoded
    bytes to the ensemble; "client": decoded and preprocessed here with
    `sscd_triton.images`, float32 tensors to the descriptor model), `preprocess_mode`
    (None: the server's preset), `batch_size` (None: spec.CLIENT_BATCH, capped at the
    model's max_batch_size), `concurrency` (requests in flight), `timeout` (seconds per
    request), `give_up_after` (seconds without any answer before ServerUnavailable),
    `headers` (sent with every request), `read_threads`, `max_file_bytes`.

    The model's facts are fetched on first use (or `await connect()`, `async with`). The
    client belongs to the event loop it is first used on; `aclose()` closes its gRPC
    channels.
    """

    def __init__(self, url: str | Sequence[str] = "127.0.0.1:8001", *, model: str | None = None,
                 preprocess: Literal["server", "client"] = "server",
                 preprocess_mode: str | None = None, batch_size: int | None = None,
                 concurrency: int = 8, timeout: float = 300.0, give_up_after: float = 120.0,
                 headers: dict[str, str] | None = None, read_threads: int = 8,
                 max_file_bytes: int = 64 << 20):
        urls = [url] if isinstance(url, str) else list(url)
        self.settings = job.Settings(
            urls=urls, model=model, preprocess=preprocess, preprocess_mode=preprocess_mode,
            batch_size=batch_size, concurrency=concurrency, timeout=timeout,
            give_up_after=give_up_after, headers=dict(headers) if headers else None,
            read_threads=read_threads, max_file_bytes=max_file_bytes)
        problems = self.settings.problems(flags=False)
        if problems:
            raise UsageError("; ".join(problems))
        self.last_errors: dict[int, str] = {}  # index -> reason, for the last embed call
        self._info: ModelInfo | None = None
        self._facts: dict = {}
        self._batch = 0
        self._mode = None
        self._endpoints: transport.Endpoints | None = None
        self._lock: asyncio.Lock | None = None
        self._slots: asyncio.Semaphore | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(read_threads,
                                                           thread_name_prefix="sscd-read")
        self._closed = False

    # --- the model -------------------------------------------------------------------
    async def connect(self) -> ModelInfo:
        """Ask the server what it serves (once). ServerUnavailable when no server answers
        within model_info.START_TIMEOUT s; UsageError when it does not serve the model or
        its preprocessing does not fit the settings."""
        if self._closed:
            raise UsageError("the client is closed")
        if self._info is None:
            self._lock = self._lock or asyncio.Lock()
            async with self._lock:
                if self._info is None:
                    await self._describe()
        return self._info

    async def _describe(self) -> None:
        s = self.settings
        if self._endpoints is None:
            self._endpoints = transport.Endpoints(s.urls, s.give_up_after, on_change=log.info)
        try:
            facts = await model_info.describe(self._endpoints, s.model_name, s.headers)
        except (transport.GiveUp, transport.Fatal) as e:
            raise typed(e, s.urls, started=False) from None
        self._mode = model_info.resolve_preprocess(facts, s.model_name, s.preprocess_mode,
                                                   s.client_side)
        self._batch = model_info.batch_size(facts, s.batch_size, log.info)
        self._slots = asyncio.Semaphore(s.concurrency)
        self._facts = facts
        self._info = ModelInfo(model=s.model_name, version=facts.get("version"),
                               sscd_model=facts.get("sscd_model"),
                               weights_sha256=facts.get("weights_sha256"),
                               preprocess=self._mode.name, precision=facts.get("precision"),
                               dims=int(facts["dims"]), max_batch=int(facts["max_batch"]))

    @property
    def model_info(self) -> ModelInfo:
        """The served model's facts; after `connect()` (or `async with`, or a first call)."""
        if self._info is None:
            raise UsageError("the model is not known yet: await client.connect() first")
        return self._info

    @property
    def dims(self) -> int:
        """Descriptor length (after `connect()`)."""
        return self.model_info.dims

    # --- embedding -------------------------------------------------------------------
    async def embed(self, items: Iterable[ImageInput],
                    errors: Literal["raise", "nan"] = "raise") -> np.ndarray:
        """Descriptors of `items`: float32 [n, dims], L2-normalised, row i for items[i].

        An item is a path (str or os.PathLike; read with sscd-embed's reader: regular
        files only, at most `max_file_bytes`), encoded image bytes, a PIL image, or a
        uint8 numpy array (RGB [H, W, 3], or grayscale [H, W]); images and arrays are
        encoded losslessly (PNG) here, so the server decodes exactly their pixels.
        Requests are batched and pipelined (at most `concurrency` in flight).

        A bad item (unreadable, not an image, rejected by the server) never stops the
        others: with errors="raise" (default) BadImage is raised once every good item was
        embedded (.index and .reason: the first bad item; .errors: {index: reason};
        .embeddings: the [n, dims] array with NaN rows for the bad ones). errors="nan"
        returns that array instead. Either way `last_errors` holds {index: reason}.

        Raises TypeError for an item of another type (before anything is sent),
        UsageError, ServerUnavailable, ServerOverloaded, RequestTimeout (see the module).
        """
        if errors not in ("raise", "nan"):
            raise UsageError(f"errors: 'raise' or 'nan', not {errors!r}")
        self.last_errors = {}  # a call that raises leaves no errors of an earlier one
        inputs = _items.check_items(items)
        info = await self.connect()
        out = np.full((len(inputs), info.dims), np.nan, np.float32)
        failed: dict[int, str] = {}

        def on_result(ids: list, emb: np.ndarray) -> None:
            out[list(ids)] = emb

        s = self.settings
        sender = transport.Sender(self._endpoints, s.model_name, self._facts["input"],
                                  info.dims, on_result, failed.__setitem__, s.timeout,
                                  headers=s.headers, batch_mates=self._facts["batch_mates"],
                                  log=log.info)
        try:
            await self._send_all(inputs, sender, failed)
        except (transport.GiveUp, transport.Fatal) as e:
            raise typed(e, s.urls) from None
        self.last_errors = dict(sorted(failed.items()))
        if failed and errors == "raise":
            raise BadImage(self.last_errors, out)
        return out

    def _options(self) -> pipeline.Options:
        s = self.settings
        return pipeline.Options(batch_size=self._batch, concurrency=s.concurrency,
                                read_threads=s.read_threads, preprocess=self._mode,
                                client_side=s.client_side, max_file_bytes=s.max_file_bytes,
                                max_request_bytes=s.max_request_bytes)

    async def _send_all(self, inputs: list, sender: transport.Sender,
                        failed: dict[int, str]) -> None:
        """Load the items a chunk at a time on the read pool (the next chunk while the
        previous one's requests are in flight), batch them, send within the bound."""
        loop = asyncio.get_running_loop()
        opts = self._options()
        ep = self._endpoints
        ep.last_answer = max(ep.last_answer, loop.time())  # give_up_after counts from now
        chunk = max(64, 4 * self._batch)
        try:
            async with asyncio.TaskGroup() as tg:
                for start in range(0, len(inputs), chunk):
                    indices = range(start, min(len(inputs), start + chunk))
                    loaded = await asyncio.gather(*(loop.run_in_executor(
                        self._pool, _items.load, i, inputs[i], opts) for i in indices))
                    ready = []
                    for i, x in zip(indices, loaded):
                        if isinstance(x, str):
                            failed[i] = x
                        else:
                            ready.append(x)
                    for batch in pipeline.make_batches(ready, opts):
                        await self._slots.acquire()
                        task = tg.create_task(sender.send(batch))
                        task.add_done_callback(lambda _: self._slots.release())
        except BaseExceptionGroup as group:
            raise pipeline._first(group) from None

    async def embed_files(self, inputs: str | os.PathLike | Iterable[str | os.PathLike],
                          output: str | os.PathLike, progress: ProgressCallback | None = None,
                          **overrides: Any) -> job.Summary:
        """Embed files, folders, globs or list files (sscd-embed's inputs) into `output`
        (a folder of Parquet shards, or a name ending .npz), resuming what is there: the
        same layout, failures and manifest as sscd-embed, read by
        `sscd_triton.load_embeddings`. Returns job.Summary.

        `progress(embedded, failed, total)`: called as results come (counts of this call;
        total None until every input was enumerated). `overrides`: other job.Settings
        fields for this call (shard_size, partition_size, shared_memory, ...).
        Raises UsageError (missing inputs, a bad setting, an output written by another
        model, ...), ServerUnavailable and its kinds, OutputUnwritable; on those what is
        finished is kept and the same call resumes (also after a cancellation: the
        loop's signals stay the caller's)."""
        return await self._embed_files(inputs, output, progress, overrides)

    async def _embed_files(self, inputs, output, progress, overrides: dict) -> job.Summary:
        if self._closed:
            raise UsageError("the client is closed")
        try:
            settings = dataclasses.replace(self.settings, **overrides)
        except TypeError as e:  # a keyword that is no setting
            raise UsageError(f"embed_files: {e}") from None
        names = ([os.fspath(inputs)] if isinstance(inputs, (str, os.PathLike))
                 else [os.fspath(i) for i in inputs])
        problems = ((["no inputs"] if not names else []) + settings.problems(flags=False)
                    + sources.check_args(names))
        if problems:
            raise UsageError("; ".join(problems))
        return await job.embed_files(names, os.fspath(output), settings,
                                     CallbackProgress(progress, log.info))

    # --- closing ---------------------------------------------------------------------
    async def aclose(self) -> None:
        """Close the gRPC channels and the read threads (idempotent)."""
        self._closed = True
        if self._endpoints is not None:
            endpoints, self._endpoints = self._endpoints, None
            await endpoints.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def __aenter__(self) -> "AsyncClient":
        try:
            await self.connect()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()


def typed(e: BaseException, urls: list[str], started: bool = True) -> Exception:
    """The client.exceptions error a transport error means."""
    if isinstance(e, transport.Fatal):
        return UsageError(str(e))
    kind = job.unavailable(e)
    return kind(model_info.http_hint(str(e), urls), "nothing is kept (embed returns every "
                "row or raises)", started)


class Client:
    """AsyncClient for synchronous code: the same keywords, methods and errors.

        with Client("127.0.0.1:8001") as client:
            emb = client.embed(["a.jpg", b"<encoded bytes>", pil_image])  # float32 [3, dims]

    It runs its own event loop on a daemon thread (so it works where a loop is already
    running, as in Jupyter). `close()` (or leaving the `with`) closes the gRPC channels
    and the thread. Not to be called from its own callbacks (a `progress` callback).
    """

    def __init__(self, url: str | Sequence[str] = "127.0.0.1:8001", *, model: str | None = None,
                 preprocess: Literal["server", "client"] = "server",
                 preprocess_mode: str | None = None, batch_size: int | None = None,
                 concurrency: int = 8, timeout: float = 300.0, give_up_after: float = 120.0,
                 headers: dict[str, str] | None = None, read_threads: int = 8,
                 max_file_bytes: int = 64 << 20):
        self._async = AsyncClient(
            url, model=model, preprocess=preprocess, preprocess_mode=preprocess_mode,
            batch_size=batch_size, concurrency=concurrency, timeout=timeout,
            give_up_after=give_up_after, headers=headers, read_threads=read_threads,
            max_file_bytes=max_file_bytes)
        self._loop: asyncio.AbstractEventLoop | None = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sscd-client",
                                        daemon=True)
        self._thread.start()
        # a Client dropped without close(): its thread stops when it is collected
        self._finalizer = weakref.finalize(self, self._loop.call_soon_threadsafe,
                                           self._loop.stop)

    @property
    def settings(self) -> job.Settings:
        return self._async.settings

    @property
    def last_errors(self) -> dict[int, str]:
        """{index: reason} of the bad items of the last `embed` call."""
        return self._async.last_errors

    def _run(self, coro):
        if self._loop is None:
            coro.close()
            raise UsageError("the client is closed")
        if threading.current_thread() is self._thread:
            coro.close()
            raise UsageError("a Client cannot be called from its own callbacks")
        started, done = threading.Event(), threading.Event()

        async def wrapped():
            started.set()
            try:
                return await coro
            finally:
                done.set()

        future = asyncio.run_coroutine_threadsafe(wrapped(), self._loop)
        try:
            return future.result()
        except KeyboardInterrupt:  # stop the work and let it clean up, then re-raise
            future.cancel()
            # The loop runs callbacks in order: once this one ran, the work has either
            # started (then it cleans up, setting `done`) or will never run.
            flushed = threading.Event()
            self._loop.call_soon_threadsafe(flushed.set)
            if flushed.wait(30) and started.is_set():
                done.wait(30)
            raise

    def connect(self) -> ModelInfo:
        """AsyncClient.connect: the served model's facts (fetched once)."""
        return self._run(self._async.connect())

    @property
    def model_info(self) -> ModelInfo:
        """The served model's facts (asked of the server on first use)."""
        return self.connect()

    @property
    def dims(self) -> int:
        """Descriptor length."""
        return self.connect().dims

    def embed(self, items: Iterable[ImageInput],
              errors: Literal["raise", "nan"] = "raise") -> np.ndarray:
        """float32 [n, dims], L2-normalised, row i for items[i]: AsyncClient.embed (paths,
        encoded bytes, PIL images, uint8 arrays encoded losslessly as PNG; BadImage after
        the good items were embedded, or NaN rows with errors="nan"; last_errors)."""
        return self._run(self._async.embed(items, errors))

    def embed_files(self, inputs: str | os.PathLike | Iterable[str | os.PathLike],
                    output: str | os.PathLike, progress: ProgressCallback | None = None,
                    **overrides: Any) -> job.Summary:
        """AsyncClient.embed_files: sscd-embed's job into `output` (resumable), returning
        job.Summary; `progress(embedded, failed, total)` is called on the client's thread.
        Ctrl-C stops the job (what is finished is kept) and raises KeyboardInterrupt."""
        return self._run(self._async._embed_files(inputs, output, progress, overrides))

    def close(self) -> None:
        """Close the gRPC channels and stop the client's thread (idempotent)."""
        if self._loop is None:
            return
        try:
            self._run(self._async.aclose())
        finally:
            self._finalizer.detach()
            loop, self._loop = self._loop, None
            loop.call_soon_threadsafe(loop.stop)
            self._thread.join(10)
            if not loop.is_running():
                loop.close()

    def __enter__(self) -> "Client":
        try:
            self.connect()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
