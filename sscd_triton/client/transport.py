"""Sending batches to Triton so that every item ends exactly once in a result or a failure.

The pieces live in modules of their own, re-exported here: `client.errors` (what an error
means), `client.endpoints` (servers in rotation, give-up), `client.shm` (shared memory).
This module holds the sender policy.

`Sender.send(items)`: one request per batch. What happens on an error (kinds: errors.py):

- RETRY (no answer: connection, timeout, a server stopping or loading): the endpoint
  leaves rotation, the request tries again (maybe elsewhere). All servers silent for
  `give_up_after` s: `NoAnswer`, a GiveUp (`TimedOut` when the last tries timed out;
  exit 3, resumable). A request that keeps getting no answer
  while the servers answer others (`lost_tries` times: a request that kills its server)
  is split like a rejected one, and alone it fails.
- BUSY ("Exceeds maximum queue size"): the queue bound working. The request backs off
  with jitter (0.05 s doubling to 2 s, times 0.5-1.5; waiting requests are not in flight,
  which lowers the pressure), the endpoint stays in rotation, and it counts as an answer.
  Bounded by `busy_for` seconds: then the run stops with `Overloaded`, a GiveUp (exit 3,
  resumable): an overloaded server says nothing about the images, so no failure is
  recorded.
- BATCH (DALI: one corrupt image fails the whole batch DALI ran): the request is split
  into `parts` parts, each sent on, and so on, until the bad image stands alone; a lone
  image failing is re-checked `rechecks` (2) more times after a short jitter (a
  transient error is not a verdict) and fails only when every try failed. It runs beside
  the rest of the run: each bad image costs a few requests of its own (about `parts` x
  log_parts(batch size), plus the re-checks), no pass at the end.
  `batch_mates=True` (the default, safe for any server): the DALI model may batch
  requests together (dynamic batching), so the error may have been another request's
  image. The request is first re-sent whole once if `retry_whole`, after a jitter (so
  that the requests of the failed batch do not meet again), and re-sends go one at a
  time (the "suspect lane": two suspects in one formed batch would fail each other).
  That lane serialises isolation, one server round trip per suspect send: a ceiling on
  the corrupt files a second a run absorbs (benchmarks/isolation.py measures it).
  `batch_mates=False`: the server runs each request as its own DALI batch (this
  project's gpu repository: `sscd_preprocess` has no dynamic batcher), so an error is
  the request's own: no whole re-send, no lane, a tenth of the jitter before the parts
  (against lockstep, should the server batch them after all). That is the config's
  word, maybe another server's (one address, a rolling upgrade): a failed
  request whose parts all pass, or a lone image that fails then passes, shows requests
  batched together after all, and the Sender switches to `batch_mates=True` for good.
- REJECT (INVALID_ARGUMENT "bad image: ...", a per-request verdict): split at the row
  the server names ("item N of the request") when it does, else in halves; alone, the
  verdict is final.
- ERROR (INTERNAL, ...): like BATCH (split, then re-checks alone).
- SHM: registrations lost (a restarted server): registered again and re-sent.
"""
from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from sscd_triton.client.endpoints import Endpoint, Endpoints, make_client  # noqa: F401  (re-exported)
from sscd_triton.client.errors import (BATCH, BUSY, ERROR, REJECT, RESTRICTED, RETRY, SHM,  # noqa: F401
                           Fatal, GiveUp, NoAnswer, Overloaded, TimedOut, answered,
                           classify, clean_message, restricted, split, status_name)
from sscd_triton.client.errors import MAX_ROWS as _MAX_ROWS
from sscd_triton.client.shm import SHM_PREFIX, ShmSlots, remove_stale_regions  # noqa: F401
from sscd_triton import images, spec


@dataclass
class Item:
    id: str
    payload: Any  # bytes (server preprocessing) or float32 [3, H, W] (client preprocessing)
    size: int
    alone: bool = False  # send in a request of its own (unpadded): see images.looks_complete
    key: Any = None  # only items of equal key share a request (their tensor shape)


@dataclass
class Rejection:
    kind: str  # REJECT or ERROR
    message: str


