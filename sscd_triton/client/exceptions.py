"""The errors the client library raises on purpose, by what the caller can do about them.

    SSCDError
     |- UsageError (ValueError)   asked for something that cannot be done as asked: fix the
     |                            call (a model the server does not serve, an output written
     |                            by another model, a bad setting); sscd-embed exit 2
     |- BadImage (ValueError)     Client.embed: items that are no usable image (the reader's
     |                            or the server's verdict); the good ones were embedded
     |- Unfinished                stopped before every input was accounted for; what was
         |                        finished is kept and the same call again resumes; exit 3
         |- ServerUnavailable     no server answered for the allowed time (not there at
         |  (ConnectionError)     start, or lost mid-run)
         |   |- ServerOverloaded  the server answered "queue full" for the allowed time
         |   |- RequestTimeout    servers there, but every try ran past the request
         |      (TimeoutError)    timeout for the allowed time
         |- Interrupted           Ctrl-C or SIGTERM; exit 130

ServerOverloaded and RequestTimeout are kinds of ServerUnavailable (code that catches
that one, and sscd-embed's exit 3, are unchanged): catch them first to tell them apart.
"""
from __future__ import annotations


class SSCDError(Exception):
    """Base of every error sscd_triton raises on purpose."""


class UsageError(SSCDError, ValueError):
    """The request cannot be done as asked; retrying it unchanged will not help."""


class Unfinished(SSCDError):
    """The job stopped early. `kept` says what of the output was kept ("nothing was
    written" when nothing was), `started` whether the output was opened at all."""

    what_kept = "Everything finished so far"

    def __init__(self, message: str, kept: str = "nothing was written", started: bool = True):
        super().__init__(message)
        self.kept = kept
        self.started = started


class ServerUnavailable(Unfinished, ConnectionError):
    """No server answered within the allowed time (refused, unknown host, not gRPC,
    silent); the message names each address and why."""


class ServerOverloaded(ServerUnavailable):
    """The server kept answering "Exceeds maximum queue size" for the allowed time
    (`busy_for`, the request timeout): no verdict on the images; retry later or lower
    `concurrency`."""


class RequestTimeout(ServerUnavailable, TimeoutError):
    """No server answered for `give_up_after` s and every server's last try ran past the
    request `timeout`: the servers are too slow for it (raise it, or lower `batch_size`)."""


class BadImage(SSCDError, ValueError):
    """Items of `Client.embed` that are no usable image, raised after every good item
    was embedded (nothing is re-sent).

    `index` and `reason`: the first bad item (its position in the call's input) and why
    (the reader's or the server's words); `errors`: {index: reason} for every bad item;
    `embeddings`: float32 [n, dims], the good rows filled, NaN rows for the bad ones
    (what `errors="nan"` returns)."""

    def __init__(self, errors: dict, embeddings=None):
        self.errors = dict(sorted(errors.items()))
        self.index = next(iter(self.errors))
        self.reason = self.errors[self.index]
        self.embeddings = embeddings
        more = len(self.errors) - 1
        super().__init__(f"item {self.index}: {self.reason}"
                         + (f" (and {more} more bad item{'s' * (more > 1)}: see .errors)"
                            if more else ""))

    def __reduce__(self):  # picklable (multiprocessing) despite the keyword-less init
        return type(self), (self.errors, self.embeddings)


class Interrupted(Unfinished):
    """Stopped by Ctrl-C or SIGTERM."""


class OutputUnwritable(Unfinished):
    """Writing the output failed (disk full, read-only) or did not add up."""

    what_kept = "Every shard written so far"
