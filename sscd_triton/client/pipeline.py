"""The embedding run: enumerate -> read (threads) -> batch -> send (async, bounded) -> store.

The work comes as `Unit`s (`plan`): for unpartitioned inputs one unit, de-duplicated
against every id the output already holds; for partitioned inputs (list files, stdin)
one unit per partition, de-duplicated on its own: a finished partition is skipped whole
(its marker's fingerprint checked, its ids never read), an unfinished one loads the ids
of its own shards only. Ids of partitioned inputs are tagged with their partition
(`PartId.part`), so the store knows where each result goes and when a partition is done.

Memory stays bounded whatever the collection size: a daemon thread enumerates inputs a
chunk at a time (de-duplicating against the ids already done), two producers read the
files of a chunk on a thread pool and cut them into batches, and at most `concurrency`
requests are in flight while the next batches are being read. Inputs of similar byte
length go together (less zero padding), and a request's padded size is capped. A failed
request is split and its images re-checked by the sender within its own task, while the
rest of the run goes on (transport.py): there is no pass at the end.

Stopping (GiveUp, Fatal, Ctrl-C): the task group cancels every request, the enumerating
thread is told to stop (it never blocks on the loop for longer than a poll), and the
read pool is shut down without waiting, so the process exits at once.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import io
import itertools
import threading
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Protocol

import numpy as np
from PIL import Image

from sscd_triton.client import sources
from sscd_triton.client.idset import IdSet
from sscd_triton.client.transport import Item, Sender
from sscd_triton import images, spec


@dataclass
class Options:
    batch_size: int = 16
    concurrency: int = 8
    read_threads: int = 8
    preprocess: spec.Preprocess = field(default_factory=lambda: spec.PREPROCESS["square320"])
    client_side: bool = False  # decode + preprocess here, send float32 tensors
    max_file_bytes: int = 64 << 20
    max_request_bytes: int = 64 << 20
    max_pixels: int = spec.MAX_IMAGE_PIXELS


@dataclass
class Stats:
    inputs: int = 0  # new inputs found this run
    skipped: int = 0  # already done by an earlier run, or named twice
    unaccepted: Counter = field(default_factory=Counter)  # new inputs of another type, by type


class PartId(str):
    """An id of a partitioned input; `part` is its sources.Partition."""

    part: sources.Partition


def _tag(id_: str, part: sources.Partition) -> PartId:
    tagged = PartId(id_)
    tagged.part = part
    return tagged


@dataclass
class Unit:
    """Inputs to embed, de-duplicated against `seen` (an IdSet, or a function making one,
    called on the enumerating thread). `partition`: the sources.Partition they are (then
    ids are tagged and the store is told when it has been enumerated). `skip`: a finished
    partition of that many lines, not enumerated at all."""

    items: Iterable[tuple[str, str | None]] = ()
    seen: IdSet | Callable[[], IdSet] | None = None
    partition: sources.Partition | None = None
    skip: int = 0


def plan(store, args: list[str], exclude: Iterable[str] = (),
         stdin=None) -> Iterator[Unit]:
    """The units of a run writing into `store` (io.ShardStore, already open)."""
    if not getattr(store, "partitioned", False):
        def load_done() -> IdSet:
            seen = IdSet()
            for ids in store.done_ids():
                seen.add_new(ids)
                if getattr(store, "ids_as_given", False):  # an older run's spelling
                    seen.add_new([sources.canonical(i) for i in ids])
            return seen
        yield Unit(sources.iter_inputs(args, stdin=stdin, exclude=exclude), load_done)
        return
    for part in sources.iter_partitions(args, store.partition_size, stdin=stdin):
        marker = store.partition_marker(part.key)
        if marker is not None:
            if marker.get("fingerprint") != part.fingerprint:
                from sscd_triton.client import io as outio

                raise outio.mismatch(part.describe(), store.folder)
            yield Unit(skip=len(part.lines))
            continue
        yield Unit([(line, None) for line in part.lines],
                   lambda p=part: store.partition_seen(p.key, p.fingerprint, p.describe()),
                   part)


class Progress(Protocol):
    def update(self, embedded: int, failed: int) -> None: ...
    def set_total(self, total: int) -> None: ...


class Sink:
    """Where every input ends: a descriptor or a failure, recorded once."""

    def __init__(self, store, progress: Progress):
        self.store = store
        self.progress = progress

    def expect(self, ids: list[str]) -> None:
        """Inputs enumerated, before any of their results (partition accounting)."""
        self.store.expect(ids)

    def end(self, partition: sources.Partition) -> None:
        self.store.end_partition(partition)

    def result(self, ids: list[str], embeddings: np.ndarray) -> None:
        self.store.add(ids, embeddings)
        self.store.tick()
        self.progress.update(len(ids), 0)

    def failure(self, id_: str, reason: str) -> None:
        self.store.fail(id_, reason)
        self.progress.update(0, 1)


def _header_shape(data: bytes, pre: spec.Preprocess):
    """Output (H, W) from the image header alone (no decoding); None if unreadable."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return pre.output_hw(*img.size)
    except Exception:
        return None


