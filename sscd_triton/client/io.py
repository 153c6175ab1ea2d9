"""Embedding outputs: Parquet folders, single `.npz` files, model identity, and loading.

Two forms, chosen by the `--output` name:

- `DIR` (any name not ending in `.npz`; the form for large collections):
    DIR/embeddings/P-NNNNN.parquet  `id` string, `embedding` fixed_size_list<float32>[dims]
    DIR/failures/P-NNNNN.parquet    `id` string, `reason` string
    DIR/partitions/P.json           done-marker of a finished partition (partitioned inputs)
    DIR/manifest.json               identity, dims, servers, counts, `complete`
  Every Parquet file carries the producing model in its schema metadata (`model`,
  `model_version`, `sscd_model`, `weights_sha256`, `preprocess`, `preprocess_on`, `dims`,
  `created_by`). Read with pyarrow (`pq.read_table("DIR/embeddings")`), DuckDB
  (`SELECT * FROM 'DIR/embeddings/*.parquet'`), Spark, Ray or pandas, or with
  `load_embeddings("DIR")`. `P` is `part` for unpartitioned inputs, else the partition key.
  Each shard is written whole (temporary file, fsync, rename: `files.write_atomic`) on a
  writer thread, never on the event loop: a shard present is complete, and after a crash
  or `kill -9` whatever is in no shard is simply redone. A partition's marker is written
  after all its shards, so a marker means "every line of this partition is in a shard".
- `OUT.npz`: arrays `ids` and `embeddings` (and `meta`, the manifest as JSON text), with
  failures in `OUT.failures.jsonl` beside it (one {"id", "reason"} object per line). While
  running, the work happens in a hidden Parquet folder `OUT.npz.partial/`; the `.npz` is
  assembled at the end and replaced atomically, then the folder is removed.

Model identity (`IDENTITY_KEYS`): the served model's name and version, the repository's
`sscd_model` and `sscd_weights_sha256` parameters (spec.PARAM_*), the preprocessing and
where it runs, and dims. A value the server does not tell (an older repository, a
restricted model-config API) is "unknown". Resuming an output needs the same identity:
the weights fingerprint when both sides know it (else the name and version too), and an
"unknown" fingerprint matches only "unknown"; otherwise `OutputError` names both.

One process at a time writes an output: it holds an exclusive `flock` on `DIR/.lock`
(`OUT.npz.partial/.lock`) while open; a second embed.py on the same output stops (exit 2).

`load_embeddings(path)` reads every form (also version-1 folders of .npy shards):
`ids, embeddings = load_embeddings(path)`. Ids are unique for unpartitioned runs; with
partitioned inputs each partition is de-duplicated on its own (see sscd_triton.client.job).
"""
from __future__ import annotations

import fcntl
import json
import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from sscd_triton.client.idset import IdSet, storable
from sscd_triton.files import write_atomic

FORMAT = "sscd-triton-embeddings"
VERSION = 2
MANIFEST = "manifest.json"
EMBEDDINGS = "embeddings"
FAILURE_SHARDS = "failures"
MARKERS = "partitions"
FAILURES = "failures.jsonl"  # beside an .npz (and inside version-1 folders)
LOCK = ".lock"
PARTIAL_SUFFIX = ".partial"
DEFAULT_PART = "part"
UNKNOWN = "unknown"
# How the ids of files found on the file system are written (sources.canonical); outputs
# older than that say "as given" (manifest "ids"), and resuming one resolves their ids too.
IDS_RESOLVED, IDS_AS_GIVEN = "resolved paths", "as given"
CREATED_BY = "sscd-triton embed.py"
# What produced the descriptors; runs writing into one output must agree (identity_conflict).
# "postprocess": set by `sscd-postprocess apply` (unknown for raw descriptors), so raw
# descriptors are never appended to a transformed output of the same width.
# "precision" (fp32, fp16, int8; spec.PARAM_PRECISION) is compared only when both sides
# know it: outputs written before it was recorded resume as before (their weights
# fingerprint already tells another precision's ONNX apart).
IDENTITY_KEYS = ("model", "model_version", "sscd_model", "weights_sha256", "preprocess",
                 "preprocess_on", "dims", "postprocess", "precision")


class OutputError(Exception):
    """An output that cannot be used as asked (exit status 2); the message says why."""


