"""Talking to Triton: endpoints in rotation, retries with backoff, rejected-batch splitting,
system shared memory.

- `Endpoints`: one reused `tritonclient.grpc.aio` client per URL. A request failing
  with UNAVAILABLE / DEADLINE_EXCEEDED / a connection error takes its endpoint out of
  rotation for an exponential backoff with jitter (0.5 s doubling to 10 s, times 0.5-1.5);
  then one request probes it again. When no endpoint has answered anything for
  `give_up_after` seconds, `GiveUp` is raised.
- `Sender.send(items)`: one request per batch. INVALID_ARGUMENT ("bad image: ...") means
  an input is at fault: the batch is split (at the row the server names when it does,
  else in halves) until the bad input stands alone. Other server errors (INTERNAL...)
  split the same way. Errors of a server that is stopping or loading its models count as
  transport trouble.
- A lone input that still fails gets a verdict only once it is confirmed in isolation:
  the gpu target (DALI) fails a whole dynamically formed batch for one bad image, so a
  good input batched beside a bad one gets the bad one's error, again and again while
  other requests are in flight. With `defer=True` (embed.py) such inputs are set aside
  (`deferred`, ids only) and re-checked at the end of the run one at a time with nothing
  else in flight (`pipeline.run`): a rejection is final after one confirming retry, any
  other error after 5 tries over ~15 s. Only a row the server itself named ("item N of
  the request", a per-request verdict) and rejected again alone is final at once.
- `ShmSlots`: with `--shared-memory system`, one input and one output region per request
  slot, registered lazily with each server and again after it restarts. A slot whose
  request ended without a clean answer (timeout, lost connection, cancellation) is
  retired, never reused: the server may still read or write its regions.
"""
from __future__ import annotations

import asyncio
import os
import random
import re
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from tritonclient.utils import InferenceServerException

from sscd_triton import spec

RETRY = "retry"  # transport trouble: another try, maybe elsewhere, after a backoff
REJECT = "reject"  # the input is at fault (INVALID_ARGUMENT)
ERROR = "error"  # the server failed on this request for another reason
SHM = "shm"  # the server lost our shared-memory registration (it restarted)
RESTRICTED = "restricted"  # the API needs a header (--grpc-restricted-protocol): --header

_RETRY_CODES = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED",
                "CANCELLED", "UNKNOWN"}
# Messages of a server that is stopping, restarting or loading: not the input's fault.
_SERVER_STATE = ("unknown model", "no available versions", "not ready", "is stopping",
                 "stopped accepting", "shutting down", "stub process is not healthy",
                 "socket closed", "connection reset")
_ITEM = re.compile(r"\bitem (\d+) of the request\b")
_MAX_ROWS = re.compile(r"batch-size must be <= (\d+)")
_MAX_GRPC = 2 ** 31 - 1


class GiveUp(Exception):
    """No server answered for the allowed time."""


class Fatal(Exception):
    """A condition retrying cannot fix (unknown model, unusable shared memory)."""


def restricted(url: str, e: BaseException) -> Fatal:
    return Fatal(f"the server at {url} restricts this API ({clean_message(e)}); pass the "
                 "header it expects with --header NAME=VALUE")


def status_name(e: BaseException) -> str:
    status = e.status() if isinstance(e, InferenceServerException) else None
    return str(status or "").replace("StatusCode.", "")


def classify(e: BaseException) -> str:
    if not isinstance(e, InferenceServerException):
        return RETRY  # OSError: connection-level trouble surfacing as another type
    status, message = status_name(e), (e.message() or "").lower()
    if "protocol is restricted" in message:  # sent as UNAVAILABLE, but retrying cannot help
        return RESTRICTED
    if status in _RETRY_CODES or not status or any(m in message for m in _SERVER_STATE):
        return RETRY
    if "shared memory" in message:
        return SHM
    if status == "INVALID_ARGUMENT":
        return REJECT
    return ERROR


def clean_message(e: BaseException) -> str:
    msg = e.message() if isinstance(e, InferenceServerException) else str(e)
    msg = re.sub(r"^in ensemble '[^']*', ", "", (msg or str(e)).strip())
    return msg


def split(items: list, message: str) -> list[list]:
    """Parts of a rejected batch: around the row the server names, else two halves."""
    m = _ITEM.search(message)
    if m and 0 <= int(m.group(1)) < len(items):
        i = int(m.group(1))
        return [p for p in (items[:i], items[i:i + 1], items[i + 1:]) if p]
    half = len(items) // 2
    return [items[:half], items[half:]]


