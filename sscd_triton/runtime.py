"""ONNX Runtime sessions, built one way for export checks, the CPU server and benchmarks."""
from __future__ import annotations

import os

import numpy as np

from sscd_triton import spec

CGROUP_CPU_MAX = "/sys/fs/cgroup/cpu.max"


CGROUP_V1_QUOTA = "/sys/fs/cgroup/cpu/cpu.cfs_quota_us"


def cpu_quota(cpu_max: str = CGROUP_CPU_MAX, v1_quota: str = CGROUP_V1_QUOTA) -> int | None:
    """Whole CPUs a cgroup CPU quota grants this process (what a container's or a
    Kubernetes pod's CPU limit sets; v2 `cpu.max`, else v1 `cpu.cfs_quota_us`), at least 1;
    None without a quota. Inside a container the cgroup namespace puts its own at the root."""
    try:
        with open(cpu_max) as f:
            quota, period = f.read().split()[:2]
    except (OSError, ValueError):
        try:
            with open(v1_quota) as f:
                quota = f.read().strip()
            with open(os.path.join(os.path.dirname(v1_quota), "cpu.cfs_period_us")) as f:
                period = f.read().strip()
        except OSError:
            return None
        quota = "max" if quota.startswith("-") else quota
    try:
        return None if quota == "max" else max(1, int(quota) // int(period))
    except ValueError:
        return None


def cpu_share(cpu_max: str = CGROUP_CPU_MAX, v1_quota: str = CGROUP_V1_QUOTA) -> int:
    """Threads for ONNX Runtime: 0 (its own default, the physical cores it may use) unless
    a CPU quota grants fewer CPUs than this process's affinity, then that many: more threads
    than the quota stall each other at every throttling period."""
    quota = cpu_quota(cpu_max, v1_quota)
    return quota if quota is not None and quota < len(os.sched_getaffinity(0)) else 0


def onnx_session(path: str, threads: int = 0, providers: list | None = None):
    """An InferenceSession with every graph optimisation on (threads 0: `cpu_share()`, which
    is ONNX Runtime's default unless a CPU quota is lower)."""
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