def load_item(id_: str, problem: str | None, opts: Options) -> Item | str:
    """Read (and in client mode decode) one input: an Item, or the reason it failed."""
    if problem:
        return problem
    data, why = sources.read_problem(id_, opts.max_file_bytes)
    if why:
        return why
    return item_from_bytes(id_, data, opts)


def item_from_bytes(id_, data: bytes, opts: Options) -> Item | str:
    """An Item of one encoded image (decoded here in client mode), or the reason it
    cannot be embedded."""
    if opts.client_side:
        try:
            tensor = images.load_tensor(data, opts.preprocess, opts.max_pixels)
        except images.ImageError as e:
            return f"not a usable image: {e}"
        except Exception as e:  # noqa: BLE001  (a decoder bug must not stop the run)
            return f"could not decode it: {type(e).__name__}: {e}"
        return Item(id_, tensor, tensor.nbytes, key=tensor.shape)
    try:  # the server's own check (cpu preprocessing, the gpu check step): fail early
        images.check_complete(data)
    except images.ImageError as e:
        return f"not a usable image: {e}"
    key = None if opts.preprocess.square else _header_shape(data, opts.preprocess)
    return Item(id_, data, len(data), alone=not images.looks_complete(data), key=key)


def make_batches(items: list[Item], opts: Options) -> list[list[Item]]:
    """Requests for `items`: same output shape together (client tensors, or short-edge
    modes on the server), similar byte lengths together, padded size capped; files that
    do not visibly end where their format says go alone (no padding)."""
    groups: dict = defaultdict(list)
    batches = [[it] for it in items if it.alone]
    for it in items:
        if not it.alone:
            groups[it.key].append(it)
    for group in groups.values():
        group.sort(key=lambda i: i.size)
        current: list[Item] = []
        for it in group:  # sorted: `it` is the longest so far
            if current and (len(current) == opts.batch_size
                            or (len(current) + 1) * it.size > opts.max_request_bytes):
                batches.append(current)
                current = []
            current.append(it)
        if current:
            batches.append(current)
    return batches


