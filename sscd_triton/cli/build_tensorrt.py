"""Build a TensorRT plan from an SSCD ONNX graph and print its parity report against PyTorch.

    python export/export_onnx.py --checkpoint CKPT --output runs/sscd16.onnx --precision fp16
    python export/build_tensorrt.py --onnx runs/sscd16.onnx --output runs/sscd.plan \\
        --checkpoint CKPT --size 320 --timing-cache runs/trt.cache
    python export/build_tensorrt.py --onnx runs/sscd.onnx --min-size 224 --opt-size 288x384 \\
        --max-size 512

The plan's precision is its ONNX's (a strongly typed network, the only kind TensorRT 11
builds): the fp16 ONNX gives an fp16 plan with GeM, the Linear and L2 in fp32, the fp32
ONNX an fp32 plan with TF32 off, the int8 ONNX (`export_onnx.py --precision int8
--int8-target gpu`: explicit Q/DQ, symmetric) an int8 plan, explicitly quantised, no
calibrator. `--precision` defaults to that; naming another one is refused. Needs TensorRT 10 or 11 and a CUDA GPU; a plan runs only on the GPU model and
TensorRT version that built it. Exit status: 0 ok, 1 a parity check failed, 2 bad input
(checked before TensorRT is looked for), 3 TensorRT or GPU unavailable (no plan written).
Details in sscd_triton/export/: trt_errors.py (exit statuses), onnx_graph.py (what the
ONNX holds: precision, I/O), trt_profile.py (the profile), trt_build.py (TensorRT).
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import dataclass

import onnx

from sscd_triton.cli._main import command
from sscd_triton.export import checkpoints, onnx_graph, trt_build, trt_profile, validate
from sscd_triton.export.trt_errors import InputError, Unavailable
from sscd_triton.report import Check, Report
from sscd_triton import files, spec


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and status 2, like every other bad input
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--onnx", required=True, help="graph from export/export_onnx.py (its "
                   "--precision fp16 output for an fp16 plan)")
    p.add_argument("--output", help="the .plan to write (default: --onnx with .plan)")
    p.add_argument("--checkpoint", help="the checkpoint the ONNX came from, for parity against "
                   "PyTorch (without it parity is skipped)")
    p.add_argument("--precision", choices=("auto", *onnx_graph.PRECISIONS), default="auto",
                   help="auto (default): the ONNX's. fp16 needs the ONNX from export_onnx.py "
                   "--precision fp16 (fp16 trunk, fp32 GeM/Linear/L2); int8 its --precision int8 "
                   "--int8-target gpu output; fp32 the fp32 ONNX")
    p.add_argument("--min-batch", type=int, default=1)
    p.add_argument("--opt-batch", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--size", metavar="S", help="fix H = W = S (default 320, square320 serving)")
    for which in ("min", "opt", "max"):
        p.add_argument(f"--{which}-size", metavar="S|HxW",
                       help=f"dynamic H, W: {which} of the range")
    p.add_argument("--timing-cache", metavar="PATH",
                   help="loaded if present, saved after the build")
    p.add_argument("--workspace-gib", type=float, default=4.0, help="builder workspace limit")
    return p.parse_args(argv)


def check_paths(onnx_path: str, output: str, timing_cache: str | None) -> None:
    """--output and --timing-cache must be writable files, the output not the input."""
    try:
        files.check_writable(output, "--output", "sscd.plan")
        if os.path.abspath(output) == os.path.abspath(onnx_path):
            raise InputError(f"--output {output} would overwrite the --onnx input")
        if timing_cache:
            files.check_writable(timing_cache, "--timing-cache", "trt.cache")
            if os.path.exists(timing_cache) and not os.access(timing_cache, os.R_OK):
                raise InputError(f"--timing-cache {timing_cache}: not readable")
    except files.OutputError as e:  # a bad flag: exit 2 like every other bad input
        raise InputError(str(e)) from None


@dataclass
class Prepared:
    model: onnx.ModelProto
    shapes: trt_profile.Profile
    precision: str  # the ONNX's: "fp32" or "fp16"
    loaded: checkpoints.Loaded | None


def prepare(args: argparse.Namespace) -> Prepared:
    """Every input check, before TensorRT is imported; raises InputError naming the flag."""
    model = onnx_graph.load_onnx(args.onnx)
    precision = onnx_graph.resolve_precision(args.precision, model, args.onnx)
    args.output = args.output or os.path.splitext(args.onnx)[0] + ".plan"
    check_paths(args.onnx, args.output, args.timing_cache)
    if not args.workspace_gib > 0:
        raise InputError(f"--workspace-gib {args.workspace_gib}: must be > 0")
    shapes = profile_of(args)
    trt_profile.check_profile(shapes, model, args.onnx)
    try:
        loaded = checkpoints.load(args.checkpoint) if args.checkpoint else None
    except checkpoints.CheckpointError as e:
        raise InputError(f"--checkpoint {e}") from None
    width = onnx_graph.descriptor_width(model)
    if loaded and width and width != loaded.dims:
        raise InputError(f"--checkpoint {args.checkpoint} gives {loaded.dims}-d descriptors "
                         f"but --onnx {args.onnx} gives {width}-d: not the same model")
    return Prepared(model, shapes, precision, loaded)


def parity(trt, engine, prep: Prepared) -> list[Check]:
    if prep.loaded is None:
        return [Check("parity", None, "n/a: no --checkpoint (the model the ONNX came from)")]
    import torch

    if not torch.cuda.is_available():
        return [Check("parity", None, f"n/a: no CUDA device visible to torch {torch.__version__}")]
    run, static_size, note = trt_profile.parity_size(prep.shapes)
    if not run:
        return [Check("parity", None, note)]
    plan_run = trt_build.plan_runner(trt, engine, prep.shapes)
    if prep.precision == "int8":  # measured as the int8 export measures it, against PyTorch
        from sscd_triton.export import int8

        meta = {p.key: p.value for p in prep.model.metadata_props}
        checks, _ = int8.cost_checks(validate.torch_runner(prep.loaded.model), plan_run,
                                     spec.square(static_size or spec.PREPROCESS["square320"].size),
                                     int8.recorded_calibration(meta) or int8.Calibration([], [], set()))
        return checks
    checks = validate.model_parity(plan_run, validate.torch_runner(prep.loaded.model),
                                   prep.precision, static_size)
    for c in checks:
        if c.ok is None and note:  # small_288 skipped because of the profile, not a fixed size
            c.detail = note
    return checks


def profile_of(args) -> trt_profile.Profile:
    """The optimisation profile the shape flags ask for."""
    return trt_profile.profile_shapes(
        min_batch=args.min_batch, opt_batch=args.opt_batch, max_batch=args.max_batch,
        size=args.size, min_size=args.min_size, opt_size=args.opt_size, max_size=args.max_size)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        prep = prepare(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        trt, logger, builder = trt_build.open_builder()
    except Unavailable as e:
        print(f"error: {e}; no plan written", file=sys.stderr)
        return 3
    report = Report("sscd-triton build: ONNX -> TensorRT plan, with parity against PyTorch",
                    3 + (prep.loaded is not None))
    if prep.loaded:
        report.log(f"loaded {args.checkpoint}: {prep.loaded.layout} layout, {prep.loaded.trunk}, "
                   f"{prep.loaded.dims}-d", checkpoint=args.checkpoint)
    try:
        built = trt_build.build_plan(trt, logger, builder, args.onnx, args.output, prep.shapes,
                                     args.timing_cache, args.workspace_gib)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    lo, opt, hi = prep.shapes[spec.INPUT_NAME]
    size_mb = len(built.plan) / 1e6
    report.log(f"built {prep.precision} plan (strongly typed, TF32 off) with TensorRT "
               f"{trt.__version__}, profile {list(lo)}..{list(opt)}..{list(hi)}: {built.layers} "
               f"layers, {size_mb:.1f} MB in {built.seconds:.0f}s -> {args.output}",
               onnx=args.onnx, plan=args.output, precision=prep.precision,
               tensorrt=trt.__version__, profile=[list(lo), list(opt), list(hi)],
               strongly_typed=True, tf32=False, build_s=round(built.seconds, 1),
               size_mb=round(size_mb, 1), timing_cache=built.cache_note)
    if prep.precision == "fp16":
        report.note("types from the ONNX: trunk fp16; GeM, Linear and L2 fp32 (its Cast island)")
    elif prep.precision == "int8":
        report.note("types from the ONNX: trunk int8 (explicit Q/DQ scales); GeM, Linear and "
                    "L2 fp32")
    report.note(built.cache_note)
    runtime = trt.Runtime(logger)  # kept referenced while the engine is in use
    engine = runtime.deserialize_cuda_engine(built.plan)
    dims = prep.loaded.dims if prep.loaded else None
    want = onnx_graph.declared_io(prep.model, dims)
    report.add(trt_build.io_checks(trt, engine, prep.shapes, want))
    checks = parity(trt, engine, prep)
    report.add(checks)
    ran = any(c.ok is not None for c in checks)
    report.log("validated the plan against PyTorch on real photographs" if ran else
               f"parity not run: {checks[0].detail[5:]}")
    report.table()
    json_path = args.output + ".parity.json"  # sscd.plan.parity.json: beside, not over, sscd.parity.json
    report.write_json(json_path)
    report.log(f"report written to {json_path}")
    print(f"\nNext: {command('export/build_repository.py')} --target gpu "
          f"--plan {shlex.quote(args.output)} ...")
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
