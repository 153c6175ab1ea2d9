"""ONNX Runtime sessions, built one way for export checks, the CPU server and benchmarks."""
from __future__ import annotations

import os

import numpy as np

from sscd_triton import spec

CGROUP_CPU_MAX = "/sys/fs/cgroup/cpu.max"


def cpu_share(cpu_max: str = CGROUP_CPU_MAX) -> int:
    """The CPUs this process may run on: its affinity, capped by a cgroup v2 CPU quota
    (`cpu.max`, what a container's or a Kubernetes pod's CPU limit sets). ONNX Runtime's
    own default counts the host's cores, and more threads than the quota allows stall
    each other at every throttling period."""
    n = len(os.sched_getaffinity(0))
    try:
        with open(cpu_max) as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return n


def onnx_session(path: str, threads: int = 0, providers: list | None = None):
    """An InferenceSession with every graph optimisation on (threads 0: `cpu_share()`)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads or cpu_share()
    so.log_severity_level = 3  # fp16 graphs log harmless per-node placement warnings
    return ort.InferenceSession(path, so, providers=providers or ["CPUExecutionProvider"])


def onnx_runner(session):
    """`[N,3,H,W]` float32 -> `[N,dims]` float32 through `session`."""
    def run(x: np.ndarray) -> np.ndarray:
        return session.run([spec.OUTPUT_NAME], {spec.INPUT_NAME: np.ascontiguousarray(x, np.float32)})[0]
    return run
