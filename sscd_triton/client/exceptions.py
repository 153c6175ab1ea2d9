"""The errors the client library raises on purpose, by what the caller can do about them.

    SSCDError
     |- UsageError (ValueError)   asked for something that cannot be done as asked: fix the
     |                            call (a model the server does not serve, an output written
     |                            by another model, a bad setting); sscd-embed exit 2
     |- Unfinished                stopped before every input was accounted for; what was
         |                        finished is kept and the same call again resumes; exit 3
         |- ServerUnavailable     no server answered for the allowed time (not there at
         |  (ConnectionError)     start, or lost mid-run)
         |- Interrupted           Ctrl-C or SIGTERM; exit 130
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


class Interrupted(Unfinished):
    """Stopped by Ctrl-C or SIGTERM."""


class OutputUnwritable(Unfinished):
    """Writing the output failed (disk full, read-only) or did not add up."""

    what_kept = "Every shard written so far"
