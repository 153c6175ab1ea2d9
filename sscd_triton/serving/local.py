"""A local Triton server for one job: a cpu model repository built once per checkpoint,
served by the bundled tritonserver on 127.0.0.1 while the job runs.

    with local.serving(checkpoint=None, log_path="out/tritonserver.log") as url:
        ...  # embed through url (the demo weights when checkpoint is None)

Repositories are kept under `REPOSITORIES` (relative to the working folder), keyed by the
checkpoint's sha256, the preprocessing and a fingerprint of the code that builds and
serves them, so a rerun reuses one and a new version of the project builds its own (and
removes the builds of the same checkpoint that older code left there).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

from sscd_triton import spec
from sscd_triton.files import writer_alive

REPOSITORIES = os.path.join("runs", "repositories")


def builder_fingerprint() -> str:
    """sha256 (16 hex digits) of the code a built repository depends on: spec, export
    and serving."""
    package = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted([package / "spec.py", package / "images.py",
                        *(package / "export").glob("*.py"), *(package / "serving").glob("*.py")]):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def cached_repository(checkpoint: str | None, say: Callable[[str], None] = print,
                      root: str = REPOSITORIES) -> str:
    """A cpu model repository serving `checkpoint` (None: the demo weights), built once
    under `root` (into a temporary folder, then renamed: a folder there is complete).
    BuildError on a bad checkpoint or a failed parity check."""
    from sscd_triton.serving.build import BuildError, build_repository, sha256_file

    source = checkpoint
    if source is None:
        from sscd_triton.export import demo

        source = demo.write_demo_checkpoint()
    key = f"{sha256_file(source)[:16]}-{builder_fingerprint()[:8]}"
    repo = os.path.abspath(os.path.join(root, f"cpu-{spec.DEFAULT_PREPROCESS}-{key}"))
    if os.path.isdir(repo):
        say(f"serving {repo} (built before from {source})")
        return repo
    os.makedirs(os.path.dirname(repo), exist_ok=True)
    tmp = f"{repo}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    say(f"building a cpu model repository from {source} into {repo} (once: reruns reuse it)")
    try:
        built = build_repository(tmp, target="cpu", checkpoint=checkpoint)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not built.passed:  # kept for its report
        raise BuildError(f"the repository built from {source} failed its parity checks "
                         f"(report: {tmp}/report.json)")
    try:
        os.replace(tmp, repo)
    except OSError:
        if not os.path.isdir(repo):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another job built the same one meanwhile
    for stale in stale_builds(repo):
        say(f"removing {stale} (built from the same checkpoint by an older version)")
        shutil.rmtree(stale, ignore_errors=True)
    return repo


def stale_builds(repo: str) -> list[str]:
    """The folders beside `repo` (`cpu-PREPROCESS-SHA-FINGERPRINT`) built from the same
    checkpoint by other code (another fingerprint), and the leftovers of builds whose
    process is gone."""
    root, name = os.path.split(repo)
    sha, fingerprint = name.split("-")[-2:]
    stale = []
    for entry in sorted(os.listdir(root)):
        path = os.path.join(root, entry)
        if not os.path.isdir(path):
            continue
        base, _, pid = entry.partition(".partial-")
        if pid:
            gone = pid.isdigit() and not writer_alive(int(pid))
        else:
            parts = base.split("-")
            gone = parts[0] == "cpu" and parts[-2:-1] == [sha] and parts[-1] != fingerprint
        if gone:
            stale.append(path)
    return stale


@contextlib.contextmanager
def serving(checkpoint: str | None = None, log_path: str | None = None,
            say: Callable[[str], None] = print) -> Iterator[str]:
    """The gRPC address (HOST:PORT) of a tritonserver serving `checkpoint`'s cached
    repository, stopped on exit. BuildError (bad checkpoint), TritonServerError (the
    server did not come up; its log says why)."""
    from sscd_triton.serving.server import TritonServer

    repo = cached_repository(checkpoint, say)
    say(f"starting a local tritonserver (log: {log_path}) ...")
    server = TritonServer(repo, log_path=log_path).start()
    try:
        yield server.grpc_url
    finally:
        # the job's own server: what is still queued there after an interrupted job is
        # nobody's, so it gets a short graceful wait (a finished job's unloads in ~1 s)
        server.stop(timeout=5)
