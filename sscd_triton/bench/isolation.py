"""What finding corrupt files costs the client, side by side: a fake DALI server
(bench/fake_dali.py) that batches requests together (dynamic batching: a corrupt image
fails its batch-mates too, so the client isolates through its one-at-a-time lane) against
one that runs each request as its own DALI batch (this project's gpu repository), and the
batching server with a client told otherwise (a rolling upgrade behind one address),
which must find out and switch.

The server's time is modelled (`exec_ms` per batch + `row_ms` per image, `reset_ms` per
failed batch for DALI's pipeline reset, asyncio sleeps):
the numbers are the client's isolation policy against that model, not a GPU's. What
transfers is the ratio: images/s with corrupt files over images/s with none, per server.
"""
from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np

from sscd_triton.bench.fake_dali import DaliServer
from sscd_triton.client import transport


@dataclass
class Run:
    server: str  # "dynamic-batching" | "per-request" | "told-per-request"
    corrupt_rate: float
    images: int
    corrupt: int
    seconds: float
    requests: int
    failed_batches: int
    wrongly_failed: int  # good images recorded as failures
    missed: int  # corrupt images recorded as results
    switched: bool  # the client found the server batching requests together after all

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds


SERVERS = ("dynamic-batching", "per-request", "told-per-request")


def run(server_kind: str, images: int, corrupt_rate: float, batch: int, concurrency: int,
        exec_ms: float, row_ms: float, max_rows: int, seed: int = 0,
        reset_ms: float = 0.0) -> Run:
    """Embed `images` fake images through transport.Sender at `concurrency` requests of
    `batch` images (`server_kind`: one of SERVERS); every image is accounted for exactly
    once (a result or a failure)."""
    per_request = server_kind == "per-request"
    kind_told_otherwise = server_kind == "told-per-request"
    rng = np.random.default_rng(seed)
    random.seed(seed)  # the client's jitter: the same run twice gives the same table
    corrupt = set(rng.choice(images, int(round(images * corrupt_rate)), replace=False).tolist())
    server = DaliServer(corrupt, max_rows=max_rows, max_queue=4 * concurrency,
                        exec_s=exec_ms / 1e3, row_s=row_ms / 1e3, per_request=per_request,
                        instances=2, reset_s=reset_ms / 1e3)
    results: Counter = Counter()
    failures: Counter = Counter()
    items = [transport.Item(str(k), k.to_bytes(4, "little"), 4) for k in range(images)]

    async def go() -> tuple[float, bool]:
        eps = transport.Endpoints([server.url], 30.0, (0.01, 0.05), client_factory=lambda u: server)
        sender = transport.Sender(eps, "sscd", "image", 4,
                                  lambda ids, emb: results.update(ids),
                                  lambda i, why: failures.update([i]),
                                  batch_mates=server_kind == "dynamic-batching")
        batches = [items[k:k + batch] for k in range(0, len(items), batch)]
        queue: asyncio.Queue = asyncio.Queue()
        for b in batches:
            queue.put_nowait(b)

        async def worker():
            while not queue.empty():
                await sender.send(queue.get_nowait())
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - t0, sender.batch_mates and kind_told_otherwise

    seconds, switched = asyncio.run(go())
    bad = {str(k) for k in corrupt}
    every = results + failures
    assert len(every) == images and set(every.values()) == {1}, "an image lost or doubled"
    return Run(server_kind, corrupt_rate, images, len(corrupt), seconds,
               server.requests - server.busy, server.failed_batches,
               len(set(failures) - bad), len(bad & set(results)), switched)
