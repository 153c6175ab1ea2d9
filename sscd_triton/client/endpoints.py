"""Servers in rotation: one reused `tritonclient.grpc.aio` client per URL.

A request failing with no usable answer (see `errors.RETRY`) takes its endpoint out of
rotation for an exponential backoff with jitter (0.5 s doubling to 10 s, times 0.5-1.5);
then one request probes it again. Any answer (an embedding, a rejected image, a DALI
batch error, a full queue) keeps it in rotation. When no endpoint has answered anything
for `give_up_after` seconds, `errors.NoAnswer` (a GiveUp) is raised: `TimedOut` when
every endpoint's last failure was the request's own timeout.

No lock is held across an await: the event loop is single-threaded, and waiters sleep on
a shared future that `report` completes. (A `Condition.wait()` under `asyncio.wait_for`,
cancelled at the wrong moment, leaves a task re-acquiring a lock nobody releases, and
`asyncio.run` then waits for it forever at exit.)
"""
from __future__ import annotations

import asyncio
import random
from typing import Any, Callable

import tritonclient.grpc.aio as grpcaio

from sscd_triton.client.errors import NoAnswer, TimedOut, clean_message, status_name

_MAX_GRPC = 2 ** 31 - 1


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
        self.timed_out = False  # its last failure was the request's timeout


class Endpoints:
    def __init__(self, urls: list[str], give_up_after: float = 120.0,
                 backoff: tuple[float, float] = (0.5, 10.0),
                 client_factory: Callable[[str], Any] = make_client,
                 on_change: Callable[[str], None] | None = None):
        self.all = [Endpoint(u, client_factory(u)) for u in urls]
        self.give_up_after = give_up_after
        self.backoff = backoff
        self.on_change = on_change or (lambda message: None)
        self._changed: asyncio.Future | None = None
        self.last_answer = asyncio.get_running_loop().time()
        self._last_note = self.last_answer

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _notify(self) -> None:
        if self._changed is not None and not self._changed.done():
            self._changed.set_result(None)
        self._changed = None

    async def _wait_change(self, timeout: float) -> None:
        """Sleep until `report` or `release` changes something, or `timeout` passes.
        Cancelling the caller leaves nothing behind (the shared future is not awaited by
        a task of its own)."""
        if self._changed is None or self._changed.done():
            self._changed = asyncio.get_running_loop().create_future()
        await asyncio.wait([self._changed], timeout=timeout)

    async def pick(self) -> Endpoint:
        """An endpoint to send to: a down one whose backoff is over (as a probe), else the
        least loaded up one; waits while none can be tried; raises NoAnswer (TimedOut
        when every server's last try timed out)."""
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
                timed_out = all(e.timed_out for e in self.all)
                raise (TimedOut if timed_out else NoAnswer)(self.describe_down())
            waits = [e.retry_at for e in self.all if not e.probing]
            until = min(waits + [deadline])
            await self._wait_change(max(0.01, until - now))

    async def report(self, ep: Endpoint, ok: bool, error: BaseException | None = None) -> None:
        """The outcome of one picked request: `ok` when the server answered (even with
        an error about the input, a batch error or a full queue), False for transport
        trouble."""
        ep.inflight -= 1
        ep.probing = False
        now = self._now()
        if ok:
            if not ep.up:
                self.on_change(f"{ep.url} answers again")
            ep.up, ep.fails, ep.timed_out = True, 0, False
            self.last_answer = max(self.last_answer, now)
        else:
            ep.fails += 1
            ep.last_error = clean_message(error) if error is not None else "no answer"
            ep.timed_out = status_name(error) == "DEADLINE_EXCEEDED"
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
        self._notify()

    def release(self, ep: Endpoint) -> None:
        """Undo a pick whose request was cancelled (no verdict on the server)."""
        ep.inflight -= 1
        ep.probing = False
        self._notify()

    def describe_down(self) -> str:
        parts = [f"{e.url} ({e.last_error or 'no answer'})" for e in self.all]
        return (f"no server answered for {self.give_up_after:g}s: " + "; ".join(parts))

    async def close(self) -> None:
        for e in self.all:
            try:
                await asyncio.wait_for(e.client.close(), 5)
            except (Exception, asyncio.TimeoutError):
                pass
