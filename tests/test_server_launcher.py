"""sscd_triton.server.TritonServer starts a working tritonserver and leaves nothing behind.

Builds a tiny repository (a python-backend model doubling its input, wrapped in an
ensemble) so it checks, in a few seconds and without any exported SSCD model, the
pieces the real repository relies on: the venv's tritonserver wrapper, the python
backend's stub running in this venv (numpy, onnxruntime, PIL and the editable project
package importable), the ensemble scheduler, 127.0.0.1-only binding and a clean stop.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from sscd_triton.serving.server import TritonServer

MODEL_PY = """\
import sys

import numpy as np
import onnxruntime  # noqa: F401  (what the real python-backend models need)
from PIL import Image  # noqa: F401
import sscd_triton.spec  # noqa: F401  (the editable project package)
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        print(f"STUB_SYS_PREFIX={sys.prefix}", flush=True)

    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            out = pb_utils.Tensor("OUTPUT0", (2 * x).astype(np.float32))
            responses.append(pb_utils.InferenceResponse([out]))
        return responses
"""

DOUBLE_CONFIG = """\
name: "double"
backend: "python"
max_batch_size: 8
dynamic_batching { }
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""

ENSEMBLE_CONFIG = """\
name: "double_ensemble"
platform: "ensemble"
max_batch_size: 8
input [ { name: "X" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ 4 ] } ]
ensemble_scheduling { step [ {
  model_name: "double"
  model_version: -1
  input_map { key: "INPUT0" value: "X" }
  output_map { key: "OUTPUT0" value: "Y" }
} ] }
"""


def make_repository(root: Path) -> Path:
    """Write the two-model repository under root and return its path."""
    (root / "double" / "1").mkdir(parents=True)
    (root / "double_ensemble" / "1").mkdir(parents=True)
    (root / "double" / "config.pbtxt").write_text(DOUBLE_CONFIG)
    (root / "double" / "1" / "model.py").write_text(MODEL_PY)
    (root / "double_ensemble" / "config.pbtxt").write_text(ENSEMBLE_CONFIG)
    return root


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes whose arguments contain `text` (via /proc)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # exited meanwhile
        if text in args and str(os.getpid()) != cmdline.parent.name:
            found.append(f"{cmdline.parent.name}: {args}")
    return found


@pytest.mark.timeout(120)
def test_server_starts_infers_through_ensemble_and_stops_cleanly(tmp_path):
    tritonclient_grpc = pytest.importorskip("tritonclient.grpc")
    repository = make_repository(tmp_path / "repository")
    log_path = tmp_path / "server.log"

    with TritonServer(repository, log_path=log_path) as server:
        pgid, shm_prefix = server.process.pid, server.shm_prefix
        assert server.grpc_url.startswith("127.0.0.1:")
        client = tritonclient_grpc.InferenceServerClient(server.grpc_url)
        try:
            x = np.arange(12, dtype=np.float32).reshape(3, 4)
            request = tritonclient_grpc.InferInput("X", list(x.shape), "FP32")
            request.set_data_from_numpy(x)
            y = client.infer("double_ensemble", [request]).as_numpy("Y")
        finally:
            client.close()
        np.testing.assert_array_equal(y, 2 * x)
        assert processes_mentioning(str(repository)), "stub process not found while serving"

    log = log_path.read_text()
    assert f"STUB_SYS_PREFIX={sys.prefix}" in log, "the python backend stub did not run in this venv"
    assert f"Started GRPCInferenceService at {server.grpc_url}" in log
    assert f"Started HTTPService at {server.http_url}" in log
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)  # nothing left in the server's process group
    assert processes_mentioning(str(repository)) == []
    assert list(Path("/dev/shm").glob(f"{shm_prefix}*")) == []
