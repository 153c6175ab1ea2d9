#!/usr/bin/env python
"""Device check for a lent GPU machine: fp16 parity, nvJPEG parity, decode and model speed.

    export PYTHONPATH=.   # from the repository root, where the project is not installed
    python benchmarks/gpu_check.py --out $OUT/gpu_check.json          # a CUDA machine, < 8 min
    python benchmarks/gpu_check.py --checkpoint sscd_disc_mixup.torchvision.pt --photos DIR
    python benchmarks/gpu_check.py --device cpu --smoke --out /tmp/g.json   # the logic, on a CPU

Needs torch with CUDA and torchvision only (no Docker, TensorRT, DALI or Triton) and this
project importable: run it from the repository root with `PYTHONPATH=.` where the project
is not installed (a GPU machine with a bare checkout); with `pip install -e .` (the .venv)
`PYTHONPATH` is not needed. In one run, every phase time-boxed (--budget-s):

1. model parity on real photographs, through sscd_triton/export/validate.py's `model_parity` (upstream
   `skew_320` batches 1, 3, 16 and `small_288` one at a time) against PyTorch fp32 on the
   CPU: the model fp32 on the device (TF32 off) with the fp32 bound, and the fp16
   channels-last model (half-precision trunk; GeM, the Linear and L2 in fp32, the export's
   island) with the fp16 bounds of sscd_triton/parity.py;
2. decode parity: the photographs as JPEG (quality 90) decoded batched by
   `torchvision.io.decode_jpeg(device="cuda")` (nvJPEG), resized on the GPU (bilinear,
   antialias) and normalised, against the PIL reference `sscd_triton.images.load_tensor`,
   with the fp32 model and end to end with the fp16 model; pipeline bounds (centred cosine,
   ratio to the nearest other image, top-1);
3. cut and corrupt JPEGs (issue 16): each decoded by `decode_jpeg` on the device right after
   a whole photograph (nvJPEG's hardware path returned cut JPEGs without an error, holding
   the earlier image's pixels) and run through `images.check_complete`, the check every
   serving path runs before any decoder: a cut file passes when the decoder raised or the
   check refused it; a corrupt scan (structure whole) is reported, not bounded;
4. the int8 plan, where TensorRT imports (not on the lent machine: one n/a row): the gpu
   repository's int8 ONNX built as a strongly typed plan, its parity against fp32 as the
   int8 export report measures it, and its throughput;
5. throughput: batched decode alone and decode + resize + normalise; decode of large
   photographs (2 and 12 megapixels, baseline and progressive, batch 16); the fp16
   channels-last model at 320 x 320, batch 64/128/256, eager and replayed as a plain
   `torch.cuda.CUDAGraph`.

Prints one table (device named above it) and writes one JSON with --out. Weights: the
project's demo weights (seeded, BatchNorm statistics estimated: untrained, meaningless for
copy detection) unless --checkpoint. Photographs: `sscd_triton.samples` (16 public-domain
and CC0 JPEGs shipped with the package) unless --photos DIR (any JPEG/PNG/... files; at least 3).
Timing: the model rows are CUDA-event times per call (median); the decode rows host-clock
times per batch with a synchronize (nvJPEG has a CPU part). Inputs: random normal fp16
tensors for the model (never zeros), the photographs as JPEG cycled to the batch size for
decode.
Exit status: 0 every bound held, 1 a parity bound failed, 2 bad arguments or inputs,
3 no CUDA device (one line; nothing measured).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import sys
import time
import traceback

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sscd_triton import files, images, parity, spec

GFLOP_PER_IMAGE_320 = 16.7  # ResNet50 at 320 x 320 (../shared/triton/NOTES.md)
JPEG_QUALITY = 90
EXIT_FAIL, EXIT_USAGE, EXIT_NO_CUDA = 1, 2, 3


class UsageError(ValueError):
    """Bad arguments or inputs: one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        print(f"gpu_check: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", metavar="JSON", help="write every result here")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cuda (default; exit 3 without it) or cpu (logic check only)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes (3 photos, parity and timing at 64x64 (--size), batches "
                        "2 and 4, 2 iterations): the whole logic in well under a minute on a CPU")
    p.add_argument("--checkpoint", help="published SSCD checkpoint (default: demo weights)")
    p.add_argument("--photos", metavar="DIR",
                   help="folder of photographs (default: sscd_triton.samples)")
    p.add_argument("--max-photos", type=int, default=16)
    p.add_argument("--batches", type=int, nargs="+", help="throughput batch sizes "
                   "(default 64 128 256; --smoke 2 4)")
    p.add_argument("--size", type=int, help="model throughput input size (default 320; --smoke 64)")
    p.add_argument("--iters", type=int, help="timed iterations per row (default 50; --smoke 2)")
    p.add_argument("--warmup", type=int, help="untimed iterations per row (default 10; --smoke 1)")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="whole-run time box in seconds; timing rows shrink or are skipped "
                        "to stay inside it (default 420)")
    args = p.parse_args(argv)
    smoke = args.smoke
    args.batches = args.batches or ([2, 4] if smoke else [64, 128, 256])
    args.size = args.size or (64 if smoke else 320)
    args.iters = args.iters or (2 if smoke else 50)
    args.warmup = args.warmup if args.warmup is not None else (1 if smoke else 10)
    if smoke:
        args.max_photos = min(args.max_photos, 3)
    if args.max_photos < 3:
        p.error(f"--max-photos {args.max_photos}: parity needs at least 3 photographs")
    if min(args.batches) < 1 or args.size < spec.MIN_INPUT_SIZE or args.iters < 1:
        p.error("--batches and --iters must be >= 1, --size >= "
                f"{spec.MIN_INPUT_SIZE}")
    if args.budget_s <= 0:
        p.error("--budget-s must be > 0")
    return args