def make_client(url: str) -> grpcaio.InferenceServerClient:
    """An aio client whose channel reconnects within seconds after a server restart
    (gRPC's default reconnect backoff grows to 120 s)."""
    return grpcaio.InferenceServerClient(url, channel_args=[
        ("grpc.max_send_message_length", _MAX_GRPC),
        ("grpc.max_receive_message_length", _MAX_GRPC),
        ("grpc.initial_reconnect_backoff_ms", 250),
        ("grpc.min_reconnect_backoff_ms", 250),
        ("grpc.max_reconnect_backoff_ms", 2000),
        ("grpc.keepalive_time_ms", 30000),
        ("grpc.keepalive_timeout_ms", 10000),
    ])


class Endpoint:
    def __init__(self, url: str, client: Any):
        self.url = url
        self.client = client
        self.up = True  # optimistic until a request says otherwise
        self.fails = 0  # consecutive transport failures
        self.retry_at = 0.0
        self.probing = False
        self.inflight = 0
        self.picks = 0
        self.last_error = ""


class Endpoints:
    def __init__(self, urls: list[str], give_up_after: float = 120.0,
                 backoff: tuple[float, float] = (0.5, 10.0),
                 client_factory: Callable[[str], Any] = make_client,
                 on_change: Callable[[str], None] | None = None):
        self.all = [Endpoint(u, client_factory(u)) for u in urls]
        self.give_up_after = give_up_after
        self.backoff = backoff
        self.on_change = on_change or (lambda message: None)
        self._cond = asyncio.Condition()
        self.last_answer = asyncio.get_running_loop().time()
        self._last_note = self.last_answer

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    async def pick(self) -> Endpoint:
        """An endpoint to send to: a down one whose backoff is over (as a probe), else the
        least loaded up one; waits while none can be tried; raises GiveUp."""
        async with self._cond:
            while True:
                now = self._now()
                due = [e for e in self.all if not e.up and not e.probing and e.retry_at <= now]
                if due:
                    ep = due[0]
                    ep.probing = True
                else:
                    up = [e for e in self.all if e.up]
                    ep = min(up, key=lambda e: (e.inflight, e.picks)) if up else None
                if ep is not None:
                    ep.inflight += 1
                    ep.picks += 1
                    return ep
                deadline = self.last_answer + self.give_up_after
                if now >= deadline:
                    raise GiveUp(self.describe_down())
                waits = [e.retry_at for e in self.all if not e.probing]
                until = min(waits + [deadline])
                try:
                    await asyncio.wait_for(self._cond.wait(), max(0.01, until - now))
                except asyncio.TimeoutError:
                    pass

    async def report(self, ep: Endpoint, ok: bool, error: BaseException | None = None) -> None:
        """The outcome of one picked request: `ok` when the server answered (even with
        an error about the input), False for transport trouble."""
        async with self._cond:
            ep.inflight -= 1
            ep.probing = False
            now = self._now()
            if ok:
                if not ep.up:
                    self.on_change(f"{ep.url} answers again")
                ep.up, ep.fails = True, 0
                self.last_answer = max(self.last_answer, now)
            else:
                ep.fails += 1
                ep.last_error = clean_message(error) if error is not None else "no answer"
                base, cap = self.backoff
                delay = min(cap, base * 2 ** (ep.fails - 1)) * random.uniform(0.5, 1.5)
                ep.retry_at = now + delay
                if ep.up:
                    self.on_change(f"{ep.url} out of rotation ({status_name(error) or 'error'}: "
                                   f"{ep.last_error[:120]}); retrying in {delay:.1f}s")
                elif not any(e.up for e in self.all) and now - self._last_note >= 10:
                    self._last_note = now
                    self.on_change(f"no server has answered for {now - self.last_answer:.0f}s "
                                   f"(giving up after {self.give_up_after:g}s); retrying")
                ep.up = False
            self._cond.notify_all()

    def release(self, ep: Endpoint) -> None:
        """Undo a pick whose request was cancelled (no verdict on the server)."""
        ep.inflight -= 1
        ep.probing = False

    def describe_down(self) -> str:
        parts = [f"{e.url} ({e.last_error or 'no answer'})" for e in self.all]
        return (f"no server answered for {self.give_up_after:g}s: " + "; ".join(parts))

    async def close(self) -> None:
        for e in self.all:
            try:
                await e.client.close()
            except Exception:
                pass


# --- shared memory ----------------------------------------------------------------------

SHM_PREFIX = "sscd_embed_"
_REGION = re.compile(re.escape(SHM_PREFIX) + r"(\d+)_[0-9a-f]{6}_\d+_\d+_(?:in|out)")


