"""A fake Triton server with DALI preprocessing, answering as the real one does, for the
client's isolation of corrupt files (tests/test_client_units.py, benchmarks/isolation.py).

What it sends, from the real sources:
- dali_backend src/dali_model_instance.cc ErrorHandler(): TritonError::Unknown("DALI
  error: " + what) for a DALIException, sent by ExecuteBatched to every request of the
  batch DALI ran; gRPC status UNKNOWN (server src/grpc/grpc_utils.cc CodeToStatus).
- core src/ensemble_scheduler/ensemble_scheduler.cc: "in ensemble '<name>', " + message.
- core src/scheduler_utils.cc PolicyQueue::Enqueue: UNAVAILABLE
  "[request id: <id_unknown>] Exceeds maximum queue size" (request->LogRequest() prefix).

A row's first 4 bytes are its index (little endian); its descriptor is that index, so a
caller can check that every image got its own.
"""
from __future__ import annotations

import asyncio

import numpy as np
from tritonclient.utils import InferenceServerException

# What follows "DALI error: " is DALI's exception text (illustrative); the prefix is the
# backend's.
DALI_CORRUPT = ("in ensemble 'sscd', DALI error: Critical error in pipeline:\nError in MIXED "
                "operator `nvidia.dali.fn.decoders.image`,\nAssert on \"ret == "
                "NVJPEG_STATUS_SUCCESS\" failed: corrupt JPEG data")
QUEUE_FULL = "in ensemble 'sscd', [request id: <id_unknown>] Exceeds maximum queue size"


def error(message: str, status: str) -> InferenceServerException:
    """An exception as tritonclient's gRPC client raises it for a server's answer."""
    return InferenceServerException(message, status=f"StatusCode.{status}")


class Result:
    def __init__(self, arr: np.ndarray):
        self.arr = arr

    def as_numpy(self, name: str) -> np.ndarray:
        return self.arr


def row_index(row: np.ndarray) -> int:
    return int.from_bytes(row[:4].tobytes(), "little")


class DaliServer:
    """Triton's scheduler in front of a DALI model.

    `per_request=False` (dynamic batching): requests arriving within `window` seconds form
    one batch of up to `max_rows` rows (whole requests; ragged, as allow_ragged_batch); if
    any row of the formed batch is corrupt, every request of it gets DALI's UNKNOWN error.
    More than `max_queue` requests waiting: UNAVAILABLE "Exceeds maximum queue size" (the
    dynamic batcher's queue policy). `per_request=True` (no dynamic batcher: Triton's
    default scheduler, which has no queue policy): each request is its own DALI batch; a
    corrupt row fails only its own request. Either way `instances` batches run at once,
    each taking `exec_s` + `row_s` per row. A failed batch costs its instance `reset_s`
    more before the next one: every DALI error resets the whole pipeline (dali_backend
    src/dali_executor/dali_executor.cc: `pipeline_.Reset()` after a failed run), which
    re-creates its operators and buffers."""

    def __init__(self, corrupt, window: float = 0.002, max_rows: int = 64, max_queue: int = 3,
                 exec_s: float = 0.001, row_s: float = 0.0, per_request: bool = False,
                 instances: int = 1, reset_s: float = 0.0):
        self.url = "dali:1"
        self.corrupt, self.window, self.max_rows = set(corrupt), window, max_rows
        self.max_queue, self.exec_s, self.row_s = max_queue, exec_s, row_s
        self.per_request, self.instances, self.reset_s = per_request, instances, reset_s
        self.queue: list = []
        self.requests = self.formed = self.failed_batches = self.busy = self.resets = 0
        self._workers: list[asyncio.Future] = []

    async def infer(self, model, inputs, outputs=None, client_timeout=None, headers=None):
        inp = inputs[0]
        rows = np.frombuffer(inp._get_content(), np.uint8).reshape(inp.shape())
        self.requests += 1
        if not self.per_request and len(self.queue) >= self.max_queue:
            self.busy += 1
            raise error(QUEUE_FULL, "UNAVAILABLE")
        fut = asyncio.get_running_loop().create_future()
        self.queue.append((rows, fut))
        self._workers = [w for w in self._workers if not w.done()]
        if len(self._workers) < self.instances:
            self._workers.append(asyncio.ensure_future(self._run()))
        return await fut

    def _form(self) -> list:
        if self.per_request:
            return [self.queue.pop(0)]
        batch, n = [], 0
        while self.queue and (not batch or n + len(self.queue[0][0]) <= self.max_rows):
            batch.append(self.queue.pop(0))
            n += len(batch[-1][0])
        return batch

    async def _run(self) -> None:
        while self.queue:
            if not self.per_request:
                await asyncio.sleep(self.window)
                if not self.queue:
                    break
            batch = self._form()
            n = sum(len(rows) for rows, _ in batch)
            await asyncio.sleep(self.exec_s + self.row_s * n)
            self.formed += 1
            bad = any(row_index(r) in self.corrupt for rows, _ in batch for r in rows)
            self.failed_batches += bad
            if bad:
                self.resets += 1
                await asyncio.sleep(self.reset_s)  # the instance is busy resetting
            for rows, fut in batch:
                if fut.done():
                    continue
                if bad:
                    fut.set_exception(error(DALI_CORRUPT, "UNKNOWN"))
                else:
                    fut.set_result(Result(np.stack([np.full(4, row_index(r), np.float32)
                                                    for r in rows])))

    async def close(self) -> None:
        pass