# --- time boxes ------------------------------------------------------------------------
class Clock:
    """The run's time box: phases ask how long they may take; timing rows stop early."""

    def __init__(self, budget_s: float):
        self.start = time.perf_counter()
        self.budget = budget_s
        self.phases: dict[str, float] = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.budget - self.elapsed()

    @contextlib.contextmanager
    def phase(self, name: str, checks: list):
        """Time a phase; an exception in it becomes a failed check (traceback on stderr)
        and the run goes on, so one broken phase does not cost the others' results."""
        from sscd_triton.report import Check
        t = time.perf_counter()
        print(f"[{self.elapsed():6.1f}s] {name}", flush=True)
        try:
            yield
        except Exception as e:  # noqa: BLE001 - reported, never swallowed silently
            traceback.print_exc()
            msg = (str(e).strip().splitlines() or [""])[0][:200]
            checks.append(Check(f"phase: {name}", False, f"crashed: {type(e).__name__}: {msg}"))
        finally:
            self.phases[name] = round(time.perf_counter() - t, 2)


# --- the device ------------------------------------------------------------------------
def describe(device: str) -> dict:
    import torchvision
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"device": device, "name": "cpu: " + cpu, "cpu_model": cpu, "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(name=torch.cuda.get_device_name(0),
                    capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                    memory_gib=round(props.total_memory / 2**30, 1),
                    multiprocessors=props.multi_processor_count)
    return info


# --- models ----------------------------------------------------------------------------
class HalfIsland(nn.Module):
    """The export's fp16 recipe in PyTorch: the trunk in half precision, channels-last;
    GeM, the Linear and L2 normalisation in fp32 (sscd_triton/export/fp16.py; pow(3) overflows fp16)."""

    def __init__(self, sscd: nn.Module):
        super().__init__()
        self.m = copy.deepcopy(sscd).eval()
        self.m.backbone.half().to(memory_format=torch.channels_last)
        self.m.backbone.fc.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from sscd_triton.export.model import gem
        b = self.m.backbone
        x = x.to(torch.float16).contiguous(memory_format=torch.channels_last)
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        x = b.layer4(b.layer3(b.layer2(b.layer1(x))))
        x = b.fc(gem(x.float()))
        return F.normalize(x, dim=1, eps=spec.L2_EPS)


