"""Embedding outputs: sharded folders, single `.npz` files, failure logs, and loading.

Two forms, chosen by the `--output` name:

- `DIR` (any name not ending in `.npz`; the form for large collections):
    DIR/manifest.json          the journal: dims, model, preprocessing, servers, shard list
    DIR/embeddings-00000.npy   float32 [n, dims], unit-norm descriptors
    DIR/ids-00000.npy          str [n], the input paths, row i describing row i above
    DIR/failures.jsonl         one {"id": ..., "reason": ...} object per line
  A shard is written to temporary files, fsynced and renamed into place, and only then
  listed in the manifest (itself replaced atomically): after a crash or `kill -9` the
  manifest names exactly the shards that are complete; anything else is ignored and
  redone. Failure lines are appended and flushed as they happen (a torn last line is cut
  off when the run resumes).
- `OUT.npz`: arrays `ids` and `embeddings` (and `meta`, the manifest as JSON text), with
  failures in `OUT.failures.jsonl` beside it. While running, the work happens in a
  hidden sharded folder `OUT.npz.partial/`; the `.npz` is assembled at the end and
  replaced atomically, then the folder is removed.

One process at a time writes an output: it holds an exclusive `flock` on `DIR/.lock`
(`OUT.npz.partial/.lock`) while open; a second embed.py on the same output stops (exit 2).

`load_embeddings(path)` reads either form: `ids, embeddings = load_embeddings(path)`.
Ids are unique; their order is not the input order.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from typing import Iterator

import numpy as np

FORMAT = "sscd-triton-embeddings"
VERSION = 1
MANIFEST = "manifest.json"
FAILURES = "failures.jsonl"
LOCK = ".lock"
PARTIAL_SUFFIX = ".partial"
# Runs writing into one output must agree on these, or their descriptors would not compare.
COMPATIBLE_KEYS = ("model", "dims", "preprocess", "preprocess_on")


class OutputError(Exception):
    """An output that cannot be used as asked (exit status 2); the message says why."""


def is_npz(path: str) -> bool:
    return path.lower().endswith(".npz")


def work_dir(npz_path: str) -> str:
    return npz_path + PARTIAL_SUFFIX


def failures_path(output: str) -> str:
    """Where the failures of `output` end up: beside an .npz, inside a folder."""
    if is_npz(output):
        return output[:-len(".npz")] + ".failures.jsonl"
    return os.path.join(output, FAILURES)


# --- small durable-file helpers ---------------------------------------------------------

def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: str, write) -> None:
    """Write via `write(file)` into `path.PID.tmp`, fsync, then rename over `path`."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json(path: str, doc: dict) -> None:
    _atomic_write(path, lambda f: f.write(json.dumps(doc, indent=1).encode()))
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


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


# --- loading ----------------------------------------------------------------------------

