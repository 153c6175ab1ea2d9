"""What a failed call means: one kind per error, from its gRPC status and Triton's message.

The messages this module keys on, as the servers write them:

- dali_backend src/dali_model_instance.cc `ErrorHandler()`: every exception of a batched
  `Execute` becomes `TritonError::Unknown("DALI error: " ...)` (DALIException: a corrupt
  image, a failed check) or `"DALI Backend error: "` (DaliBackendException), also
  "Runtime error: ", "Exception: ", "Unknown error"; `ExecuteBatched` sends that one error
  to *every* request of the formed batch. gRPC status UNKNOWN (server src/grpc/grpc_utils.cc
  `GrpcStatusUtil::CodeToStatus`).
- core src/ensemble_scheduler/ensemble_scheduler.cc: a composing model's error reaches the
  caller as "in ensemble '<name>', <message>", status unchanged.
- core src/scheduler_utils.cc `PriorityQueue::PolicyQueue::Enqueue`: UNAVAILABLE
  "[request id: <id>] Exceeds maximum queue size" (the configured `max_queue_size`).
- core src/dynamic_batch_scheduler.cc `Enqueue` after SIGTERM: UNAVAILABLE "[request id:
  <id>] Server is stopping, scheduler for model has stopped accepting new inference
  requests".

Kinds:
  RETRY       no usable answer (connection, timeout, a server stopping or loading):
              the endpoint leaves rotation for a backoff; another try, maybe elsewhere
  BUSY        the queue bound working ("Exceeds maximum queue size"): this request backs
              off; the endpoint stays in rotation; it counts as an answer
  BATCH       the formed batch failed (DALI): some image of the *formed* batch is at fault,
              maybe another request's; the endpoint stays in rotation
  REJECT      the input is at fault (INVALID_ARGUMENT, a per-request verdict)
  ERROR       the server failed on this request for another reason (INTERNAL, ...)
  SHM         the server lost our shared-memory registration (it restarted)
  RESTRICTED  the API needs a header (--grpc-restricted-protocol): --header

UNKNOWN without a DALI mark: gRPC itself reports some connection failures as UNKNOWN
(e.g. "Stream removed"), so an UNKNOWN that does not show it went through Triton is
transport trouble (RETRY). One that does (the ensemble prefix, "[request id:") is an
answer, and since DALI's other `ErrorHandler` texts are also sent to a whole formed batch,
every answered UNKNOWN is treated as BATCH.
"""
from __future__ import annotations

import re

from tritonclient.utils import InferenceServerException

RETRY = "retry"
BUSY = "busy"
BATCH = "batch"
REJECT = "reject"
ERROR = "error"
SHM = "shm"
RESTRICTED = "restricted"

_RETRY_CODES = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED",
                "CANCELLED", "UNKNOWN"}
# Messages of a server that is stopping, restarting or loading: not the input's fault.
_SERVER_STATE = ("unknown model", "no available versions", "not ready", "is stopping",
                 "stopped accepting", "shutting down", "server exiting",
                 "stub process is not healthy", "socket closed", "connection reset")
QUEUE_FULL = "exceeds maximum queue size"  # core src/scheduler_utils.cc
# dali_backend src/dali_model_instance.cc ErrorHandler(): the texts it prefixes
_DALI = ("dali error:", "dali backend error:", "runtime error:", "exception:", "unknown error")
# marks of a message written by Triton (so the server answered)
_TRITON = ("in ensemble '", "[request id:")
# no answer: the server may still be working on the request (shared memory in use)
_NO_ANSWER_CODES = {"DEADLINE_EXCEEDED", "CANCELLED"}
_CONNECTION = ("failed to connect", "connection reset", "socket closed", "stream removed",
               "connection refused", "broken pipe", "goaway", "end of tcp stream",
               "connection timed out", "keepalive")

ITEM = re.compile(r"\bitem (\d+) of the request\b")
MAX_ROWS = re.compile(r"batch-size must be <= (\d+)")


class GiveUp(Exception):
    """The run cannot go on for want of answers (the base; sscd-embed: exit 3)."""


class NoAnswer(GiveUp):
    """No server answered anything for `give_up_after` s (or at start)."""


class TimedOut(NoAnswer):
    """No server answered for `give_up_after` s, and every server's last try timed out
    (the request's `timeout`): servers that are there but too slow for it."""


class Overloaded(GiveUp):
    """The server answered "Exceeds maximum queue size" for `busy_for` s."""


class Fatal(Exception):
    """A condition retrying cannot fix (unknown model, unusable shared memory)."""


def restricted(url: str, e: BaseException) -> Fatal:
    return Fatal(f"the server at {url} restricts this API ({clean_message(e)}); pass the "
                 "header it expects with --header NAME=VALUE")


def status_name(e: BaseException) -> str:
    status = e.status() if isinstance(e, InferenceServerException) else None
    return str(status or "").replace("StatusCode.", "")


def clean_message(e: BaseException) -> str:
    msg = e.message() if isinstance(e, InferenceServerException) else str(e)
    msg = re.sub(r"^in ensemble '[^']*', ", "", (msg or str(e)).strip())
    return re.sub(r"^\[request id: [^\]]*\] ", "", msg)


def _bare(message: str) -> str:
    """The message without Triton's ensemble and request-id prefixes, lower case."""
    m = re.sub(r"^in ensemble '[^']*', ", "", message.strip().lower())
    return re.sub(r"^\[request id: [^\]]*\] ", "", m)


def classify(e: BaseException) -> str:
    if not isinstance(e, InferenceServerException):
        return RETRY  # OSError: connection-level trouble surfacing as another type
    status, raw = status_name(e), (e.message() or "").lower()
    message = _bare(raw)
    if "protocol is restricted" in message:  # sent as UNAVAILABLE, but retrying cannot help
        return RESTRICTED
    if status == "UNAVAILABLE" and QUEUE_FULL in message:
        return BUSY
    if any(m in message for m in _SERVER_STATE):
        return RETRY
    if status == "UNKNOWN" and (message.startswith(_DALI) or raw.startswith(_TRITON)):
        return BATCH
    if status in _RETRY_CODES or not status:
        return RETRY
    if "shared memory" in message:
        return SHM
    if status == "INVALID_ARGUMENT":
        return REJECT
    return ERROR


def answered(e: BaseException) -> bool:
    """Whether the server gave a verdict on the request (it is done with its inputs and
    outputs), as opposed to no answer: a timeout, a lost connection, a cancellation."""
    if not isinstance(e, InferenceServerException):
        return False
    status, message = status_name(e), (e.message() or "").lower()
    if not status or status in _NO_ANSWER_CODES:
        return False
    if status in ("UNAVAILABLE", "UNKNOWN"):  # gRPC core uses these for broken connections
        return (message.startswith(_TRITON) or _bare(message).startswith(_DALI)
                or any(m in message for m in (QUEUE_FULL, "is stopping", "not ready",
                                              "server exiting", "protocol is restricted"))
                ) and not any(m in message for m in _CONNECTION)
    return True


def split(items: list, message: str) -> list[list]:
    """Parts of a rejected batch: around the row the server names, else two halves."""
    m = ITEM.search(message)
    if m and 0 <= int(m.group(1)) < len(items):
        i = int(m.group(1))
        return [p for p in (items[:i], items[i:i + 1], items[i + 1:]) if p]
    half = len(items) // 2
    return [items[:half], items[half:]]
