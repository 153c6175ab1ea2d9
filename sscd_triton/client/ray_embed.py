"""`embed.py --ray ADDRESS`: the same run, scaled out on Ray Data.

The driver (this process) does what is cheap and must happen once: it asks a server for
the model's facts (`model_info.describe`), opens the output folder (`io.ShardStore`, which
holds the output's lock, checks the model identity and writes the manifest), and cuts the
inputs into partitions:

- every INPUT a listing (list files, `-`): `sources.iter_partitions`, exactly as embed.py
  cuts them (same keys, same fingerprints: either command resumes the other's output);
- otherwise (files, folders, globs): the de-duplicated, sorted listing of every input,
  cut into `--partition-size` entries (`InputsPartition`; keyed by a hash of the INPUT
  arguments, resolved as the ids are: `dir`, `./dir` and a link to it are one key). A
  finished partition whose entries changed (a folder that gained files) is a usage
  error, as for a changed list file.

Partitions with a done-marker are skipped unread; the others become one row each of
`ray.data.from_items`, mapped with `map_batches(EmbedPartition, batch_size=1)` on an
actor pool. Each actor holds one `transport.Endpoints` (a reused gRPC client per URL,
all of `--url`, starting at a random one) and, per partition, runs the one pipeline of
embed.py (`pipeline.run`: read, batch, send, split and isolate bad files) into a
`PartitionStore`: the partition's own Parquet shards (`{key}-NNNNN.parquet`, written
whole), failures, and its done-marker written last. So exactly-once holds per partition
whatever dies: a partition without its marker is redone, and the shards an earlier
attempt left are read back first (their ids skipped), never duplicated. An actor that
dies mid-partition is restarted by Ray and the partition is retried (Ray Data's actor
pools retry tasks of dead actors: max_restarts / max_task_retries -1); a rerun of the
command redoes only partitions without a marker.

The driver then counts the shards (their footers), writes the manifest and returns a
`job.Summary` (or raises client.exceptions, as job.run does). The actors need the input
files and the output folder at the same paths (a shared file system on a cluster).
"""
from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import os
import random
import time

from sscd_triton import spec
from sscd_triton.client import io as outio
from sscd_triton.client import job, model_info, pipeline, sources, transport
from sscd_triton.client.exceptions import Interrupted, ServerUnavailable, Unfinished, UsageError
from sscd_triton.client.progress import Progress

# Test hook: a file path; the first actor to claim it (creates it) writes one shard of
# its partition and dies with os._exit(1), as a lost worker would.
CRASH_ENV = "SSCD_RAY_TEST_CRASH_ONCE"


class InputsPartition(sources.Partition):
    """`lines` [index * size, ...) of the sorted, de-duplicated inputs `source` (the INPUT
    arguments, NUL-joined); `problems`: id -> why it cannot be read at all."""

    problems: dict

    @property
    def key(self) -> str:
        digest = hashlib.sha1(self.source.encode("utf-8", "surrogateescape")).hexdigest()
        return f"inputs.{digest[:8]}.{self.index:05d}"

    def describe(self) -> str:
        start = self.index * self.size + 1
        names = " ".join(self.source.split("\0"))
        return f"the inputs {names} (sorted) entries {start}-{start + len(self.lines) - 1}"


def iter_partitions(args: list[str], size: int, exclude=(), stdin=None, resolve=True):
    """The partitions of a run (see the module doc). `resolve`: ids and the partitions'
    key from resolved paths (dir, ./dir and a link to it: the same partitions); False
    for an output written before ids were resolved, keyed by the arguments as given."""
    if all(sources.is_listing(a) for a in args):
        yield from sources.iter_partitions(args, size, stdin=stdin)
        return
    found: dict[str, str | None] = {}
    for id_, problem in sources.iter_inputs(args, stdin=stdin, exclude=exclude,
                                            resolve=resolve):
        if id_ not in found or problem is None:
            found[id_] = problem  # a readable occurrence wins over a problem
    named = args
    if resolve:
        named = list(dict.fromkeys(a if sources.is_listing(a) else sources.canonical(a)
                                   for a in args))
    ordered = sorted(found)
    for index, start in enumerate(range(0, len(ordered), size)):
        lines = ordered[start:start + size]
        part = InputsPartition("\0".join(named), index, lines, size)
        part.problems = {i: found[i] for i in lines if found[i]}
        yield part


def to_row(part: sources.Partition) -> dict:
    """One Ray Dataset row; JSON keeps non-UTF-8 paths (surrogate escapes) intact."""
    return {"key": part.key, "payload": json.dumps({
        "kind": "inputs" if isinstance(part, InputsPartition) else "listing",
        "source": part.source, "index": part.index, "size": part.size,
        "lines": part.lines, "problems": getattr(part, "problems", {})})}