class Autocast(nn.Module):
    """fp16 for a TorchScript module whose keys do not map onto SSCD: autocast keeps
    pow and norm in fp32 but is not the export's exact island (labelled as such)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=torch.float16):
            return self.module(x.contiguous(memory_format=torch.channels_last)).float()


def load_model(args):
    """(fp32 module, fp16-island module, label)."""
    from sscd_triton.export import checkpoints
    from sscd_triton.export.demo import DEMO_LABEL, demo_model
    from sscd_triton.export.model import SSCD
    if not args.checkpoint:
        m = demo_model()
        return m, HalfIsland(m), DEMO_LABEL
    try:
        loaded = checkpoints.load(args.checkpoint)
    except checkpoints.CheckpointError as e:
        raise UsageError(f"--checkpoint: {e}") from None
    label = f"{os.path.basename(args.checkpoint)} ({loaded.layout}, {loaded.trunk}, {loaded.dims}-d)"
    if isinstance(loaded.model, SSCD):
        return loaded.model, HalfIsland(loaded.model), label
    # TorchScript: rebuild the same weights as an SSCD module to place the fp32 island;
    # the fp32 reference stays the TorchScript module itself, so the rebuild is checked too.
    try:
        state = dict(loaded.model.state_dict())
        rebuilt = checkpoints._load_state_dict(state, args.checkpoint, loaded.dims).model
        return loaded.model, HalfIsland(rebuilt), label + ", fp16 from its state_dict"
    except Exception:  # noqa: BLE001 - any mismatch: fall back, and say so in the label
        return loaded.model, Autocast(loaded.model), label + ", fp16 by autocast (keys not mappable)"


def runner(model, device: str):
    """float32 [N,3,H,W] numpy -> float32 [N,dims] numpy through `model` on `device`."""
    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = model(torch.from_numpy(np.ascontiguousarray(x)).to(device))
            return out.float().cpu().numpy()
    return run


def memo(run):
    """The CPU reference is asked for the same tensors by several checks: compute once."""
    cache: dict = {}

    def cached(x: np.ndarray) -> np.ndarray:
        key = (x.shape, hash(x.tobytes()))
        if key not in cache:
            cache[key] = run(x)
        return cache[key]
    return cached


# --- photographs -----------------------------------------------------------------------
def load_photos(args) -> tuple[str, list[tuple[str, object]], list[str]]:
    """(source, [(name, RGB PIL image)], ["name: why skipped"])."""
    skipped: list[str] = []
    if args.photos:
        if not os.path.isdir(args.photos):
            raise UsageError(f"--photos {args.photos}: not a folder")
        out = []
        for name in sorted(os.listdir(args.photos)):
            if not name.lower().endswith(spec.IMAGE_EXTENSIONS):
                continue
            with open(os.path.join(args.photos, name), "rb") as f:
                try:
                    out.append((name, images.decode(f.read())))
                except images.ImageError as e:
                    skipped.append(f"{name}: {e}")
            if len(out) == args.max_photos:
                break
        source = os.path.abspath(args.photos)
    else:
        from sscd_triton import samples

        out = list(samples.photographs()[: args.max_photos])
        source = f"sscd_triton.samples ({samples.FOLDER})"
    if len(out) < 3:
        raise UsageError(f"{len(out)} photographs in {source}: parity needs at least 3")
    return source, out, skipped


@contextlib.contextmanager
def photographs_as(photos):
    """sscd_triton/export/validate.py reads `samples.photographs()`; point it at these for the call."""
    from sscd_triton import samples
    saved = samples.photographs
    samples.photographs = lambda: tuple(photos)
    try:
        yield
    finally:
        samples.photographs = saved


# --- GPU decode ------------------------------------------------------------------------
def decode_batch(jpegs: list, device: str):
    """Batched decode_jpeg (nvJPEG on cuda): list of uint8 [3,H,W] on `device`."""
    from torchvision.io import ImageReadMode, decode_jpeg
    out = decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device)
    return out if isinstance(out, list) else [out]


def preprocess_batch(decoded: list, size: int):
    """uint8 [3,H,W] list -> float32 [N,3,S,S]: antialiased bilinear resize, then
    /255 and the ImageNet normalisation (upstream skew_320 arithmetic, on the device)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF
    resized = torch.stack([TF.resize(img, [size, size], interpolation=InterpolationMode.BILINEAR,
                                     antialias=True) for img in decoded])
    mean = torch.tensor(spec.MEAN, device=resized.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.STD, device=resized.device).view(1, 3, 1, 1)
    return (resized.float() / 255.0 - mean) / std