def remove_stale_regions(folder: str = "/dev/shm") -> list[str]:
    """Remove regions that a killed embed.py left behind: names of this tool's pattern
    whose process (the pid in the name) no longer exists. Returns the names removed."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m = _REGION.fullmatch(name)
        if not m:
            continue
        pid = int(m.group(1))
        try:
            os.kill(pid, 0)
            continue  # alive: in use
        except ProcessLookupError:
            pass
        except OSError:  # (PermissionError) alive, another user's
            continue
        try:
            os.unlink(os.path.join(folder, name))
            removed.append(name)
        except OSError:
            pass
    return removed


class _Slot:
    def __init__(self, index: int):
        self.index = index
        self.gen = 0
        self.regions: dict[str, tuple[str, Any, int]] = {}  # "in"/"out" -> (name, handle, size)
        self.registered: set[str] = set()  # urls holding the current regions


class ShmSlots:
    """Request slots with system shared-memory regions (inputs and outputs).

    Regions grow (to a power of two) when a request needs more; a grown region is a new
    one, registered again. Only for servers on this host: they map the same /dev/shm.
    """

    def __init__(self, count: int, prefix: str | None = None, headers: dict | None = None):
        from tritonclient.utils import shared_memory as shm

        self.headers = headers

        self.shm = shm
        if prefix is None:
            remove_stale_regions()
            prefix = f"{SHM_PREFIX}{os.getpid()}_{random.getrandbits(24):06x}"
        self.prefix = prefix
        self._free: asyncio.Queue = asyncio.Queue()
        self._slots = [_Slot(i) for i in range(count)]
        self._retired: list[tuple[str, set[str]]] = []  # (region name, urls holding it)
        for s in self._slots:
            self._free.put_nowait(s)

    async def acquire(self) -> _Slot:
        return await self._free.get()

    def release(self, slot: _Slot) -> None:
        self._free.put_nowait(slot)

    def retire(self, slot: _Slot) -> None:
        """Never reuse `slot`'s regions: its request ended without a clean answer (timeout,
        lost connection, cancellation), so a server may still read the input or write the
        output there, into the next request's data. Our mappings are destroyed (the names
        unlinked; a server's own mapping stays valid until it unregisters), the names are
        unregistered at `close`, and a fresh slot with new names takes its place."""
        for name, handle, _ in slot.regions.values():
            if slot.registered:
                self._retired.append((name, set(slot.registered)))
            try:
                self.shm.destroy_shared_memory_region(handle)
            except Exception:
                pass
        fresh = _Slot(slot.index)
        fresh.gen = slot.gen  # `prepare` counts on: the new regions get new names
        self._slots[slot.index] = fresh
        self._free.put_nowait(fresh)

    def forget(self, url: str) -> None:
        """The server at `url` lost its registrations (restart): register again on use."""
        for s in self._slots:
            s.registered.discard(url)

    async def _unregister_everywhere(self, slot: _Slot, endpoints: list[Endpoint]) -> None:
        for ep in endpoints:
            if ep.url in slot.registered:
                for name, _, _ in slot.regions.values():
                    try:
                        await ep.client.unregister_system_shared_memory(name, headers=self.headers)
                    except Exception:
                        pass
        slot.registered.clear()

    async def prepare(self, slot: _Slot, ep: Endpoint, endpoints: list[Endpoint],
                      in_bytes: int, out_bytes: int) -> None:
        """Make the slot's regions big enough and registered with `ep`'s server."""
        need = {"in": in_bytes, "out": out_bytes}
        if any(k not in slot.regions or slot.regions[k][2] < n for k, n in need.items()):
            await self._unregister_everywhere(slot, endpoints)
            for _, handle, _ in slot.regions.values():
                self.shm.destroy_shared_memory_region(handle)
            slot.gen += 1
            slot.regions = {}
            for kind, n in need.items():
                size = max(1 << 16, 1 << (max(n, 1) - 1).bit_length())
                name = f"{self.prefix}_{slot.index}_{slot.gen}_{kind}"
                handle = self.shm.create_shared_memory_region(name, "/" + name, size)
                slot.regions[kind] = (name, handle, size)
        if ep.url not in slot.registered:
            for name, _, size in slot.regions.values():
                try:
                    await ep.client.unregister_system_shared_memory(name, headers=self.headers)
                except Exception:
                    pass
                try:
                    await ep.client.register_system_shared_memory(name, "/" + name, size,
                                                                   headers=self.headers)
                except InferenceServerException as e:
                    if classify(e) == RETRY:
                        raise
                    if classify(e) == RESTRICTED:
                        raise restricted(ep.url, e) from None
                    raise Fatal(f"--shared-memory system: the server at {ep.url} cannot map "
                                f"/dev/shm/{name} ({clean_message(e)}); shared memory only "
                                "works with a server on this host") from None
            slot.registered.add(ep.url)

    async def close(self, endpoints: list[Endpoint]) -> None:
        for name, urls in self._retired:
            for ep in endpoints:
                if ep.url in urls:
                    try:
                        await asyncio.wait_for(ep.client.unregister_system_shared_memory(
                            name, headers=self.headers), 5)
                    except (Exception, asyncio.TimeoutError):
                        pass
        self._retired = []
        for slot in self._slots:
            try:
                await asyncio.wait_for(self._unregister_everywhere(slot, endpoints), 5)
            except (Exception, asyncio.TimeoutError):
                pass
            for _, handle, _ in slot.regions.values():
                try:
                    self.shm.destroy_shared_memory_region(handle)
                except Exception:
                    pass
            slot.regions = {}


# --- requests ---------------------------------------------------------------------------

@dataclass
class Item:
    id: str
    payload: Any  # bytes (server preprocessing) or float32 [3, H, W] (client preprocessing)
    size: int
    alone: bool = False  # send in a request of its own (unpadded): see sources.looks_complete
    key: Any = None  # only items of equal key share a request (their tensor shape)


@dataclass
class Rejection:
    kind: str  # REJECT or ERROR
    message: str


def build_array(payloads: list) -> np.ndarray:
    """uint8 [B, L] zero-padded rows from bytes, or float32 [B, 3, H, W] from tensors."""
    if isinstance(payloads[0], (bytes, bytearray, memoryview)):
        arr = np.zeros((len(payloads), max(len(p) for p in payloads)), np.uint8)
        for i, p in enumerate(payloads):
            arr[i, :len(p)] = np.frombuffer(p, np.uint8)
        return arr
    return np.stack(payloads).astype(np.float32, copy=False)


class Sender:
    """Sends batches and delivers every item to exactly one of `on_result` / `on_failure`."""

    def __init__(self, endpoints: Endpoints, model: str, input_name: str, dims: int,
                 on_result: Callable[[list[str], np.ndarray], None],
                 on_failure: Callable[[str, str], None], timeout: float = 300.0,
                 slots: ShmSlots | None = None, reject_retries: int = 1,
                 error_retries: int = 4, headers: dict | None = None, defer: bool = False):
        self.endpoints = endpoints
        self.model = model
        self.input_name = input_name
        self.dims = dims
        self.on_result = on_result
        self.on_failure = on_failure
        self.timeout = timeout
        self.slots = slots
        self.reject_retries = reject_retries
        self.error_retries = error_retries
        self.headers = headers
        # Set lone failures aside (their ids) instead of judging them while other requests
        # are in flight; `take_deferred` hands them over for the re-check in isolation.
        self.defer = defer
        self.deferred: list[str] = []
        self.max_rows = 0  # learnt from the server when its config could not be read
        self.requests = 0
        self.splits = 0

    async def _infer(self, ep: Endpoint, arr: np.ndarray) -> np.ndarray:
        dtype = "UINT8" if arr.dtype == np.uint8 else "FP32"
        inp = grpcclient.InferInput(self.input_name, list(arr.shape), dtype)
        out = grpcclient.InferRequestedOutput(spec.OUTPUT_NAME)
        self.requests += 1
        if self.slots is None:
            inp.set_data_from_numpy(arr)
            result = await ep.client.infer(self.model, [inp], outputs=[out],
                                           client_timeout=self.timeout, headers=self.headers)
            emb = result.as_numpy(spec.OUTPUT_NAME)
        else:
            out_bytes = len(arr) * self.dims * 4
            slot = await self.slots.acquire()
            in_use = False  # a request on the slot's regions may still run on a server
            try:
                await self.slots.prepare(slot, ep, self.endpoints.all, arr.nbytes, out_bytes)
                in_name, in_handle, _ = slot.regions["in"]
                out_name, out_handle, _ = slot.regions["out"]
                self.slots.shm.set_shared_memory_region(in_handle, [arr])
                inp.set_shared_memory(in_name, arr.nbytes)
                out.set_shared_memory(out_name, out_bytes)
                in_use = True
                try:
                    await ep.client.infer(self.model, [inp], outputs=[out],
                                          client_timeout=self.timeout, headers=self.headers)
                except InferenceServerException as e:
                    # a clean answer refusing the request: the server is done with it
                    in_use = classify(e) not in (REJECT, SHM, RESTRICTED)
                    raise
                in_use = False
                emb = np.array(self.slots.shm.get_contents_as_numpy(
                    out_handle, np.float32, [len(arr), self.dims]))
            finally:
                if in_use:
                    self.slots.retire(slot)
                else:
                    self.slots.release(slot)
        if emb is None or emb.shape != (len(arr), self.dims):
            raise InferenceServerException(
                f"the server returned {None if emb is None else emb.shape} descriptors for "
                f"{len(arr)} inputs, expected ({len(arr)}, {self.dims})",
                status="StatusCode.INTERNAL")
        return emb.astype(np.float32, copy=False)

    async def attempt(self, items: list[Item]) -> np.ndarray | Rejection:
        """One request for `items`, retried across endpoints until a server answers."""
        arr = build_array([i.payload for i in items])
        shm_tries = 0
        while True:
            ep = await self.endpoints.pick()
            try:
                emb = await self._infer(ep, arr)
            except Fatal:
                await self.endpoints.report(ep, True)
                raise
            except (InferenceServerException, OSError) as e:
                kind = classify(e)
                if kind == RESTRICTED:
                    await self.endpoints.report(ep, True)
                    raise restricted(ep.url, e) from None
                if kind == SHM and self.slots is not None and shm_tries < 3:
                    shm_tries += 1
                    self.slots.forget(ep.url)
                    await self.endpoints.report(ep, True)
                    continue
                if kind in (RETRY, SHM):
                    if self.slots is not None:
                        self.slots.forget(ep.url)  # a restarted server forgets regions
                    await self.endpoints.report(ep, False, e)
                    continue
                await self.endpoints.report(ep, True)
                return Rejection(kind, clean_message(e))
            except BaseException:  # cancelled, or a bug: no verdict on the server
                self.endpoints.release(ep)
                raise
            await self.endpoints.report(ep, True)
            return emb

    async def send(self, items: list[Item], named: bool = False) -> None:
        """Deliver every item of `items` to `on_result`, `on_failure` or `deferred`.
        `named`: `items` is the one row a server named in a rejected request of several."""
        if self.max_rows and len(items) > self.max_rows:
            for k in range(0, len(items), self.max_rows):
                await self.send(items[k:k + self.max_rows])
            return
        outcome = await self.attempt(items)
        if isinstance(outcome, np.ndarray):
            self.on_result([i.id for i in items], outcome)
            return
        cap = _MAX_ROWS.search(outcome.message)
        if cap and 1 <= int(cap.group(1)) < len(items):  # the model's max_batch_size
            self.max_rows = int(cap.group(1))
            await self.send(items)
            return
        if len(items) > 1:
            self.splits += 1
            m = _ITEM.search(outcome.message) if outcome.kind == REJECT else None
            bad = items[int(m.group(1))] if m and int(m.group(1)) < len(items) else None
            for part in split(items, outcome.message):
                await self.send(part, named=len(part) == 1 and part[0] is bad)
            return
        if outcome.kind == REJECT and named:  # rejected by row, then alone: confirmed
            self.on_failure(items[0].id, reason(outcome, 2))
            return
        if self.defer:  # maybe a batch-mate's error (DALI): re-checked alone at the end
            self.deferred.append(items[0].id)
            return
        retries = self.reject_retries if outcome.kind == REJECT else self.error_retries
        for n in range(retries):
            if outcome.kind == ERROR:  # 1, 2, 4, 8 s: outlast a server hiccup
                await asyncio.sleep(2 ** n * random.uniform(0.5, 1.5))
            outcome = await self.attempt(items)
            if isinstance(outcome, np.ndarray):
                self.on_result([items[0].id], outcome)
                return
        self.on_failure(items[0].id, reason(outcome, 1 + retries))

    def take_deferred(self) -> list[str]:
        """The deferred ids, for re-sending one at a time with nothing else in flight;
        from now on every lone failure is judged at once."""
        ids, self.deferred, self.defer = self.deferred, [], False
        return ids


def reason(r: Rejection, tries: int) -> str:
    """A failure reason for a person, from the server's message."""
    msg = r.message
    if r.kind == REJECT:
        msg = msg[len(spec.BAD_IMAGE_PREFIX):] if msg.startswith(spec.BAD_IMAGE_PREFIX) else msg
        return f"the server rejected it as a bad image: {msg}"
    return f"the server failed on it ({tries} tries): {msg}"
