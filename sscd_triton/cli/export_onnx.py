"""Export an SSCD checkpoint to ONNX and print its parity report against PyTorch.

    python export/export_onnx.py --checkpoint sscd_disc_mixup.torchscript.pt --output sscd.onnx
    python export/export_onnx.py --output sscd.onnx          # demo weights (untrained)
    python export/export_onnx.py --checkpoint CKPT --precision int8 --calibration PHOTOS/ --output sscd8.onnx

Exit status: 0 every check passed, 1 a parity bound failed, 2 bad input.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys

from sscd_triton.cli._help import DefaultsHelpFormatter
from sscd_triton.cli._main import command
from sscd_triton.export import checkpoints, demo, onnx_export
from sscd_triton.files import OutputError, check_writable
from sscd_triton.report import Report
from sscd_triton import spec


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--checkpoint", help="a published .classy.pt, .torchvision.pt or "
                   ".torchscript.pt (default: seeded untrained demo weights)")
    p.add_argument("--output", default="runs/sscd.onnx", help="the .onnx file to write")
    p.add_argument("--precision", choices=onnx_export.PRECISIONS, default="fp32",
                   help="fp16 runs the trunk in half precision, GeM and L2 in fp32; int8: "
                   "the trunk quantised (explicit Q/DQ), calibrated on --calibration")
    add_int8_arguments(p)
    p.add_argument("--static-size", type=int, metavar="S",
                   help="fix H = W = S (e.g. 320) for engines that want static shapes "
                   "(default: H and W dynamic)")
    p.add_argument("--preprocess", choices=sorted(spec.PREPROCESS), default=None,
                   help="the preprocessing the model will be served with: int8 calibrates and "
                   "is measured on it (default: square320, or square S with --static-size S)")
    p.add_argument("--int8-target", choices=("cpu", "gpu"), default=None,
                   help="int8: the Q/DQ form to write: cpu (default; uint8 activations, ONNX "
                   "Runtime's fast kernels) or gpu (symmetric int8, what TensorRT takes)")
    p.add_argument("--dims", type=int, help="expected descriptor size; checked against the file")
    p.add_argument("--opset", type=int, default=spec.ONNX_OPSET,
                   help=f"ONNX opset, >= {spec.ONNX_OPSET}")
    return p.parse_args(argv)


def add_int8_arguments(p: argparse.ArgumentParser) -> None:
    """The int8 flags, shared with build_repository.py."""
    from sscd_triton.export import int8

    g = p.add_argument_group("int8")
    g.add_argument("--calibration", metavar="DIR", help="int8: a folder of your own images "
                   "(recursive) to calibrate on, read and preprocessed as served (default: the "
                   "bundled photographs, a poor stand-in for your distribution)")
    g.add_argument("--calibration-size", type=int, metavar="N", help="int8: calibrate on N "
                   f"images of --calibration; fewer is an error (default: up to "
                   f"{int8.DEFAULT_CALIBRATION_SIZE} for minmax, {int8.HISTOGRAM_MAX_IMAGES} "
                   "for the histogram methods, which hold every image's activations)")
    g.add_argument("--calibration-method", choices=int8.METHODS, default=None,
                   help="int8: how activation ranges are chosen from the calibration images "
                   f"(default {int8.DEFAULT_METHOD})")


def load_calibration(args, preprocess: spec.Preprocess, max_pixels: int = spec.MAX_IMAGE_PIXELS):
    """The int8 calibration the flags ask for, or None when not int8 (flags then refused).
    Raises int8.CalibrationError (exit 2)."""
    from sscd_triton.export import int8

    if args.precision != "int8":
        given = [flag for flag, value in (("--calibration", args.calibration),
                                          ("--calibration-size", args.calibration_size),
                                          ("--calibration-method", args.calibration_method),
                                          ("--int8-target", getattr(args, "int8_target", None)))
                 if value is not None]
        if given:
            raise int8.CalibrationError(f"{', '.join(given)}: for --precision int8 only")
        return None
    args.calibration_method = args.calibration_method or int8.DEFAULT_METHOD
    if args.calibration is None:
        if args.calibration_size is not None:
            raise int8.CalibrationError("--calibration-size needs --calibration DIR")
        int8.check_method(args.calibration_method, preprocess, None)
        return int8.bundled_calibration(preprocess)
    return int8.folder_calibration(args.calibration, preprocess, args.calibration_size,
                                   max_pixels, args.calibration_method)


def main(argv=None) -> int:
    from sscd_triton.export import int8

    args = parse_args(argv)
    report = Report("sscd-triton export: checkpoint -> ONNX, with parity against PyTorch",
                    5 if args.precision == "int8" else 4)
    try:
        if args.static_size is not None and args.static_size < spec.MIN_INPUT_SIZE:
            raise OutputError(
                f"--static-size {args.static_size}: must be >= {spec.MIN_INPUT_SIZE}")
        if args.opset < spec.ONNX_OPSET:
            raise OutputError(f"--opset {args.opset}: must be >= {spec.ONNX_OPSET}")
        if args.output == parse_args([]).output:
            os.makedirs(os.path.dirname(args.output), exist_ok=True)
        check_writable(args.output, "--output", "sscd.onnx")
        source = args.checkpoint
        if source is None:
            source = demo.write_demo_checkpoint()
            report.note(f"no --checkpoint: using {demo.DEMO_LABEL}")
        preprocess = spec.PREPROCESS[args.preprocess or spec.DEFAULT_PREPROCESS]
        if args.static_size is not None:
            if args.preprocess and (not preprocess.square
                                    or preprocess.size != args.static_size):
                raise OutputError(f"--static-size {args.static_size} with --preprocess "
                                  f"{args.preprocess}: that mode does not give "
                                  f"{args.static_size}x{args.static_size} tensors")
            preprocess = spec.square(args.static_size)
        calibration = load_calibration(args, preprocess)
        loaded = checkpoints.load(source, args.dims)
    except (checkpoints.CheckpointError, OutputError, int8.CalibrationError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    named = spec.published_model(source)
    if named and (named.trunk, named.dims) != (loaded.trunk, loaded.dims):
        report.note(f"warning: the file is named like {named.name} ({named.trunk}, "
                    f"{named.dims}-d) but holds {loaded.trunk}, {loaded.dims}-d")
    report.log(f"loaded {source}: {loaded.layout} layout, {loaded.trunk}, {loaded.dims}-d, "
               f"{loaded.parameters / 1e6:.1f}M parameters", checkpoint=source,
               layout=loaded.layout, trunk=loaded.trunk, dims=loaded.dims,
               demo=args.checkpoint is None)
    onnx_export.export(loaded, args.output, args.precision, args.static_size, report, args.opset,
                       calibration=calibration, target=args.int8_target or "cpu",
                       method=args.calibration_method, preprocess=preprocess)
    report.table()
    json_path = os.path.splitext(args.output)[0] + ".parity.json"
    report.write_json(json_path)
    report.log(f"report written to {json_path}")
    target = args.int8_target or "cpu"
    print(f"\nNext: {command('export/build_repository.py')} --onnx {shlex.quote(args.output)} "
          f"--checkpoint {shlex.quote(source)} --target {target} --output runs/model_repository")
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