def decode_checks(photos, model32, model16, ref_run, device: str,
                  size: int | None = None) -> list:
    from sscd_triton.report import Check
    pre = spec.square(size or spec.PREPROCESS["square320"].size)
    encoded = [images.encode(img, "JPEG", quality=JPEG_QUALITY) for _, img in photos]
    ref = ref_run(np.stack([images.load_tensor(b, pre) for b in encoded]))
    which = "nvJPEG" if device == "cuda" else "libjpeg-turbo (cpu)"
    name = f"{which} decode_jpeg + resize vs PIL, x{len(photos)}"
    try:
        tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in encoded]
        with torch.inference_mode():
            x = preprocess_batch(decode_batch(tensors, device), pre.size)
            cands = {"fp32 model": model32(x).float().cpu().numpy(),
                     "fp16 model, end to end": model16(x).float().cpu().numpy()}
    except (RuntimeError, ValueError) as e:  # e.g. a torchvision built without nvJPEG
        # on cuda this check is the point of the run: not being able to decode fails it
        return [Check(name, False if device == "cuda" else None,
                      f"decode_jpeg on {device} failed: {str(e).splitlines()[0][:200]}")]
    return [c for label, cand in cands.items()
            for c in parity.checks(f"{name}, {label}", parity.measure(cand, ref), exact=False,
                                   resampled=True)]


# --- cut and corrupt JPEGs ------------------------------------------------------------
def truncation_cases(img) -> list[tuple[str, bytes, bool]]:
    """(label, bytes, cut) of one photograph as JPEG (baseline, progressive) cut at 50% and
    90%, alone and zero-padded past its length (a request row), and corrupt: 64 bytes of
    its scan overwritten mid-file (structure whole: `cut` False)."""
    out = []
    for kind, params in (("baseline", {}), ("progressive", {"progressive": True})):
        data = images.encode(img, "JPEG", quality=JPEG_QUALITY, **params)
        for frac in (0.5, 0.9):
            cut = data[: int(len(data) * frac)]
            out.append((f"{kind} cut at {frac:.0%}", cut, True))
            out.append((f"{kind} cut at {frac:.0%}, zero-padded", cut + b"\0" * (len(data) - len(cut)), True))
        mid = len(data) // 2
        out.append((f"{kind} corrupt scan", data[:mid] + bytes(range(1, 65)) + data[mid + 64:], False))
    return out


def truncation_checks(good: bytes, cases, decode) -> list:
    """A Check per case: `decode(list of uint8 tensors)` on [good, case] (raises or returns)
    and `images.check_complete(case)`. Cut files must be caught by one of the two; corrupt
    scans are informational (what the decoder does is the finding)."""
    from sscd_triton.report import Check
    checks = []
    first = torch.frombuffer(bytearray(good), dtype=torch.uint8)
    for label, data, cut in cases:
        try:
            out = decode([first, torch.frombuffer(bytearray(data), dtype=torch.uint8)])
            decoder = f"decoder: no error ({'x'.join(map(str, out[-1].shape))})"
            raised = False
        except (RuntimeError, ValueError) as e:
            decoder, raised = f"decoder: raised ({str(e).splitlines()[0][:80]})", True
        try:
            images.check_complete(data)
            check, refused = "check: passed", False
        except images.ImageError as e:
            check, refused = f"check: refused ({e})", True
        ok = (raised or refused) if cut else None
        checks.append(Check(f"JPEG {label}", ok, f"{decoder}; {check}",
                            "caught by the decoder or the check" if cut else "reported"))
    return checks


