"""Progress of an embedding job: on stderr (a tqdm bar, or plain log lines), or through a
callback (`CallbackProgress`, for Client.embed_files).

Either is what job.embed_files takes: update(embedded, failed), set_total(total),
log(message), close().
"""
from __future__ import annotations

import sys
import time
from typing import Callable

ProgressCallback = Callable[[int, int, "int | None"], None]


class Progress:
    """A tqdm bar (images/s, ETA once the total is known, failures), or with --quiet
    plain log lines every 10 s."""

    def __init__(self, quiet: bool, every: float = 10.0):
        self.quiet = quiet
        self.embedded = self.failed = 0
        self.total = None
        self.start = time.monotonic()
        self._every, self._last = every, self.start
        self.bar = None
        if not quiet:
            from tqdm import tqdm

            self.bar = tqdm(total=None, unit="img", desc="embedding", file=sys.stderr,
                            mininterval=0.5, smoothing=0.05, dynamic_ncols=True)

    def update(self, embedded: int, failed: int) -> None:
        self.embedded += embedded
        self.failed += failed
        if self.bar is not None:
            if failed:
                self.bar.set_postfix_str(f"failed={self.failed}", refresh=False)
            self.bar.update(embedded + failed)
        elif time.monotonic() - self._last >= self._every:
            self._last = time.monotonic()
            self.log(self.line())

    def line(self) -> str:
        done = self.embedded + self.failed
        rate = done / max(time.monotonic() - self.start, 1e-9)
        of = f" of {self.total}" if self.total is not None else ""
        eta = ""
        if self.total is not None and rate > 0:
            eta = f", ETA {max(self.total - done, 0) / rate:.0f}s"
        return (f"{done}{of} done ({self.embedded} embedded, {self.failed} failed), "
                f"{rate:.1f} images/s{eta}")

    def set_total(self, total: int) -> None:
        self.total = total
        if self.bar is not None:
            self.bar.total = total
            self.bar.refresh()

    def log(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(f"[embed] {message}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class CallbackProgress:
    """`callback(embedded, failed, total)` (this job's counts; total None until every
    input was enumerated) on each result; log lines go to `log`."""

    def __init__(self, callback: ProgressCallback | None,
                 log: Callable[[str], None] = lambda message: None):
        self.callback = callback
        self._log = log
        self.embedded = self.failed = 0
        self.total: int | None = None

    def update(self, embedded: int, failed: int) -> None:
        self.embedded += embedded
        self.failed += failed
        if self.callback is not None:
            self.callback(self.embedded, self.failed, self.total)

    def set_total(self, total: int) -> None:
        self.total = total
        if self.callback is not None:
            self.callback(self.embedded, self.failed, total)

    def log(self, message: str) -> None:
        self._log(message)

    def close(self) -> None:
        pass