def from_row(payload: str) -> sources.Partition:
    doc = json.loads(payload)
    cls = InputsPartition if doc["kind"] == "inputs" else sources.Partition
    part = cls(doc["source"], doc["index"], doc["lines"], doc["size"])
    part.problems = doc["problems"]
    return part


class PartitionStore(outio.ShardStore):
    """The output folder as one actor writes one partition into it: no lock (the driver
    holds it), no manifest (the driver writes it), only this partition's shards looked at
    (read back at open, so shards of an attempt that died are kept and not redone)."""

    def __init__(self, folder: str, meta: dict, shard_size: int, flush_seconds: float,
                 key: str):
        super().__init__(folder, meta, shard_size, flush_seconds, lock=False,
                         partitioned=True)
        self.key = key

    def open(self) -> "PartitionStore":
        for sub in (outio.EMBEDDINGS, outio.FAILURE_SHARDS, outio.MARKERS):
            os.makedirs(os.path.join(self.folder, sub), exist_ok=True)
        for sub in (outio.EMBEDDINGS, outio.FAILURE_SHARDS):
            for name in outio._shard_files(self.folder, sub):
                part, n = outio._split_name(name)
                if part == self.key:
                    self._recorded.setdefault(part, []).append(
                        os.path.join(self.folder, sub, name))
                    self._seq[part] = max(self._seq.get(part, 0), n + 1)
        if os.path.exists(os.path.join(self.folder, outio.MARKERS, self.key + ".json")):
            self._markers = {self.key}
        self._writer = outio._Writer()
        return self

    def _write_manifest(self) -> None:
        pass  # the driver's


class _Quiet:
    def update(self, embedded: int, failed: int) -> None:
        pass

    def set_total(self, total: int) -> None:
        pass


class EmbedPartition:
    """The actor of the pool: embeds one partition per call (`batch_size=1` rows)."""

    def __init__(self, config: dict):
        self.c = config
        self.loop = asyncio.new_event_loop()
        urls = list(config["urls"])
        turn = random.randrange(len(urls))
        self.endpoints = self.loop.run_until_complete(self._endpoints(urls[turn:] + urls[:turn]))
        self.opts = pipeline.Options(
            batch_size=config["batch_size"], concurrency=config["concurrency"],
            read_threads=config["read_threads"],
            preprocess=spec.PREPROCESS[config["preprocess"]],
            client_side=config["client_side"], max_file_bytes=config["max_file_bytes"],
            max_request_bytes=config["max_request_bytes"])
        self.gave_up: str | None = None
        # Found out once (a server batching DALI requests although the config read said
        # not), kept for this actor's later partitions, and reported once to the driver.
        self.batch_mates = config["batch_mates"]
        self.notes: list[str] = []

    async def _endpoints(self, urls):
        return transport.Endpoints(urls, self.c["give_up_after"])

    def __call__(self, batch: dict) -> dict:
        out = {k: [] for k in ("key", "embedded", "failed", "skipped", "status", "message")}
        for key, payload in zip(batch["key"], batch["payload"]):
            counts, status, message = self.embed(from_row(str(payload)))
            for k, v in zip(("key", "embedded", "failed", "skipped", "status", "message"),
                            (str(key), *counts, status, message)):
                out[k].append(v)
        return out

    def embed(self, part: sources.Partition) -> tuple[tuple[int, int, int], str, str]:
        """`((embedded, failed, skipped), status, message)`; status "done" (marker
        written), "unfinished" (servers gone, a shard not written: resumable) or "fatal"."""
        if self.gave_up is not None:  # one give-up per actor: the rest is left for a rerun
            return (0, 0, 0), "unfinished", self.gave_up
        c = self.c
        store = PartitionStore(c["folder"], c["meta"], c["shard_size"], c["flush_seconds"],
                               part.key).open()
        marker = store.partition_marker(part.key)
        if marker is not None:  # a retried task whose first attempt finished
            store.close(complete=True)
            return (0, 0, len(part.lines)), "done", ""
        sink = pipeline.Sink(store, _Quiet())
        on_result = sink.result
        if c.get("crash_file") and _claim(c["crash_file"]):
            on_result = _dying(store, sink)
        sender = transport.Sender(self.endpoints, c["model"], c["input"], c["dims"],
                                  on_result, sink.failure, c["timeout"],
                                  headers=c["headers"], batch_mates=self.batch_mates,
                                  log=self.notes.append)
        problems = getattr(part, "problems", {})
        unit = pipeline.Unit([(line, problems.get(line)) for line in part.lines],
                             lambda: store.partition_seen(part.key, part.fingerprint,
                                                          part.describe()), part)
        complete = False
        try:
            stats = self.loop.run_until_complete(
                pipeline.run([unit], sink, sender, self.opts, _Quiet()))
            if store.new_embedded + store.new_failed != stats.inputs:
                raise outio.WriteError(f"{part.describe()}: {stats.inputs} new inputs but "
                                       f"{store.new_embedded + store.new_failed} results")
            complete = True
            store.close(complete=True)
        except transport.GiveUp as e:
            self.gave_up = str(e)
            return self._closed(store, part, "unfinished", str(e))
        except outio.WriteError as e:
            return self._closed(store, part, "unfinished", str(e))
        except (transport.Fatal, outio.OutputError) as e:
            return self._closed(store, part, "fatal", str(e))
        finally:
            self.batch_mates = sender.batch_mates
            if not complete:
                try:
                    store.close(complete=False)
                except outio.WriteError:
                    pass
        note, self.notes = " ".join(self.notes), []  # the Sender's, the first time it has one
        return (store.new_embedded, store.new_failed, stats.skipped), "done", note

    @staticmethod
    def _closed(store, part, status, message):
        try:
            store.close(complete=False)  # keeps what was done: a rerun resumes it
        except outio.WriteError:
            pass
        return (store.new_embedded, store.new_failed, 0), status, message

    def __del__(self):
        try:
            self.loop.run_until_complete(self.endpoints.close())
        except Exception:  # noqa: BLE001
            pass