# --- timing ----------------------------------------------------------------------------
def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_loop(device: str, fn, iters: int, warmup: int, deadline: float,
              wall: bool = False) -> list[float]:
    """Per-iteration seconds of `fn()`, stopping at `deadline` (perf_counter) after at
    least one timed iteration. On cuda: CUDA events around each call (GPU time, launch
    gaps included), or with `wall` the host clock with a synchronize per call (for work
    with a CPU part, like nvJPEG's Huffman decoding)."""
    for _ in range(warmup):
        if time.perf_counter() > deadline:
            break
        fn()
    _sync(device)
    times = []
    if device == "cuda" and not wall:
        pairs = []
        for _ in range(iters):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            pairs.append((s, e))
            if time.perf_counter() > deadline:
                break
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) / 1e3 for s, e in pairs]
    else:
        for _ in range(iters):
            t = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - t)
            if time.perf_counter() > deadline:
                break
    return times


def _row(kind: str, batch: int, times: list[float], **extra) -> dict:
    med = statistics.median(times)
    return {"kind": kind, "batch": batch, "iters": len(times), "ms_median": round(med * 1e3, 3),
            "ms_min": round(min(times) * 1e3, 3), "images_per_s": round(batch / med, 1), **extra}


def decode_throughput(photos, args, clock: Clock, box_s: float) -> list[dict]:
    device = args.device
    encoded = [images.encode(img, "JPEG", quality=JPEG_QUALITY) for _, img in photos]
    tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in encoded]
    pixels = [img.size[0] * img.size[1] for _, img in photos]
    rows, end = [], time.perf_counter() + box_s
    per_row = box_s / (2 * len(args.batches))
    for b in args.batches:
        batch = [tensors[i % len(tensors)] for i in range(b)]
        mp = sum(pixels[i % len(pixels)] for i in range(b)) / 1e6
        for kind, fn in (
                ("decode", lambda: decode_batch(batch, device)),
                ("decode+resize+normalise",
                 lambda: preprocess_batch(decode_batch(batch, device), args.size))):
            if time.perf_counter() + 1 > end:
                rows.append({"kind": kind, "batch": b, "skipped": "time box"})
                continue
            try:
                with torch.inference_mode():
                    times = time_loop(device, fn, args.iters, min(args.warmup, 3),
                                      min(end, time.perf_counter() + per_row), wall=True)
            except (RuntimeError, ValueError) as e:
                rows.append({"kind": kind, "batch": b, "skipped": str(e).splitlines()[0]})
                continue
            r = _row(kind, b, times, megapixels_per_batch=round(mp, 2))
            r["megapixels_per_s"] = round(mp / (r["ms_median"] / 1e3), 1)
            rows.append(r)
    return rows


LARGE_SIZES = {"2MP": (1632, 1224), "12MP": (4000, 3000)}


def large_decode_throughput(img, args, box_s: float, batch: int = 16) -> list[dict]:
    """Decode of large photographs: one photograph upscaled to each of LARGE_SIZES, as
    baseline and progressive JPEG, `batch` per call (upscaled photographs compress better
    than camera ones: bytes per pixel are lower, pixels per second are what compares)."""
    device = args.device
    rows, end = [], time.perf_counter() + box_s
    per_row = box_s / (2 * len(LARGE_SIZES))
    for name, size in LARGE_SIZES.items():
        big = img.resize(size)
        for kind, params in (("baseline", {}), ("progressive", {"progressive": True})):
            what = f"decode {name} {kind}"
            if time.perf_counter() + 1 > end:
                rows.append({"kind": what, "batch": batch, "skipped": "time box"})
                continue
            data = images.encode(big, "JPEG", quality=JPEG_QUALITY, **params)
            t = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            try:
                times = time_loop(device, lambda: decode_batch([t] * batch, device), args.iters,
                                  min(args.warmup, 2), min(end, time.perf_counter() + per_row),
                                  wall=True)
            except (RuntimeError, ValueError) as e:
                rows.append({"kind": what, "batch": batch, "skipped": str(e).splitlines()[0]})
                continue
            mp = batch * size[0] * size[1] / 1e6
            r = _row(what, batch, times, megapixels_per_batch=round(mp, 2))
            r["megapixels_per_s"] = round(mp / (r["ms_median"] / 1e3), 1)
            rows.append(r)
    return rows


