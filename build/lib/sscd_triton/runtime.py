"""ONNX Runtime sessions, built one way for export checks, the CPU server and benchmarks."""
from __future__ import annotations

import numpy as np

from sscd_triton import spec


def onnx_session(path: str, threads: int = 0, providers: list | None = None):
    """An InferenceSession with every graph optimisation on (threads 0: ORT's default)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.log_severity_level = 3  # fp16 graphs log harmless per-node placement warnings
    return ort.InferenceSession(path, so, providers=providers or ["CPUExecutionProvider"])


def onnx_runner(session):
    """`[N,3,H,W]` float32 -> `[N,dims]` float32 through `session`."""
    def run(x: np.ndarray) -> np.ndarray:
        return session.run([spec.OUTPUT_NAME], {spec.INPUT_NAME: np.ascontiguousarray(x, np.float32)})[0]
    return run