def _dying(store: PartitionStore, sink: pipeline.Sink):
    """A result callback that records one shard of the partition, then kills the actor
    (the CRASH_ENV test hook: a worker lost mid-partition)."""
    def on_result(ids, embeddings) -> None:
        sink.result(ids, embeddings)
        store.commit()
        store._writer.drain()  # the shard is on disk
        os._exit(1)
    return on_result


def _claim(path: str) -> bool:
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def _count_rows(folder: str) -> tuple[int, int]:
    import pyarrow.parquet as pq

    counts = []
    for sub in (outio.EMBEDDINGS, outio.FAILURE_SHARDS):
        counts.append(sum(pq.read_metadata(os.path.join(folder, sub, n)).num_rows
                          for n in outio._shard_files(folder, sub)))
    return counts[0], counts[1]


def _start_ray(address: str, quiet: bool, actors: int):
    try:
        import ray
    except ImportError:
        raise UsageError("--ray needs Ray: pip install 'ray[data]' "
                              "(the version in requirements.txt)") from None
    kwargs = {"include_dashboard": False, "log_to_driver": not quiet,
              "logging_level": "WARNING"}
    if address == "local":
        # the actors mostly wait on files and servers: --ray-actors may exceed the cores
        ray.init(num_cpus=max(actors, os.cpu_count() or 1), **kwargs)
    else:  # the cluster runs this driver's sscd_triton (its image brings the dependencies)
        package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        ray.init(address=address, runtime_env={"py_modules": [package]}, **kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    return ray


async def _prepare(settings: job.Settings, log):
    """The model's facts, the preprocessing and the batch size, as embed.py finds them."""
    endpoints = transport.Endpoints(settings.urls, settings.give_up_after, on_change=log)
    try:
        info = await model_info.describe(endpoints, settings.model_name, settings.headers)
    finally:
        await endpoints.close()
    mode = model_info.resolve_preprocess(info, settings.model_name, settings.preprocess_mode,
                                         settings.client_side)
    return info, mode, model_info.batch_size(info, settings.batch_size)


def run(inputs: list[str], output: str, settings: job.Settings, address: str = "local",
        actors: int = 0) -> job.Summary:
    """job.run on Ray Data at `address` ('local' starts a local instance) with `actors`
    actors (0: one per CPU of the cluster): the same Summary and errors
    (client.exceptions)."""
    started = time.monotonic()
    if outio.is_npz(output):
        raise UsageError("--ray writes a folder output (Parquet shards): give --output "
                         "a folder, not an .npz")
    if settings.shared_memory != "none":
        raise UsageError("--ray sends over gRPC only (its actors may run on other "
                         "hosts): drop --shared-memory")
    if settings.partition_size < 1:
        raise UsageError("--ray resumes by partitions: --partition-size must be >= 1")
    client_side = settings.client_side
    progress = Progress(settings.quiet)
    log = progress.log
    store = None
    complete = False
    try:
        try:
            info, mode, batch = asyncio.run(_prepare(settings, log))
        except transport.GiveUp as e:
            raise ServerUnavailable(model_info.http_hint(str(e), settings.urls),
                                    started=False) from None
        except transport.Fatal as e:
            raise UsageError(str(e)) from None
        meta = job.output_meta(settings, info, mode)
        store = outio.ShardStore(output, meta, settings.shard_size, settings.flush_seconds,
                                 partitioned=True, partition_size=settings.partition_size)
        try:
            store.open()
        except OSError as e:
            store = None
            raise UsageError(str(e)) from None
        except outio.OutputError as e:
            store = None
            raise UsageError(str(e)) from None
        if not store.partitioned:
            raise UsageError(f"{output} resumes by ids (written by embed.py with "
                                  "folder or glob inputs): continue it without --ray, or use "
                                  "another --output")
        rows, skipped, keys = [], 0, []
        unaccepted = collections.Counter()
        for part in iter_partitions(inputs, store.partition_size, exclude=[store.folder],
                                    resolve=not store.ids_as_given):
            keys.append(part.key)
            marker = store.partition_marker(part.key)
            if marker is None:
                rows.append(to_row(part))
                unaccepted.update(sources.file_type(i) for i, p in
                                  getattr(part, "problems", {}).items()
                                  if p.startswith(sources.NOT_ACCEPTED))
            elif marker.get("fingerprint") != part.fingerprint:
                raise UsageError(str(outio.mismatch(part.describe(), output)))
            else:
                skipped += len(part.lines)
        if store.embedded or store.failed:
            log(f"resuming {output}: {store.embedded} embedded and {store.failed} failed "
                f"by earlier runs are kept ({len(keys) - len(rows)} of {len(keys)} partitions "
                "finished, skipped unread)")
        before = store.embedded, store.failed
        statuses: dict[str, list[str]] = {}
        asked, actors = actors, 0
        if rows:
            ray = _start_ray(address, settings.quiet, asked)
            try:
                cpus = int(ray.cluster_resources().get("CPU", 1))
                actors = max(1, min(asked or cpus, cpus, len(rows)))
                log(f"Ray: {len(rows)} partitions on {actors} actors")
                config = {
                    "urls": list(settings.urls), "give_up_after": settings.give_up_after,
                    "model": settings.model_name, "input": info["input"],
                    "dims": info["dims"], "batch_mates": info["batch_mates"],
                    "timeout": settings.timeout, "headers": settings.headers, "meta": meta,
                    "folder": os.path.abspath(output), "shard_size": settings.shard_size,
                    "flush_seconds": settings.flush_seconds, "batch_size": batch,
                    "concurrency": settings.concurrency,
                    "read_threads": settings.read_threads,
                    "preprocess": mode.name, "client_side": client_side,
                    "max_file_bytes": settings.max_file_bytes,
                    "max_request_bytes": settings.max_request_bytes,
                    "crash_file": os.environ.get(CRASH_ENV)}
                ds = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
                    EmbedPartition, batch_size=1, fn_constructor_kwargs={"config": config},
                    compute=ray.data.ActorPoolStrategy(size=actors,
                                                       max_tasks_in_flight_per_actor=1),
                    num_cpus=1, max_restarts=-1, max_task_retries=-1)
                try:
                    for row in ds.iter_rows():
                        skipped += int(row["skipped"])
                        progress.update(int(row["embedded"]), int(row["failed"]))
                        if row["status"] != "done":
                            statuses.setdefault(row["status"], []).append(str(row["message"]))
                        elif row["message"]:  # a note (at most one per actor)
                            log(str(row["message"]))
                except Exception as e:  # noqa: BLE001  (Ray gave up on a task: resumable)
                    first = (str(e).strip().splitlines() or [type(e).__name__])[-1]
                    statuses.setdefault("unfinished", []).append(f"Ray: {first}")
            finally:
                if address == "local":
                    ray.shutdown()
        store.embedded, store.failed = _count_rows(store.folder)
        # also what attempts that died recorded before their partition was retried
        embedded, failed = store.embedded - before[0], store.failed - before[1]
        markers = os.path.join(store.folder, outio.MARKERS)
        missing = [k for k in keys if not os.path.exists(os.path.join(markers, k + ".json"))]
        complete = not missing and not statuses
    except KeyboardInterrupt:
        progress.close()
        raise Interrupted("interrupted", job.kept(store, output), store is not None) from None
    finally:
        progress.close()
        if store is not None:
            if not complete:
                try:
                    store.embedded, store.failed = _count_rows(store.folder)
                except Exception:  # noqa: BLE001
                    pass
            store.close(complete=complete)
    if "fatal" in statuses:
        raise UsageError(statuses["fatal"][0])
    if not complete:
        why = (statuses.get("unfinished")
               or [f"{len(missing)} partitions have no done-marker"])[0]
        raise Unfinished(model_info.http_hint(why, settings.urls), job.kept(store, output))
    return job.Summary(output=output, new_embedded=embedded, new_failed=failed,
                       embedded=store.embedded, failed=store.failed, skipped=skipped,
                       unaccepted=unaccepted, elapsed=time.monotonic() - started, info=info,
                       preprocess=mode, partitions=len(rows), actors=actors,
                       preprocess_on=settings.preprocess)
