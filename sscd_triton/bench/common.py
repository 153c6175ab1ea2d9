"""What every benchmark row shares: the inputs, the row record, the row names."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from sscd_triton import images, samples, spec

PRE = spec.PREPROCESS["square320"]
JPEG_QUALITY = 90

# Row ids in print order; B and N are filled in from the arguments.
ROW_IDS = ("torch-eager", "ort-fp32", "ort-fp16", "ort-int8", "triton-descriptor",
           "triton-ensemble-1", "triton-ensemble-B", "triton-ensemble-B-int8",
           "client-decode-1p", "client-decode-Np")
ROW_HELP = {
    "torch-eager": "PyTorch eager fp32, inference_mode, preprocessed tensors",
    "ort-fp32": "ONNX Runtime direct, fp32 ONNX, same tensors",
    "ort-fp16": "ONNX Runtime direct, fp16 ONNX with fp32 GeM/Linear/L2 island",
    "ort-int8": "ONNX Runtime direct, the served int8 ONNX (cpu Q/DQ form), same tensors",
    "triton-descriptor": f"Triton {spec.DESCRIPTOR_MODEL}: float32 tensors over gRPC",
    "triton-ensemble-1": f"Triton {spec.ENSEMBLE_NAME} ensemble: 1 JPEG per request, server decodes",
    "triton-ensemble-B": f"Triton {spec.ENSEMBLE_NAME} ensemble: B JPEGs per request (uint8 [B, L])",
    "triton-ensemble-B-int8": f"the same on the int8 cpu repository's server (started after "
                              f"the fp32 one stopped)",
    "client-decode-1p": "client PIL decode + preprocess only (images.load_tensor), 1 process",
    "client-decode-Np": "client PIL decode + preprocess only, one process per core",
}


@dataclass(frozen=True)
class Budget:
    """How much each row measures: `images` timed per row, `batch` images per call or
    request, `requests` batched calls per row, `warmup` untimed rounds, `concurrency`
    requests in flight (Triton rows), `admin_key` for restricted server APIs."""

    images: int
    batch: int
    warmup: int = 1
    concurrency: int = 1
    admin_key: str | None = None

    @property
    def requests(self) -> int:
        return -(-self.images // self.batch)


@dataclass
class Row:
    id: str
    batch: int  # images per request
    concurrency: int
    images: int = 0  # images timed
    wall_s: float = 0.0
    latencies_ms: list = field(default_factory=list)  # one per request
    skipped: str = ""  # why the row did not run
    note: str = ""
    server: dict = field(default_factory=dict)  # model -> statistics deltas (Triton rows)
    load1: float = field(default_factory=lambda: round(os.getloadavg()[0], 2))  # at row start

    @property
    def images_per_s(self) -> float:
        return self.images / self.wall_s if self.wall_s > 0 else float("nan")

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    def summary(self, baseline: float | None) -> dict:
        out = {"path": self.id, "batch": self.batch, "concurrency": self.concurrency,
               "requests": len(self.latencies_ms), "images": self.images,
               "wall_s": round(self.wall_s, 3), "load1_at_start": self.load1}
        if self.skipped:
            return {**out, "skipped": self.skipped}
        out.update(images_per_s=round(self.images_per_s, 3),
                   p50_ms=round(self.pct(50), 2), p90_ms=round(self.pct(90), 2),
                   p99_ms=round(self.pct(99), 2),
                   ratio_vs_torch_eager=(round(self.images_per_s / baseline, 3)
                                         if baseline else None))
        if self.note:
            out["note"] = self.note
        if self.server:
            out["server"] = self.server
        return out


def load_inputs() -> tuple[list[bytes], np.ndarray]:
    """The fixed photographs as JPEG bytes, and their square320 tensors [P, 3, 320, 320]."""
    jpegs = [images.encode(img, "JPEG", quality=JPEG_QUALITY) for _, img in samples.photographs()]
    tensors = np.stack([images.load_tensor(j, PRE) for j in jpegs])
    return jpegs, tensors


def request_items(i: int, per_request: int, pool: int) -> list[int]:
    """Photograph indices of request i: the fixed set, cycled."""
    return [(i * per_request + k) % pool for k in range(per_request)]
