"""The machine the numbers were measured on: never quote them without it."""
from __future__ import annotations

import os
import platform
import subprocess

def _cmd(args: list[str]) -> str:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def describe_device(server_meta: dict | None, url: str | None) -> dict:
    """What these numbers were measured on: never quote them without it."""
    lscpu = {}
    for line in _cmd(["lscpu"]).splitlines():
        key, _, value = line.partition(":")
        lscpu[key.strip()] = value.strip()
    info = {
        "cpu_model": lscpu.get("Model name") or platform.processor() or "unknown",
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "hypervisor": lscpu.get("Hypervisor vendor", ""),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "gpus": [line for line in _cmd(["nvidia-smi", "-L"]).splitlines() if line.strip()],
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        import torch
        info["torch"] = f"{torch.__version__} ({torch.get_num_threads()} threads)"
        info["cuda"] = torch.version.cuda if torch.cuda.is_available() else None
    except ImportError:
        info["torch"] = None
    try:
        import onnxruntime as ort
        info["onnxruntime"] = f"{ort.__version__} ({', '.join(ort.get_available_providers())})"
    except ImportError:
        info["onnxruntime"] = None
    try:
        from importlib.metadata import version
        info["tritonclient"] = version("tritonclient")
    except Exception:
        info["tritonclient"] = None
    if server_meta:
        where = f"remote {url}" if url else "local, 127.0.0.1, same machine as the client"
        info["tritonserver"] = f"{server_meta.get('version', '?')} ({where})"
    else:
        info["tritonserver"] = None
    return info


def print_device(info: dict) -> None:
    print("=" * 100)
    print("sscd-triton benchmark: device")
    gpus = "; ".join(info["gpus"]) or "none"
    print(f"  cpu          {info['cpu_model']}: {info['cpu_count']} logical cpus"
          f" ({info['cpus_usable']} usable){', ' + info['hypervisor'] + ' VM' if info['hypervisor'] else ''}")
    print(f"  load avg     {info['load_average_at_start']} (1/5/15 min) at start")
    print(f"  gpu          {gpus}")
    for key in ("python", "torch", "onnxruntime", "tritonclient", "tritonserver"):
        print(f"  {key:<12} {info.get(key) or 'not available'}")
    print("=" * 100)
