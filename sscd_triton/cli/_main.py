"""The skeleton every command-line main shares: usage problems, expected errors and files
that cannot be read or written as one `error:` line each with exit 2, Ctrl-C as 130, never
a traceback for any of them."""
from __future__ import annotations

import sys
from typing import Callable

EXIT_USAGE, EXIT_INTERRUPTED = 2, 130


def run_main(problems: list[str], run: Callable[[], int],
             usage_errors: tuple[type[BaseException], ...] = ()) -> int:
    """`run()`'s exit status, unless `problems` (found before anything ran), one of
    `usage_errors` or an OSError (a full disk, a file that cannot be written) raised by
    `run` make it a usage error."""
    if problems:
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return run()
    except usage_errors as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def plural(n: int, noun: str, nouns: str | None = None) -> str:
    """"1 request", "2 requests": the commands' summaries count things."""
    return f"{n} {noun if n == 1 else nouns or noun + 's'}"


def command(script: str) -> str:
    """How to run the project's command `script` (e.g. "export/build_repository.py") the way
    this process was run: its `sscd-*` entry point when installed as one, `python -m` when
    run as a module, else the script from the repository root."""
    name = script.rsplit("/", 1)[-1][:-len(".py")]
    run_as = sys.argv[0].replace("\\", "/") if sys.argv else ""
    if run_as.rsplit("/", 1)[-1].startswith("sscd-"):
        return "sscd-" + name.replace("_", "-")
    if "/sscd_triton/cli/" in run_as:
        return f"python -m sscd_triton.cli.{name}"
    return f"python {script}"