def build_array(payloads: list) -> np.ndarray:
    """uint8 [B, L] zero-padded rows from bytes (`images.pack_rows`), or float32
    [B, 3, H, W] from tensors."""
    if isinstance(payloads[0], (bytes, bytearray, memoryview)):
        return images.pack_rows(payloads)
    return np.stack(payloads).astype(np.float32, copy=False)


class Sender:
    """Sends batches and delivers every item to exactly one of `on_result` / `on_failure`."""

    def __init__(self, endpoints: Endpoints, model: str, input_name: str, dims: int,
                 on_result: Callable[[list[str], np.ndarray], None],
                 on_failure: Callable[[str, str], None], timeout: float = 300.0,
                 slots: ShmSlots | None = None, rechecks: int = 2,
                 headers: dict | None = None, retry_whole: bool = True,
                 jitter: float = 0.05, busy: tuple[float, float] = (0.05, 2.0),
                 busy_for: float | None = None, lost_tries: int = 5, parts: int = 4,
                 batch_mates: bool = True, log: Callable[[str], None] | None = None):
        self.endpoints = endpoints
        self.model = model
        self.input_name = input_name
        self.dims = dims
        self.on_result = on_result
        self.on_failure = on_failure
        self.timeout = timeout
        self.slots = slots
        # Two: a lone image can be failed by a batch-mate's corrupt image (or a transient
        # error) twice running, above all before a server that batches requests is found
        # out (_batch_mates_after_all).
        self.rechecks = rechecks
        self.headers = headers
        self._retry_whole = retry_whole
        self.jitter = jitter
        self.busy = busy
        self.busy_for = timeout if busy_for is None else busy_for
        self.lost_tries = lost_tries
        self.parts = parts
        self.log = log
        self._set_batch_mates(batch_mates)
        self.max_rows = 0  # learnt from the server when its config could not be read
        self.requests = 0
        self.splits = 0
        self.rechecked = 0
        self.busy_answers = 0

    def _set_batch_mates(self, batch_mates: bool) -> None:
        self.batch_mates = batch_mates
        self.retry_whole = self._retry_whole and batch_mates
        # Re-sends after a batch error go one at a time (beside the fresh requests) where
        # the server may batch them together: two suspects in one formed batch would fail
        # each other. The jitter before each is taken outside the lane.
        self._suspects = asyncio.Semaphore(1) if batch_mates else None

    def _batch_mates_after_all(self, why: str) -> None:
        """Evidence that the server's DALI batches requests together although its config
        said otherwise (a server behind the same address that was not checked, e.g. during
        a rolling upgrade): isolate the safe way from now on."""
        if self.batch_mates:
            return
        self._set_batch_mates(True)
        if self.log:
            self.log(f"note: {why}: the server batches requests together in DALI after all; "
                     "isolating corrupt files one suspect at a time from now on")

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
                    # any answer (a rejection, a DALI batch error, a full queue): the
                    # server is done with the regions; only no answer keeps them in use
                    in_use = not answered(e)
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
        """One request for `items`, retried across endpoints until a server gives a
        verdict, within bounds (see the module docstring)."""
        arr = build_array([i.payload for i in items])
        loop = asyncio.get_running_loop()
        started = loop.time()
        shm_tries = busy = lost = 0
        while True:
            ep = await self.endpoints.pick()
            sent_at = loop.time()
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
                if kind == BUSY:
                    await self.endpoints.report(ep, True)
                    busy += 1
                    self.busy_answers += 1
                    waited = loop.time() - started
                    if waited >= self.busy_for:
                        return Rejection(BUSY, f"the server stayed overloaded ({busy} tries over "
                                               f"{waited:.0f}s): {clean_message(e)}")
                    base, cap = self.busy
                    await asyncio.sleep(min(cap, base * 2 ** (busy - 1)) * random.uniform(0.5, 1.5))
                    continue
                if kind in (RETRY, SHM):
                    if self.slots is not None:
                        self.slots.forget(ep.url)  # a restarted server forgets regions
                    await self.endpoints.report(ep, False, e)
                    if self.endpoints.last_answer > sent_at:  # others got answers meanwhile
                        lost += 1
                        if lost >= self.lost_tries:
                            return Rejection(RETRY, f"no answer in {lost} tries while the server "
                                                    f"answered others: {clean_message(e)}")
                    continue
                await self.endpoints.report(ep, True)
                return Rejection(kind, clean_message(e))
            except BaseException:  # cancelled, or a bug: no verdict on the server
                self.endpoints.release(ep)
                raise
            await self.endpoints.report(ep, True)
            return emb

    async def _pause(self, n: int) -> None:
        """Jitter before re-sending after a batch error: the requests of one failed formed
        batch got the error at the same moment and must not be batched together again."""
        await asyncio.sleep(self.jitter * 2 ** n * random.uniform(0.2, 1.8))

    async def _attempt_suspect(self, items: list[Item], n: int) -> np.ndarray | Rejection:
        await self._pause(n)
        if self._suspects is None:
            return await self.attempt(items)
        async with self._suspects:
            return await self.attempt(items)

    async def send(self, items: list[Item], whole: bool = False, suspect: bool = False) -> bool:
        """Deliver every item of `items` to `on_result` or `on_failure`; True when any of
        them was recorded as a failure.
        `whole`: `items` already failed together with a batch error and was re-sent."""
        if self.max_rows and len(items) > self.max_rows:
            failed = False
            for k in range(0, len(items), self.max_rows):
                failed |= await self.send(items[k:k + self.max_rows])
            return failed
        if suspect and self._suspects is None:
            # Without batch-mates a part of a failed request needs no lane, and only a
            # tenth of the jitter: enough that the parts of two failed requests do not
            # move in lockstep should the server batch them together after all.
            await asyncio.sleep(self.jitter * 0.1 * random.uniform(0.2, 1.8))
            suspect = False
        outcome = await (self._attempt_suspect(items, 0) if suspect else self.attempt(items))
        if isinstance(outcome, np.ndarray):
            self.on_result([i.id for i in items], outcome)
            return False
        cap = _MAX_ROWS.search(outcome.message)
        if cap and 1 <= int(cap.group(1)) < len(items):  # the model's max_batch_size
            self.max_rows = int(cap.group(1))
            return await self.send(items)
        if outcome.kind == BUSY:  # overloaded past the bound: no verdict on the images, so
            raise Overloaded(outcome.message)  # none is recorded; the run stops resumable (exit 3)
        batch_error = outcome.kind in (BATCH, ERROR)
        if len(items) > 1:
            if batch_error and self.retry_whole and not whole:  # most likely a batch-mate's
                return await self.send(items, whole=True, suspect=True)
            self.splits += 1
            if not batch_error:  # at the row the server names, else in halves
                parts = split(items, outcome.message)
            else:  # a few parts: fewer rounds, each of which fails a batch
                k = -(-len(items) // min(self.parts, len(items)))
                parts = [items[i:i + k] for i in range(0, len(items), k)]
            failed = False
            for part in parts:
                failed |= await self.send(part, whole=True, suspect=batch_error)
            if outcome.kind == BATCH and not failed:
                self._batch_mates_after_all("a request failed with a DALI error and every "
                                            "part of it then passed")
            return failed
        tries, first = 1, outcome.kind
        while first not in (REJECT, RETRY) and tries <= self.rechecks:
            self.rechecked += 1
            outcome = await self._attempt_suspect(items, tries - 1)
            tries += 1
            if isinstance(outcome, np.ndarray):
                self.on_result([items[0].id], outcome)
                if first == BATCH:
                    self._batch_mates_after_all("a lone image failed with a DALI error, "
                                                "then passed")
                return False
            if outcome.kind == BUSY:
                raise Overloaded(outcome.message)
            if outcome.kind in (REJECT, RETRY):
                break
        self.on_failure(items[0].id, reason(outcome, tries))
        return True


def reason(r: Rejection, tries: int) -> str:
    """A failure reason for a person, from the server's message."""
    msg = r.message
    if r.kind == REJECT:
        msg = msg[len(spec.BAD_IMAGE_PREFIX):] if msg.startswith(spec.BAD_IMAGE_PREFIX) else msg
        return f"the server rejected it as a bad image: {msg}"
    if r.kind == RETRY:
        return f"the server never answered for it: {msg}"
    if r.kind == BATCH:
        return f"the server failed on it, alone ({tries} tries): {msg}"
    return f"the server failed on it ({tries} tries): {msg}"