def model_throughput(model16, args, clock: Clock, box_s: float) -> list[dict]:
    device, size = args.device, args.size
    gflop = GFLOP_PER_IMAGE_320 * (size / 320) ** 2
    rows, end = [], time.perf_counter() + box_s
    modes = ("eager", "cuda-graph") if device == "cuda" else ("eager",)
    per_row = box_s / (len(modes) * len(args.batches))
    gen = torch.Generator(device="cpu").manual_seed(0)
    for b in args.batches:
        x = torch.randn(b, 3, size, size, generator=gen).to(device)
        x = x.half().contiguous(memory_format=torch.channels_last)
        eager_out = None
        for mode in modes:
            if time.perf_counter() + 2 > end:
                rows.append({"kind": f"model fp16 {mode}", "batch": b, "skipped": "time box"})
                continue
            deadline = min(end, time.perf_counter() + per_row)
            extra = {}
            try:
                with torch.inference_mode():
                    if mode == "eager":
                        times = time_loop(device, lambda: model16(x), args.iters,
                                          args.warmup, deadline)
                        eager_out = model16(x).float()
                    else:
                        graph, out = capture(model16, x)
                        times = time_loop(device, graph.replay, args.iters,
                                          args.warmup, deadline)
                        if eager_out is not None:
                            extra["max_abs_vs_eager"] = float((out.float() - eager_out).abs().max())
                        del graph, out
            except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
                rows.append({"kind": f"model fp16 {mode}", "batch": b,
                             "skipped": str(e).splitlines()[0]})
                continue
            r = _row(f"model fp16 {mode}", b, times, size=size, **extra)
            r["tflops"] = round(r["images_per_s"] * gflop / 1e3, 1)
            rows.append(r)
        del x, eager_out
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def int8_plan(model32_cpu, ref_run, args, clock: Clock, box_s: float) -> tuple[list, list]:
    """The int8 plan as the gpu repository serves it: export's gpu Q/DQ form (symmetric,
    calibrated on the bundled photographs) built as a strongly typed plan with TensorRT's
    Python API, measured against fp32 PyTorch as the int8 export measures it
    (export.int8.cost_checks, held-out photographs), then timed at each --batches size
    (host clock, copies in and out included). Where TensorRT does not import (the lent
    machine has none) one n/a row says so: docker/gpu_smoke.sh with PRECISION=int8
    measures it in the serving image."""
    import tempfile

    from sscd_triton.export import int8, onnx_export, trt_build
    from sscd_triton.export.trt_errors import Unavailable
    from sscd_triton.report import Check

    if args.device != "cuda":
        return [Check("int8 plan", None, "n/a: TensorRT plans need the cuda device")], []
    try:
        trt, logger, builder = trt_build.open_builder()
    except Unavailable as e:
        return [Check("int8 plan", None, f"n/a: {e}; docker/gpu_smoke.sh with PRECISION=int8 "
                                         "measures it in the serving image")], []
    size = args.size
    pre = spec.square(size)
    calibration = int8.bundled_calibration(pre)
    fp32 = onnx_export.to_onnx(model32_cpu, size).SerializeToString()
    hi = max(args.batches)
    shapes = {spec.INPUT_NAME: ((1, 3, size, size), (max(1, hi // 2), 3, size, size),
                                (hi, 3, size, size))}
    with tempfile.TemporaryDirectory(prefix="sscd-int8-plan-") as tmp:
        path = os.path.join(tmp, "sscd8.onnx")
        with open(path, "wb") as f:
            f.write(int8.quantize(fp32, calibration, "gpu"))
        built = trt_build.build_plan(trt, logger, builder, path, os.path.join(tmp, "sscd8.plan"),
                                     shapes, None, 4)
    engine = trt.Runtime(logger).deserialize_cuda_engine(built.plan)
    run = trt_build.plan_runner(trt, engine, shapes)
    checks, _ = int8.cost_checks(ref_run, run, pre, calibration)
    for c in checks:
        c.name = f"int8 plan (TensorRT {trt.__version__}) vs fp32 PyTorch cpu: {c.name}"
    rows, deadline = [], time.perf_counter() + box_s
    for b in sorted(args.batches):
        x = np.random.default_rng(0).standard_normal((b, 3, size, size)).astype(np.float32)
        times = time_loop("cuda", lambda: run(x), args.iters, args.warmup, deadline, wall=True)
        if times:
            rows.append(_row("int8 plan (host clock, copies included)", b, times, size=size,
                             build_s=round(built.seconds, 1)))
    return checks, rows


def capture(model, x):
    """A plain CUDA graph of model(x) (static input x): warm-up on a side stream, capture."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            model(x)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = model(x)
    graph.replay()
    torch.cuda.synchronize()
    return graph, out


# --- report ----------------------------------------------------------------------------
def print_table(doc: dict, checks: list) -> None:
    dev = doc["device"]
    head = (f"gpu_check on {dev['name']} (torch {dev['torch']}, torchvision {dev['torchvision']}, "
            f"CUDA {dev['cuda'] or '-'}); weights: {doc['weights']}")
    lines = []
    for c in checks:
        lines.append((c.mark, c.name, c.detail, c.bound))
    graph_gain = {}
    for r in doc["model"]:
        if r.get("kind") == "model fp16 eager" and "images_per_s" in r:
            graph_gain[r["batch"]] = r["images_per_s"]
    for r in doc["decode"] + doc["model"]:
        what = f"{r['kind']}, batch {r['batch']}"
        if "skipped" in r:
            lines.append(("skip", what, f"n/a: {r['skipped']}", ""))
            continue
        detail = f"{r['images_per_s']:.0f} img/s, {r['ms_median']:.2f} ms/batch"
        if "tflops" in r:
            detail += f", {r['tflops']} TFLOP/s"
            if r["kind"].endswith("cuda-graph") and r["batch"] in graph_gain:
                detail += f", x{r['images_per_s'] / graph_gain[r['batch']]:.2f} vs eager"
        if "megapixels_per_s" in r:
            detail += f", {r['megapixels_per_s']} MP/s"
        lines.append(("time", what, detail, f"{r['iters']} iters"))
    w = [max(len(ln[i]) for ln in lines + [("mark", "what", "result", "bound")]) for i in range(4)]
    print("\n" + head)
    print(f"  {'':4}  {'what':<{w[1]}}  {'result':<{w[2]}}  bound / note")
    for mark, what, detail, bound in lines:
        print(f"  {mark:4}  {what:<{w[1]}}  {detail:<{w[2]}}  {bound}")
    failed = sum(c.ok is False for c in checks)
    print(f"\n{'all parity checks passed' if not failed else f'{failed} parity check(s) FAILED'}"
          f" in {doc['elapsed_s']:.1f}s (budget {doc['options']['budget_s']:.0f}s)", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device: torch {torch.__version__} sees no GPU; nothing "
              "measured (use --device cpu --smoke to check the logic on a CPU)", file=sys.stderr)
        return EXIT_NO_CUDA
    from sscd_triton.export import validate
    from sscd_triton.report import Check
    clock = Clock(args.budget_s)
    device = args.device
    try:  # silent until the inputs are known good: a bad input is one line
        source, photos, skipped = load_photos(args)
        model32_cpu, model16, label = load_model(args)
        clock.phases["load photographs and weights"] = round(clock.elapsed(), 2)
    except UsageError as e:
        print(f"gpu_check: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    info = describe(device)
    print(f"      device: {info['name']}; {len(photos)} photographs from {source}; {label}",
          flush=True)
    for note in skipped:
        print(f"      skipped photograph {note}", flush=True)
    checks: list[Check] = []
    # --smoke checks the logic at --size (validate's static_size: small_288 then reads n/a);
    # a real run measures upstream's sizes.
    parity_size = args.size if args.smoke else None
    ref_run = memo(runner(model32_cpu, "cpu"))
    model32 = copy.deepcopy(model32_cpu).to(device).eval()
    model16 = model16.to(device).eval()
    if device == "cuda":  # parity: fp32 means fp32 (cuDNN convolutions default to TF32)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    with clock.phase("model parity (sscd_triton/export/validate.py model_parity, real photographs)",
                     checks), photographs_as(photos):
        if device == "cuda":
            for c in validate.model_parity(runner(model32, device), ref_run, "fp32",
                                           parity_size):
                c.name = f"fp32 {device} vs fp32 cpu, {c.name}"
                checks.append(c)
        else:
            checks.append(Check("fp32 cpu vs fp32 cpu", None, "n/a: the device is the CPU"))
        for c in validate.model_parity(runner(model16, device), ref_run, "fp16",
                                       parity_size):
            c.name = f"fp16 trunk ({device}) vs fp32 cpu, {c.name}"
            checks.append(c)
    with clock.phase("decode parity (decode_jpeg + resize on the device vs PIL)", checks):
        checks += decode_checks(photos, model32, model16, ref_run, device, parity_size)
    del model32
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.cuda.empty_cache()
    reserve = 5.0  # report writing
    decode_rows: list[dict] = []
    model_rows: list[dict] = []
    with clock.phase("cut and corrupt JPEGs (decode_jpeg on the device, check_complete)", checks):
        img = photos[0][1]
        checks += truncation_checks(images.encode(photos[1][1], "JPEG", quality=JPEG_QUALITY),
                                    truncation_cases(img), lambda ts: decode_batch(ts, device))
    with clock.phase("decode throughput", checks):
        decode_rows = decode_throughput(photos, args, clock,
                                        max(0.0, min(60.0, 0.25 * (clock.left() - reserve))))
    with clock.phase("decode throughput, large photographs", checks):
        decode_rows += large_decode_throughput(photos[0][1], args,
                                               max(0.0, min(60.0, 0.2 * (clock.left() - reserve))),
                                               batch=2 if args.smoke else 16)
    int8_rows: list[dict] = []
    with clock.phase("int8 plan (TensorRT, explicit Q/DQ; n/a without TensorRT)", checks):
        int8_checks, int8_rows = int8_plan(model32_cpu, ref_run, args, clock,
                                           max(0.0, min(60.0, 0.2 * (clock.left() - reserve))))
        checks += int8_checks
    with clock.phase("model throughput (fp16 channels-last, eager and CUDA graph)", checks):
        model_rows = model_throughput(model16, args, clock, max(0.0, clock.left() - reserve))
    model_rows += int8_rows
    passed = all(c.ok is not False for c in checks)
    doc = {
        "tool": "benchmarks/gpu_check.py",
        "passed": passed,
        "device": info,
        "weights": label,
        "photos": {"source": source, "n": len(photos), "names": [n for n, _ in photos],
                   "skipped": skipped,
                   "jpeg_quality_for_decode": JPEG_QUALITY},
        "options": {"device": device, "smoke": args.smoke, "batches": args.batches,
                    "size": args.size, "iters": args.iters, "warmup": args.warmup,
                    "budget_s": args.budget_s, "checkpoint": args.checkpoint,
                    "parity_size": parity_size or "upstream (320 square, 288 short edge)",
                    "tf32_in_parity": False},
        "bounds": {"fp32_max_abs": spec.FP32_MAX_ABS, "centered_cosine_min": spec.CENTERED_COSINE_MIN,
                   "nearest_ratio_max": spec.NEAREST_RATIO_MAX,
                   "resampled_centered_cosine_min": spec.RESAMPLED_CENTERED_COSINE_MIN,
                   "resampled_nearest_ratio_max": spec.RESAMPLED_NEAREST_RATIO_MAX},
        "checks": [{"name": c.name, "ok": c.ok, "mark": c.mark, "detail": c.detail,
                    "bound": c.bound, "figures": c.figures} for c in checks],
        "decode": decode_rows,
        "model": model_rows,
        "phases_s": clock.phases,
        "elapsed_s": round(clock.elapsed(), 1),
    }
    print_table(doc, checks)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        files.write_atomic(args.out, json.dumps(doc, indent=2))
    return 0 if passed else EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
