"""Staged log lines and the check table that end every export (optimum/Ultralytics style)."""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field

from sscd_triton import files


@dataclass
class Check:
    name: str
    ok: bool | None  # None: not applicable to this model (say why in `detail`)
    detail: str
    bound: str = ""
    figures: dict = field(default_factory=dict)

    @property
    def mark(self) -> str:
        return {True: "PASS", False: "FAIL", None: "skip"}[self.ok]


class Report:
    """Prints `[step/total] ...` lines with elapsed times, then a table of checks."""

    def __init__(self, title: str, steps: int, stream=None):
        self.title, self.steps, self.stream = title, steps, stream or sys.stdout
        self.step = 0
        self.start = self._last = time.perf_counter()
        self.facts: dict = {}
        self.checks: list[Check] = []
        print(title, file=stream, flush=True)

    def log(self, message: str, **facts) -> None:
        self.step += 1
        now = time.perf_counter()
        print(f"[{self.step}/{self.steps}] {message} ({now - self._last:.1f}s)",
              file=self.stream, flush=True)
        self._last = now
        self.facts.update(facts)

    def note(self, message: str) -> None:
        print(f"      {message}", file=self.stream, flush=True)

    def add(self, checks: list[Check]) -> None:
        self.checks.extend(checks)

    @property
    def passed(self) -> bool:
        return all(c.ok is not False for c in self.checks)

    def table(self) -> None:
        w = max([len(c.name) for c in self.checks] + [5])
        d = max([len(c.detail) for c in self.checks] + [6])
        print(f"\n  {'':4}  {'check':<{w}}  {'result':<{d}}  bound", file=self.stream)
        for c in self.checks:
            print(f"  {c.mark:4}  {c.name:<{w}}  {c.detail:<{d}}  {c.bound}", file=self.stream)
        failed = sum(c.ok is False for c in self.checks)
        verdict = "all checks passed" if not failed else f"{failed} check(s) FAILED"
        print(f"\n{verdict} in {time.perf_counter() - self.start:.1f}s", file=self.stream,
              flush=True)

    def write_json(self, path: str) -> None:
        doc = {"title": self.title, "passed": self.passed, **self.facts,
               "checks": [asdict(c) | {"mark": c.mark} for c in self.checks]}
        files.write_atomic(path, json.dumps(doc, indent=2))