def iter_shards(path: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """`(ids, embeddings)` chunks of an output of either form, a shard at a time."""
    if is_npz(path):
        if not os.path.exists(path) and os.path.isdir(work_dir(path)):
            raise OutputError(f"{path} is not finished: rerun the same embed.py command to "
                              f"complete it (results so far are in {work_dir(path)})")
        with np.load(path) as z:
            yield z["ids"], z["embeddings"]
        return
    manifest = read_manifest(path)
    if manifest is None:
        raise OutputError(f"{path}: no {MANIFEST}; not an embeddings folder")
    for shard in manifest["shards"]:
        ids = np.load(os.path.join(path, shard["ids"]))
        emb = np.load(os.path.join(path, shard["embeddings"]))
        yield ids, emb


def load_embeddings(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Read an output of either form.

    Returns `(ids, embeddings)`: `ids` a str array [N] of input paths as given, unique;
    `embeddings` float32 [N, dims], row i the descriptor of `ids[i]`.
    """
    ids, embs = [], []
    for i, e in iter_shards(path):
        ids.append(i)
        embs.append(e)
    if not ids:
        dims = (read_manifest(path) or {}).get("dims") or 0
        return np.zeros(0, dtype=str), np.zeros((0, dims), np.float32)
    return np.concatenate(ids), np.concatenate(embs).astype(np.float32, copy=False)


def load_failures(path: str) -> list[dict]:
    """The failure records (`id`, `reason`) of an output of either form."""
    if is_npz(path) and not os.path.exists(failures_path(path)):
        return read_failures(os.path.join(work_dir(path), FAILURES))
    return read_failures(failures_path(path))


# --- writing ----------------------------------------------------------------------------

class _HoldsLock:
    """Owner of the output's advisory lock (see `lock_output`)."""

    _lock_fd: int | None = None

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


class ShardStore(_HoldsLock):
    """A sharded output folder being written, resumable after any crash."""

    def __init__(self, folder: str, meta: dict, shard_size: int = 10000,
                 flush_seconds: float = 60.0, lock: bool = True):
        self.folder = folder
        self.lock = lock  # False: the owner (NpzOutput) holds the folder's lock
        self._lock_fd: int | None = None
        self.meta = dict(meta)
        self.shard_size = shard_size
        self.flush_seconds = flush_seconds
        self.manifest: dict = {}
        self._ids: list[str] = []
        self._embs: list[np.ndarray] = []
        self._failures = None
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
        if found is None and any(n.endswith(".npy") for n in os.listdir(self.folder)):
            raise OutputError(f"{self.folder} holds .npy files but no {MANIFEST}: not an "
                              "output of this tool; choose another --output")
        if found is not None:
            for key in COMPATIBLE_KEYS:
                if key in self.meta and found.get(key) != self.meta[key]:
                    raise OutputError(
                        f"{self.folder} was written with {key}={found.get(key)!r} but this run "
                        f"has {key}={self.meta[key]!r}: descriptors would not be comparable; "
                        "use another --output")
            urls = list(dict.fromkeys(found.get("urls", []) + self.meta.get("urls", [])))
            self.manifest = {**found, **self.meta, "urls": urls}
        else:
            self.manifest = {"format": FORMAT, "version": VERSION, **self.meta,
                             "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "shards": []}
        for name in os.listdir(self.folder):  # leftovers of an interrupted write
            if name.endswith(".tmp") and name.startswith(("embeddings-", "ids-", MANIFEST)):
                os.unlink(os.path.join(self.folder, name))
        self._repair_failures()
        self.embedded = sum(s["count"] for s in self.manifest["shards"])
        self.failed = len(read_failures(self._failures_file))
        self._failures = open(self._failures_file, "ab")
        self.manifest["complete"] = False
        self._write_manifest()
        return self

    @property
    def _failures_file(self) -> str:
        return os.path.join(self.folder, FAILURES)

    def _repair_failures(self) -> None:
        """Cut a torn last line (a crash mid-write) so that appends start on a new line."""
        try:
            with open(self._failures_file, "rb+") as f:
                data = f.read()
                if data and not data.endswith(b"\n"):
                    f.truncate(data.rfind(b"\n") + 1)
        except FileNotFoundError:
            pass

    def done_ids(self) -> Iterator[list[str]]:
        """Ids already embedded or failed, in chunks (for skipping them on resume)."""
        for shard in self.manifest["shards"]:
            yield np.load(os.path.join(self.folder, shard["ids"])).tolist()
        yield [r["id"] for r in read_failures(self._failures_file)]

    # -- results
    def add(self, ids: list[str], embeddings: np.ndarray) -> None:
        self._ids.extend(ids)
        self._embs.append(np.asarray(embeddings, dtype=np.float32))
        self.embedded += len(ids)
        self.new_embedded += len(ids)
        if len(self._ids) >= self.shard_size:
            self.commit()

    def fail(self, id_: str, reason: str) -> None:
        line = json.dumps({"id": id_, "reason": reason}) + "\n"
        self._failures.write(line.encode("utf-8", "surrogateescape"))
        self._failures.flush()  # survives kill -9; fsync at each commit for power loss
        self.failed += 1
        self.new_failed += 1

    def tick(self) -> None:
        """Commit a partial shard when the last commit is `flush_seconds` old."""
        if self._ids and time.monotonic() - self._last_commit >= self.flush_seconds:
            self.commit()

    def commit(self) -> None:
        """Make every result so far durable: a new shard, fsynced, then the manifest."""
        os.fsync(self._failures.fileno())
        self._last_commit = time.monotonic()
        if not self._ids:
            return
        n = len(self.manifest["shards"])
        names = {"embeddings": f"embeddings-{n:05d}.npy", "ids": f"ids-{n:05d}.npy"}
        emb = np.concatenate(self._embs)
        ids = np.array(self._ids, dtype=str)
        _atomic_write(os.path.join(self.folder, names["embeddings"]), lambda f: np.save(f, emb))
        _atomic_write(os.path.join(self.folder, names["ids"]), lambda f: np.save(f, ids))
        _fsync_dir(self.folder)
        self.manifest["shards"].append({**names, "count": len(ids)})
        self._ids, self._embs = [], []
        self._write_manifest()

    def _write_manifest(self) -> None:
        self.manifest.update(count=self.embedded, failures=self.failed,
                             updated=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        _write_json(os.path.join(self.folder, MANIFEST), self.manifest)

    def close(self, complete: bool) -> None:
        """Commit what is pending; `complete` records that every input was accounted for."""
        if self._failures is None:
            return
        self.commit()
        self.manifest["complete"] = complete
        self._write_manifest()
        self._failures.close()
        self._failures = None
        self._unlock()


class NpzOutput(_HoldsLock):
    """`OUT.npz` written through the sharded work folder `OUT.npz.partial/`."""

    def __init__(self, path: str, meta: dict, shard_size: int = 10000,
                 flush_seconds: float = 60.0):
        self.path = path
        self.store = ShardStore(work_dir(path), meta, shard_size, flush_seconds, lock=False)
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
                    if name.endswith((".npy", ".tmp")) or name == FAILURES:
                        os.unlink(os.path.join(folder, name))
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
        Its shard is written into the (locked, empty) work folder and the manifest last,
        so an import cut short leaves no manifest: the next run imports again."""
        try:
            with np.load(self.path) as z:
                ids, emb = z["ids"], z["embeddings"]
                meta = json.loads(str(z["meta"])) if "meta" in z else {}
        except Exception as e:
            raise OutputError(f"{self.path} exists but is not a readable embeddings .npz "
                              f"({e}); choose another --output") from None
        folder = self.store.folder
        for key in COMPATIBLE_KEYS:
            if key in meta and key in self.store.meta and meta[key] != self.store.meta[key]:
                raise OutputError(f"{self.path} was written with {key}={meta[key]!r} but this "
                                  f"run has {key}={self.store.meta[key]!r}; use another --output")
        shards = []
        if len(ids):
            _atomic_write(os.path.join(folder, "embeddings-00000.npy"), lambda f: np.save(f, emb))
            _atomic_write(os.path.join(folder, "ids-00000.npy"), lambda f: np.save(f, ids))
            shards = [{"embeddings": "embeddings-00000.npy", "ids": "ids-00000.npy",
                       "count": len(ids)}]
        if os.path.exists(failures_path(self.path)):
            src = failures_path(self.path)

            def copy(f) -> None:
                with open(src, "rb") as g:
                    shutil.copyfileobj(g, f)
            _atomic_write(os.path.join(folder, FAILURES), copy)
        _fsync_dir(folder)
        _write_json(os.path.join(folder, MANIFEST),
                    {"format": FORMAT, "version": VERSION, **meta, "shards": shards})
        self._imported = True

    def finalize(self) -> None:
        """Assemble the .npz and its failures file atomically, then drop the work folder."""
        store = self.store
        store.close(complete=True)
        unchanged = self._imported and store.new_embedded == 0 and store.new_failed == 0
        if not unchanged:
            ids, emb = load_embeddings(store.folder)
            meta = np.array(json.dumps({k: v for k, v in store.manifest.items() if k != "shards"}))
            _atomic_write(self.path, lambda f: np.savez(f, ids=ids, embeddings=emb, meta=meta))
            src = os.path.join(store.folder, FAILURES)

            def copy(f) -> None:
                with open(src, "rb") as g:
                    shutil.copyfileobj(g, f)
            _atomic_write(failures_path(self.path), copy)
            _fsync_dir(os.path.dirname(os.path.abspath(self.path)))
        # Rename first: a crash during the removal must not leave a half-deleted work
        # folder that a rerun would mistake for an unfinished run.
        trash = f"{store.folder}.done-{os.getpid()}"
        os.replace(store.folder, trash)
        shutil.rmtree(trash, ignore_errors=True)
        self._unlock()