class WriteError(Exception):
    """A shard could not be written (disk full, ...): the run stops, resumable (exit 3)."""


class PartitionMismatch(OutputError):
    """A partitioned input is not the one an earlier run embedded into the output."""


def is_npz(path: str) -> bool:
    return path.lower().endswith(".npz")


def work_dir(npz_path: str) -> str:
    return npz_path + PARTIAL_SUFFIX


def failures_path(output: str) -> str:
    """Where the failures of `output` end up: beside an .npz, inside a folder."""
    if is_npz(output):
        return output[:-len(".npz")] + ".failures.jsonl"
    return os.path.join(output, FAILURE_SHARDS)


def part_of(id_) -> str:
    """The key of the partition an id belongs to (the pipeline tags the ids of partitioned
    inputs with `.part`, a `sources.Partition`)."""
    part = getattr(id_, "part", None)
    return part.key if part is not None else DEFAULT_PART


# --- identity ---------------------------------------------------------------------------

def identity(meta: dict) -> dict:
    """The identity keys of a manifest or meta dict, "unknown" where absent."""
    return {k: str(meta[k]) if meta.get(k) not in (None, "") else UNKNOWN for k in IDENTITY_KEYS}


def describe(ident: dict) -> str:
    w = ident["weights_sha256"]
    w = w[:12] if w != UNKNOWN else "unknown"
    precision = "" if ident["precision"] == UNKNOWN else f"{ident['precision']}, "
    return (f"{ident['model']} v{ident['model_version']} ({ident['sscd_model']}, {precision}"
            f"weights {w}, {ident['preprocess']} on the {ident['preprocess_on']}, "
            f"{ident['dims']} dims)")


def identity_conflict(recorded: dict, current: dict) -> bool:
    """Whether descriptors of `current` must not join an output of `recorded`."""
    a, b = identity(recorded), identity(current)
    keys = [k for k in IDENTITY_KEYS if k not in ("model_version", "precision")]
    if UNKNOWN not in (a["precision"], b["precision"]):
        keys.append("precision")
    if UNKNOWN in (a["weights_sha256"], b["weights_sha256"]):
        keys.append("model_version")  # no fingerprint: the version must match too
    return any(a[k] != b[k] for k in keys)


def check_identity(output: str, recorded: dict, current: dict) -> None:
    if identity_conflict(recorded, current):
        a, b = identity(recorded), identity(current)
        hint = ""
        if (a["weights_sha256"] == UNKNOWN) != (b["weights_sha256"] == UNKNOWN):
            hint = (" (the weights fingerprint is unknown when the server's model config "
                    "cannot be read: add --header for a restricted server)")
        raise OutputError(f"{output} holds descriptors of {describe(a)}, but this run has "
                          f"{describe(b)}: they would not compare; use another --output{hint}")


# --- locking, manifest ------------------------------------------------------------------

def lock_output(folder: str, output: str) -> int:
    """Create `folder` and hold an exclusive lock on `folder/.lock` (released when the
    returned descriptor is closed, or the process ends, however it ends)."""
    while True:
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, LOCK)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:  # the folder was just renamed away (a run finishing)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputError(f"another embed.py is writing {output}; wait for it to finish "
                              "or choose another --output") from None
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        if current is not None and os.path.samestat(os.fstat(fd), current):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)  # locked a lock file that a finishing run had just moved away


def read_manifest(folder: str) -> dict | None:
    try:
        with open(os.path.join(folder, MANIFEST)) as f:
            doc = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise OutputError(f"{folder}: unreadable {MANIFEST} ({e})") from None
    if doc.get("format") != FORMAT:
        raise OutputError(f"{folder}: {MANIFEST} is not an sscd-triton embeddings manifest")
    return doc


def _write_json(path: str, doc: dict) -> None:
    write_atomic(path, json.dumps(doc, indent=1), durable=True)


def read_failures(path: str) -> list[dict]:
    """Failure records of a failures.jsonl; a torn (unterminated) last line is ignored."""
    out = []
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return out
    for line in data.split(b"\n")[:-1]:  # the part after the last newline is torn or empty
        if line.strip():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


# --- Parquet shards ---------------------------------------------------------------------

def _pa():
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pa, pq


def _metadata(meta: dict) -> dict:
    out = {k: str(v) for k, v in identity(meta).items()}
    out["created_by"] = CREATED_BY
    for k in ("partition", "partition_fingerprint"):
        if meta.get(k):
            out[k] = str(meta[k])
    return out