def _enumerate(units: Iterable[Unit], chunk: int, loop, out: asyncio.Queue,
               stop: threading.Event) -> None:
    """Daemon thread: push `(fresh inputs, skipped count, ended partition or None)`
    chunks, then None (or the exception that stopped the enumeration, for the run to
    re-raise). Returns as soon as `stop` is set, even while the queue is full."""
    def put(value) -> bool:
        try:
            fut = asyncio.run_coroutine_threadsafe(out.put(value), loop)
        except RuntimeError:  # the loop is closed
            return False
        while True:
            try:
                fut.result(timeout=0.2)
                return True
            except concurrent.futures.TimeoutError:
                if stop.is_set():
                    fut.cancel()
                    return False
            except (RuntimeError, concurrent.futures.CancelledError):  # the run has stopped
                return False

    try:
        for unit in units:
            if unit.skip:
                if not put(([], unit.skip, None)):
                    return
                continue
            seen = unit.seen() if callable(unit.seen) else (unit.seen or IdSet())
            part = unit.partition
            it = iter(unit.items)
            while True:
                raw = list(itertools.islice(it, chunk))
                if not raw:
                    break
                fresh = seen.add_new([i for i, _ in raw])
                kept = [r if part is None else (_tag(r[0], part), r[1])
                        for r, f in zip(raw, fresh) if f]
                if not put((kept, len(raw) - sum(fresh), None)):
                    return
            if part is not None and not put(([], 0, part)):
                return
    except BaseException as e:  # noqa: BLE001  (handed to the run, which re-raises it)
        put(e)
        return
    put(None)


async def run(units: Iterable[Unit], sink: Sink, sender: Sender, opts: Options,
              progress: Progress) -> Stats:
    """Embed the fresh inputs of `units`; raises what the sender raises (GiveUp, Fatal)
    or the enumeration raised, after cancelling the rest."""
    loop = asyncio.get_running_loop()
    stats = Stats()
    chunks: asyncio.Queue = asyncio.Queue(maxsize=2)
    ready: asyncio.Queue = asyncio.Queue(maxsize=max(2, opts.concurrency))
    chunk = max(64, 4 * opts.batch_size)
    stop = threading.Event()
    threading.Thread(target=_enumerate, args=(units, chunk, loop, chunks, stop),
                     name="enumerate", daemon=True).start()
    pool = concurrent.futures.ThreadPoolExecutor(opts.read_threads, thread_name_prefix="read")
    producers = 2

    async def produce() -> None:
        while True:
            got = await chunks.get()
            if got is None or isinstance(got, BaseException):
                await chunks.put(got)  # for the other producer
                if isinstance(got, BaseException):
                    raise got
                progress.set_total(stats.inputs)  # every chunk has been taken: total known
                return
            kept, skipped, ended = got
            stats.inputs += len(kept)
            stats.skipped += skipped
            sink.expect([i for i, _ in kept])  # synchronously: before any result of them
            if ended is not None:
                sink.end(ended)
            loaded = await asyncio.gather(*(loop.run_in_executor(pool, load_item, i, p, opts)
                                            for i, p in kept))
            items = []
            for (id_, problem), x in zip(kept, loaded):
                if problem is not None and problem.startswith(sources.NOT_ACCEPTED):
                    stats.unaccepted[sources.file_type(id_)] += 1
                if isinstance(x, str):
                    sink.failure(id_, x)
                else:
                    items.append(x)
            for batch in make_batches(items, opts):
                await ready.put(batch)

    async def dispatch(tg: asyncio.TaskGroup) -> None:
        slots = asyncio.Semaphore(opts.concurrency)
        finished = 0
        while finished < producers:
            batch = await ready.get()
            if batch is None:
                finished += 1
                continue
            await slots.acquire()
            task = tg.create_task(sender.send(batch))
            task.add_done_callback(lambda _: slots.release())

    async def producer() -> None:
        await produce()
        await ready.put(None)

    try:
        async with asyncio.TaskGroup() as tg:
            for _ in range(producers):
                tg.create_task(producer())
            tg.create_task(dispatch(tg))
    except BaseExceptionGroup as group:
        raise _first(group) from None
    finally:
        stop.set()
        pool.shutdown(wait=False, cancel_futures=True)
    return stats


def _first(group: BaseExceptionGroup) -> BaseException:
    """The first real exception of a task group's failure (GiveUp, Fatal, a bug)."""
    for e in group.exceptions:
        if isinstance(e, BaseExceptionGroup):
            return _first(e)
        if not isinstance(e, asyncio.CancelledError):
            return e
    return group.exceptions[0]
