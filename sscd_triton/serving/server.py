"""Start and stop a local Triton Inference Server for tests, benchmarks and demos.

Torch-free on purpose: it only needs the standard library and a `tritonserver` command,
either the venv's wrapper around the nvidia-pytriton wheel's binary (written by
scripts/install_tritonserver.py) or the NGC container's own one found on PATH.

    with TritonServer("model_repository") as server:
        client = tritonclient.grpc.InferenceServerClient(server.grpc_url)

The server listens on 127.0.0.1 only, on free ports unless given, and `stop()` leaves
no process behind: the server runs in its own process group, which also holds the
python backend's stub processes, and the whole group is killed at the end.
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Sequence

HOST = "127.0.0.1"


def find_tritonserver() -> str:
    """Path of `tritonserver`: the one beside this interpreter (the venv's), else PATH's."""
    beside = Path(sys.executable).parent / "tritonserver"
    found = str(beside) if os.access(beside, os.X_OK) else shutil.which("tritonserver")
    if not found:
        raise FileNotFoundError(
            f"no tritonserver next to {sys.executable} nor on PATH; run scripts/setup.sh "
            "(it calls scripts/install_tritonserver.py)")
    return found


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports free on HOST right now (the OS picks them).

    All sockets stay open until every port is chosen, so the ports differ; another
    process may still take one before the server binds it (rare; start() retries).
    """
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class TritonServerError(RuntimeError):
    """The server exited or did not become ready; the message ends with its log tail."""


class TritonServer:
    """A `tritonserver` process serving `model_repository` on 127.0.0.1.

    Flags always passed: models load at start-up only (`--model-control-mode none`),
    any model failing to load stops the server (`--exit-on-error true`) and it is ready
    only once every model is (`--strict-readiness true`), so "ready" means usable.
    `extra_args` are appended to the command line (e.g. `["--log-verbose=1"]`).
    The server's stdout and stderr go to `log_path` (a temporary file when None, removed
    after a clean stop).
    """

    def __init__(self, model_repository: str | os.PathLike, grpc_port: int | None = None,
                 http_port: int | None = None, metrics_port: int | None = None,
                 extra_args: Sequence[str] = (), log_path: str | os.PathLike | None = None,
                 startup_timeout: float = 120.0, executable: str | None = None):
        self.model_repository = Path(model_repository).resolve()
        self._wanted_ports = (grpc_port, http_port, metrics_port)
        self.grpc_port, self.http_port, self.metrics_port = self._wanted_ports
        self.extra_args = list(extra_args)
        self._own_log = log_path is None
        self.log_path = Path(log_path) if log_path else None
        self.startup_timeout = startup_timeout
        self.executable = executable or find_tritonserver()
        self.process: subprocess.Popen | None = None
        # The python backend names its /dev/shm regions <prefix><uuid> and only unlinks
        # them on a clean shutdown; a prefix of our own lets stop() remove what a killed
        # server leaves there.
        self.shm_prefix = f"sscd_triton_{os.getpid()}_{secrets.token_hex(4)}_"
        for arg in self.extra_args:
            if "shm-region-prefix-name=" in arg:
                self.shm_prefix = arg.split("shm-region-prefix-name=", 1)[1]

    @property
    def grpc_url(self) -> str:
        """`host:port` as tritonclient.grpc expects it."""
        return f"{HOST}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        """`host:port` as tritonclient.http expects it."""
        return f"{HOST}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        """Prometheus endpoint."""
        return f"http://{HOST}:{self.metrics_port}/metrics"

    def command(self) -> list[str]:
        """The full command line (ports must be chosen already)."""
        return [
            self.executable,
            f"--model-repository={self.model_repository}",
            "--model-control-mode=none", "--exit-on-error=true", "--strict-readiness=true",
            f"--grpc-address={HOST}", f"--grpc-port={self.grpc_port}",
            f"--http-address={HOST}", f"--http-port={self.http_port}",
            f"--metrics-address={HOST}", f"--metrics-port={self.metrics_port}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            *self.extra_args,
        ]

    def start(self) -> "TritonServer":
        """Start the server and wait until it is ready; raise TritonServerError if not.

        When the ports were picked here and the server lost one of them to another
        process before binding it, it is retried on fresh ports (twice at most).
        """
        if self.process is not None:
            raise RuntimeError("server already started")
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        auto_ports = None in self._wanted_ports
        for attempt in range(3):
            picked = iter(free_ports(3))
            self.grpc_port, self.http_port, self.metrics_port = (
                port if port is not None else next(picked) for port in self._wanted_ports)
            try:
                self._launch_and_wait()
                return self
            except BaseException as error:  # Ctrl-C while waiting must not leave it running
                self._kill_group()
                self.process = None
                if not (isinstance(error, TritonServerError) and auto_ports and attempt < 2
                        and "already in use" in str(error)):
                    raise
        raise AssertionError("unreachable")

    def _launch_and_wait(self) -> None:
        """Start the process in a new session (own process group) and poll readiness."""
        with open(self.log_path, "wb") as log:
            # New session: signals from the terminal don't reach it, and stop() can
            # kill the group, which the python backend's stub processes inherit.
            self.process = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        ready_url = f"http://{self.http_url}/v2/health/ready"
        deadline = time.monotonic() + self.startup_timeout
        while True:
            code = self.process.poll()
            if code is not None:
                raise TritonServerError(f"tritonserver exited with code {code} during start-up\n"
                                        + self.log_tail())
            try:
                with urllib.request.urlopen(ready_url, timeout=1.0) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass  # not listening yet, or listening but not ready (HTTP 400)
            if time.monotonic() > deadline:
                raise TritonServerError(f"tritonserver not ready after {self.startup_timeout:g} s"
                                        f" ({ready_url})\n" + self.log_tail())
            time.sleep(0.2)

    def log_tail(self, lines: int = 30) -> str:
        """Error lines of the server log, then its last `lines` lines (for error messages).

        Error lines come first because the status tables Triton prints after a failed
        load can push the actual error out of a short tail.
        """
        try:
            text = Path(self.log_path).read_text(errors="replace").splitlines()
        except (OSError, TypeError):
            return "(no server log)"
        errors = [line for line in text if line[:1] == "E" and line[1:2].isdigit()][:10]
        return "\n".join([f"--- errors in {self.log_path} ---", *errors,
                          f"--- last {lines} lines ---", *text[-lines:]])

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the server: SIGTERM (graceful unload), then SIGKILL to its process group.

        SIGTERM goes to the server alone so that it unloads models and its stubs exit
        cleanly; whatever of the group is still alive after `timeout` s (or at once, for
        stubs orphaned by the server's exit) is killed. Safe to call twice.
        """
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
            except BaseException:  # Ctrl-C again while it drains: leave nothing running
                self._kill_group()
                self.process = None
                raise
        self._kill_group()
        clean = self.process.returncode == 0
        self.process = None
        if clean and self._own_log and self.log_path is not None:
            self.log_path.unlink(missing_ok=True)
            self.log_path = None

    def _kill_group(self, timeout: float = 10.0) -> None:
        """SIGKILL what is left of the server's group, reap it, drop its shm regions."""
        if self.process is None:
            return
        pgid = self.process.pid  # session leader: its pid is the group id
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # group already empty
        self.process.wait(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # orphans are reaped by init, not by us
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        for region in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
            region.unlink(missing_ok=True)

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