def write_embeddings(path: str, ids: list[str], emb: np.ndarray, meta: dict) -> None:
    """One embeddings shard, written whole and fsynced (call off the event loop)."""
    pa, pq = _pa()
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    dims = emb.shape[1]
    column = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), dims)
    schema = pa.schema([pa.field("id", pa.string(), nullable=False),
                        pa.field("embedding", pa.list_(pa.float32(), dims), nullable=False)],
                       metadata=_metadata(meta))
    table = pa.Table.from_arrays([pa.array([storable(i) for i in ids], pa.string()), column],
                                 schema=schema)
    write_atomic(path, lambda f: pq.write_table(table, f, use_dictionary=["id"]), durable=True)


def write_failures(path: str, records: list[tuple[str, str]], meta: dict) -> None:
    pa, pq = _pa()
    schema = pa.schema([pa.field("id", pa.string(), nullable=False),
                        pa.field("reason", pa.string(), nullable=False)],
                       metadata=_metadata(meta))
    table = pa.Table.from_arrays([pa.array([storable(i) for i, _ in records], pa.string()),
                                  pa.array([storable(r) for _, r in records], pa.string())],
                                 schema=schema)
    write_atomic(path, lambda f: pq.write_table(table, f), durable=True)


def read_ids(path: str) -> list[str]:
    """The `id` column of one shard (the only reader resuming uses)."""
    _, pq = _pa()
    return pq.read_table(path, columns=["id"]).column("id").to_pylist()


def read_embedding_shard(path: str) -> tuple[np.ndarray, np.ndarray]:
    _, pq = _pa()
    table = pq.read_table(path)
    col = table.column("embedding")
    dims = col.type.list_size
    values = col.combine_chunks().flatten().to_numpy(zero_copy_only=False)
    ids = np.array(table.column("id").to_pylist(), dtype=object)
    return ids, values.astype(np.float32, copy=False).reshape(-1, dims)


def shard_metadata(path: str) -> dict:
    """A shard's schema metadata as text (identity, partition), without reading rows."""
    _, pq = _pa()
    raw = pq.read_schema(path).metadata or {}
    return {k.decode(): v.decode() for k, v in raw.items()}


def _shard_files(folder: str, sub: str) -> list[str]:
    try:
        names = os.listdir(os.path.join(folder, sub))
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.endswith(".parquet") and not n.startswith("."))


def _split_name(name: str) -> tuple[str, int]:
    part, n = name[:-len(".parquet")].rsplit("-", 1)
    return part, int(n)


# --- loading ----------------------------------------------------------------------------

def iter_shards(path: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """`(ids, embeddings)` chunks of an output of any form, a shard at a time."""
    if is_npz(path):
        if not os.path.exists(path) and os.path.isdir(work_dir(path)):
            raise OutputError(f"{path} is not finished: rerun the same embed.py command to "
                              f"complete it (results so far are in {work_dir(path)})")
        with np.load(path) as z:
            yield z["ids"].astype(object), z["embeddings"]
        return
    manifest = read_manifest(path)
    if manifest is None:
        raise OutputError(f"{path}: no {MANIFEST}; not an embeddings folder")
    if manifest.get("version", 1) == 1:  # numpy shards listed in the manifest
        for shard in manifest["shards"]:
            ids = np.load(os.path.join(path, shard["ids"])).astype(object)
            yield ids, np.load(os.path.join(path, shard["embeddings"]))
        return
    for name in _shard_files(path, EMBEDDINGS):
        yield read_embedding_shard(os.path.join(path, EMBEDDINGS, name))


def load_embeddings(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Read an output of any form (an `.npz`, a Parquet folder, a version-1 folder).

    Returns `(ids, embeddings)`: `ids` an object array [N] of str (resolved paths of
    files found on the file system, list and stdin lines as given); `embeddings`
    float32 [N, dims], row i the descriptor of `ids[i]`.
    """
    ids, embs = [], []
    for i, e in iter_shards(path):
        ids.append(i)
        embs.append(e)
    if not ids:
        dims = int((read_manifest(path) or {}).get("dims") or 0)
        return np.zeros(0, dtype=object), np.zeros((0, dims), np.float32)
    return np.concatenate(ids), np.concatenate(embs).astype(np.float32, copy=False)


def first_failures(path: str, n: int) -> list[dict]:
    """The first `n` failure records of a finished output (shard by shard: a folder with
    millions of failures is not read whole)."""
    if is_npz(path):
        return read_failures(failures_path(path))[:n]
    out = read_failures(os.path.join(path, FAILURES))[:n]  # version-1 folders
    _, pq = _pa()
    for name in _shard_files(path, FAILURE_SHARDS):
        if len(out) >= n:
            break
        out.extend(pq.read_table(os.path.join(path, FAILURE_SHARDS, name)).to_pylist())
    return out[:n]


def recorded_model(path: str) -> str | None:
    """The `sscd_model` an output records (None when it records none or is unreadable)."""
    try:
        if is_npz(path):
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"])) if "meta" in z else {}
        else:
            meta = read_manifest(path) or {}
    except Exception:  # noqa: BLE001  (unreadable: the search says so itself)
        return None
    return meta.get("sscd_model")


def load_failures(path: str) -> list[dict]:
    """The failure records ({"id", "reason"}) of an output of any form."""
    if is_npz(path):
        if not os.path.exists(failures_path(path)) and os.path.isdir(work_dir(path)):
            return load_failures(work_dir(path))
        return read_failures(failures_path(path))
    out = read_failures(os.path.join(path, FAILURES))  # version-1 folders
    _, pq = _pa()
    for name in _shard_files(path, FAILURE_SHARDS):
        out.extend(pq.read_table(os.path.join(path, FAILURE_SHARDS, name)).to_pylist())
    return out


# --- writing ----------------------------------------------------------------------------

class _Writer:
    """One thread that runs shard writes in order (fsync included), off the event loop.
    The first error is kept and raised by the next `submit` or by `close`."""

    def __init__(self):
        self._jobs: queue.Queue = queue.Queue(maxsize=8)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                if self.error is None:
                    try:
                        job()
                    except BaseException as e:  # noqa: BLE001  (raised on the caller's side)
                        self.error = e
            finally:
                self._jobs.task_done()

    def drain(self) -> None:
        """Wait until every job submitted so far has run."""
        self._jobs.join()
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            raise WriteError(f"writing the output failed: {self.error}") from self.error

    def submit(self, job: Callable[[], None]) -> None:
        self._raise()
        self._jobs.put(job)

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()
        self._raise()


@dataclass
class _Part:
    ids: list = field(default_factory=list)
    embs: list = field(default_factory=list)
    fails: list = field(default_factory=list)
    seq: int = 0  # number of the next shard
    expected: int = 0  # fresh inputs of this partition enumerated this run
    accounted: int = 0
    ended: bool = False
    info: dict | None = None


class _HoldsLock:
    """Owner of the output's advisory lock (see `lock_output`)."""

    _lock_fd: int | None = None

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


class ShardStore(_HoldsLock):
    """A Parquet output folder being written, resumable after any crash.

    `partitioned`: the inputs are cut into partitions (list files, standard input); each
    finished one gets a done-marker, and a later run skips it without reading its ids.
    The folder keeps resuming by partition for as long as every run's inputs are
    partitioned; once a run had other inputs, every later run reads all recorded ids.
    """

    def __init__(self, folder: str, meta: dict, shard_size: int = 10000,
                 flush_seconds: float = 60.0, lock: bool = True, partitioned: bool = False,
                 partition_size: int = 0):
        self.folder = folder
        self.name = folder  # how messages name the output
        self.lock = lock  # False: the owner (NpzOutput) holds the folder's lock
        self._lock_fd: int | None = None
        self.meta = dict(meta)
        self.shard_size = shard_size
        self.flush_seconds = flush_seconds
        self.partitioned = partitioned
        self.partition_size = partition_size
        self.manifest: dict = {}
        self._parts: dict[str, _Part] = {}
        self._recorded: dict[str, list[str]] = {}  # partition -> its shards found at open
        self._markers: set[str] = set()
        self._seq: dict[str, int] = {}  # partition -> number of its next shard
        self._writer: _Writer | None = None
        self._last_commit = time.monotonic()
        self.embedded = self.failed = 0  # totals, earlier runs included
        self.new_embedded = self.new_failed = 0  # this run

    # -- opening / resuming
    def open(self) -> "ShardStore":
        if os.path.exists(self.folder) and not os.path.isdir(self.folder):
            raise OutputError(f"{self.folder} exists and is not a folder")
        if self.lock:
            self._lock_fd = lock_output(self.folder, self.folder)
        try:
            return self._open()
        except BaseException:
            self._unlock()
            raise

    def _open(self) -> "ShardStore":
        os.makedirs(self.folder, exist_ok=True)
        found = read_manifest(self.folder)
        if found is None and any(n.endswith((".npy", ".parquet")) for n in os.listdir(self.folder)):
            raise OutputError(f"{self.folder} holds data files but no {MANIFEST}: not an "
                              "output of this tool; choose another --output")
        if found is not None and found.get("version", 1) != VERSION:
            raise OutputError(f"{self.folder} was written by an older embed.py (numpy shards); "
                              "read it with load_embeddings and embed into another --output")
        if found is not None:
            urls = list(dict.fromkeys(found.get("urls", []) + self.meta.get("urls", [])))
            # what this run does not know (None) keeps what the output recorded
            known = {k: v for k, v in self.meta.items() if v is not None}
            self.manifest = {**found, **known, "urls": urls}
            if found.get("resume") != "partitions":
                self.partitioned = False
            if self.partitioned and found.get("partition_size"):
                self.partition_size = int(found["partition_size"])
        else:
            self.manifest = {"format": FORMAT, "version": VERSION, **self.meta,
                             "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                             "ids": IDS_RESOLVED}
        self.manifest.setdefault("ids", IDS_AS_GIVEN)  # once as given, always (its shards)
        self.manifest["resume"] = "partitions" if self.partitioned else "ids"
        self.manifest["partition_size"] = self.partition_size if self.partitioned else None
        self.manifest.pop("layout", None)
        self.manifest["layout"] = {"embeddings": f"{EMBEDDINGS}/*.parquet",
                                   "failures": f"{FAILURE_SHARDS}/*.parquet"}
        _, pq = _pa()
        for sub in (EMBEDDINGS, FAILURE_SHARDS) + ((MARKERS,) if self.partitioned else ()):
            os.makedirs(os.path.join(self.folder, sub), exist_ok=True)
        for sub in (EMBEDDINGS, FAILURE_SHARDS, MARKERS):
            d = os.path.join(self.folder, sub)
            for name in os.listdir(d) if os.path.isdir(d) else ():  # of an interrupted write
                if name.endswith(".tmp"):
                    os.unlink(os.path.join(d, name))
        for sub in (EMBEDDINGS, FAILURE_SHARDS):
            for name in _shard_files(self.folder, sub):
                part, n = _split_name(name)
                path = os.path.join(self.folder, sub, name)
                self._recorded.setdefault(part, []).append(path)
                self._seq[part] = max(self._seq.get(part, 0), n + 1)
                rows = pq.read_metadata(path).num_rows  # the footer only
                if sub == EMBEDDINGS:
                    self.embedded += rows
                else:
                    self.failed += rows
        markers = os.path.join(self.folder, MARKERS)
        self._markers = {n[:-len(".json")] for n in
                         (os.listdir(markers) if os.path.isdir(markers) else ())
                         if n.endswith(".json") and not n.startswith(".")}
        if found is not None and self.embedded:  # an output without descriptors takes any
            check_identity(self.name, found, self.meta)
        self._writer = _Writer()
        self.manifest["complete"] = False
        self._write_manifest()
        return self

    @property
    def ids_as_given(self) -> bool:
        """Whether some shards may hold file ids as given, not resolved (an older run)."""
        return self.manifest.get("ids") != IDS_RESOLVED

    def done_ids(self) -> Iterator[list[str]]:
        """Every id already embedded or failed, a shard at a time (resume by ids)."""
        for paths in self._recorded.values():
            for path in paths:
                yield read_ids(path)

    def partition_marker(self, key: str) -> dict | None:
        """The done-marker of partition `key` (None while it is not finished)."""
        if key not in self._markers:
            return None
        with open(os.path.join(self.folder, MARKERS, key + ".json")) as f:
            return json.load(f)

    def partition_seen(self, key: str, fingerprint: str, where: str) -> IdSet:
        """The ids an unfinished partition already recorded (its shards only), checking
        that they were made from the same lines."""
        seen = IdSet()
        for path in self._recorded.get(key, []):
            recorded = shard_metadata(path).get("partition_fingerprint")
            if recorded and recorded != fingerprint:
                raise mismatch(where, self.folder)
            seen.add_new(read_ids(path))
        return seen

    # -- results
    def _state(self, key: str, partition=None) -> _Part:
        state = self._parts.get(key)
        if state is None:
            state = self._parts[key] = _Part(seq=self._seq.get(key, 0))
        if partition is not None and state.info is None:
            state.info = partition.marker()
        return state

    def expect(self, ids) -> None:
        """Fresh inputs enumerated (before any of their results can arrive)."""
        for i in ids:
            part = getattr(i, "part", None)
            if part is not None:
                self._state(part.key, part).expected += 1

    def end_partition(self, partition) -> None:
        """Every input of `partition` (a sources.Partition) has been enumerated."""
        self._state(partition.key, partition).ended = True
        self._maybe_finish(partition.key)

    def _accounted(self, part: str, n: int) -> None:
        if part != DEFAULT_PART:
            self._parts[part].accounted += n
            self._maybe_finish(part)

    def add(self, ids: list[str], embeddings: np.ndarray) -> None:
        embeddings = np.asarray(embeddings, dtype=np.float32)
        by_part: dict[str, list[int]] = {}
        for k, i in enumerate(ids):
            by_part.setdefault(part_of(i), []).append(k)
        for part, rows in by_part.items():
            state = self._state(part, getattr(ids[rows[0]], "part", None))
            state.ids.extend(str(ids[k]) for k in rows)
            state.embs.append(embeddings[rows])
            self.embedded += len(rows)
            self.new_embedded += len(rows)
            if len(state.ids) >= self.shard_size:
                self._commit(part)
            self._accounted(part, len(rows))

    def fail(self, id_: str, reason: str) -> None:
        part = part_of(id_)
        state = self._state(part, getattr(id_, "part", None))
        state.fails.append((str(id_), reason))
        self.failed += 1
        self.new_failed += 1
        if len(state.fails) >= self.shard_size:
            self._commit(part)
        self._accounted(part, 1)

    def _maybe_finish(self, part: str) -> None:
        state = self._parts[part]
        if not (state.ended and state.accounted == state.expected):
            return
        self._commit(part)
        marker = {**state.info, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        path = os.path.join(self.folder, MARKERS, part + ".json")
        self._writer.submit(lambda: _write_json(path, marker))  # after its shards: in order
        self._markers.add(part)
        del self._parts[part]

    def tick(self) -> None:
        """Commit partial shards when the last commit is `flush_seconds` old."""
        if time.monotonic() - self._last_commit >= self.flush_seconds:
            self.commit()

    def commit(self) -> None:
        """Hand every pending result to the writer (shards land in order, fsynced)."""
        for part in list(self._parts):
            self._commit(part)

    def _commit(self, part: str) -> None:
        self._last_commit = time.monotonic()
        state = self._parts[part]
        if not state.ids and not state.fails:
            return
        meta = dict(self.meta)
        if state.info is not None:
            meta["partition"] = part
            meta["partition_fingerprint"] = state.info["fingerprint"]
        name = f"{part}-{state.seq:05d}.parquet"
        state.seq += 1
        if state.ids:
            path = os.path.join(self.folder, EMBEDDINGS, name)
            ids, emb = state.ids, np.concatenate(state.embs)
            self._writer.submit(lambda: write_embeddings(path, ids, emb, meta))
        if state.fails:
            path2 = os.path.join(self.folder, FAILURE_SHARDS, name)
            fails = state.fails
            self._writer.submit(lambda: write_failures(path2, fails, meta))
        state.ids, state.embs, state.fails = [], [], []

    def _write_manifest(self) -> None:
        self.manifest.update(count=self.embedded, failures=self.failed,
                             updated=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        _write_json(os.path.join(self.folder, MANIFEST), self.manifest)

    def close(self, complete: bool) -> None:
        """Write what is pending, wait for the writer, then the manifest (last).
        `complete` records that every input was accounted for. Safe to call twice."""
        if self._writer is None:
            return
        try:
            try:
                self.commit()
            finally:
                writer, self._writer = self._writer, None
                writer.close()
            self.manifest["complete"] = complete
            self._write_manifest()
        finally:
            self._unlock()


def mismatch(where: str, output: str) -> PartitionMismatch:
    return PartitionMismatch(
        f"{where} is not what an earlier run embedded into {output} (a partitioned input must "
        "be given again unchanged to resume): put new paths in a new list file, rerun with "
        "--partition-size 0 to resume by reading every recorded id, or use another --output")


class NpzOutput(_HoldsLock):
    """`OUT.npz` written through the Parquet work folder `OUT.npz.partial/`."""

    def __init__(self, path: str, meta: dict, shard_size: int = 10000,
                 flush_seconds: float = 60.0):
        self.path = path
        self.store = ShardStore(work_dir(path), meta, shard_size, flush_seconds, lock=False)
        self.store.name = path
        self._imported = False
        self._lock_fd: int | None = None

    def open(self) -> ShardStore:
        if os.path.isdir(self.path):
            raise OutputError(f"{self.path} is a folder; an .npz output must be a file name")
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, exist_ok=True)
        folder = self.store.folder
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise OutputError(f"{folder} exists and is not a folder")
        # Locked first, then judged: a run finishing meanwhile has written the .npz.
        self._lock_fd = lock_output(folder, self.path)
        try:
            if read_manifest(folder) is None:
                # Nothing of a run was ever committed here: leftovers of an import cut short.
                for name in os.listdir(folder):
                    if name != LOCK:
                        p = os.path.join(folder, name)
                        shutil.rmtree(p) if os.path.isdir(p) else os.unlink(p)
                if os.path.exists(self.path):
                    self._import_finished()
            return self.store.open()
        except BaseException:
            try:
                if os.listdir(folder) == [LOCK]:  # nothing written: leave no litter
                    shutil.rmtree(folder)
            except OSError:
                pass
            self._unlock()
            raise

    def _import_finished(self) -> None:
        """A finished .npz given again: continue from it (only new inputs get embedded).
        Its rows go into the (locked, empty) work folder as shards, the manifest last, so
        an import cut short leaves no manifest: the next run imports again."""
        try:
            with np.load(self.path) as z:
                ids, emb = z["ids"].tolist(), z["embeddings"]
                meta = json.loads(str(z["meta"])) if "meta" in z else {}
        except Exception as e:
            raise OutputError(f"{self.path} exists but is not a readable embeddings .npz "
                              f"({e}); choose another --output") from None
        if len(ids):
            check_identity(self.path, meta, self.store.meta)
        folder = self.store.folder
        for sub in (EMBEDDINGS, FAILURE_SHARDS):
            os.makedirs(os.path.join(folder, sub), exist_ok=True)
        name = f"{DEFAULT_PART}-00000.parquet"
        if len(ids):
            write_embeddings(os.path.join(folder, EMBEDDINGS, name), ids, emb, meta)
        fails = [(r["id"], r["reason"]) for r in read_failures(failures_path(self.path))]
        if fails:
            write_failures(os.path.join(folder, FAILURE_SHARDS, name), fails, meta)
        doc = {k: v for k, v in meta.items() if k not in ("complete", "resume")}
        _write_json(os.path.join(folder, MANIFEST),
                    {**doc, "format": FORMAT, "version": VERSION, "resume": "ids"})
        self._imported = True

    def finalize(self) -> None:
        """Assemble the .npz and its failures file atomically, then drop the work folder."""
        store = self.store
        store.close(complete=True)
        unchanged = self._imported and store.new_embedded == 0 and store.new_failed == 0
        if not unchanged:
            ids, emb = load_embeddings(store.folder)
            keep = ("format", "resume", "partition_size", "layout")
            meta = np.array(json.dumps({k: v for k, v in store.manifest.items()
                                        if k not in keep}))
            ids = np.array(ids.tolist(), dtype=str)  # fixed-width: no pickle in the .npz
            write_atomic(self.path, lambda f: np.savez(f, ids=ids, embeddings=emb, meta=meta),
                         durable=True)
            lines = "".join(json.dumps(r) + "\n" for r in load_failures(store.folder))
            write_atomic(failures_path(self.path), lines, durable=True)
        # Rename first: a crash during the removal must not leave a half-deleted work
        # folder that a rerun would mistake for an unfinished run.
        trash = f"{store.folder}.done-{os.getpid()}"
        os.replace(store.folder, trash)
        shutil.rmtree(trash, ignore_errors=True)
        self._unlock()
