"""Build a complete Triton model repository for SSCD from one checkpoint.

    python export/build_repository.py --checkpoint CKPT --target cpu --output runs/model_repository
    python export/build_repository.py --onnx sscd.onnx --checkpoint CKPT --target cpu --output runs/model_repository
    python export/build_repository.py --target gpu --configs-only --output model_repository
    python export/build_repository.py --checkpoint CKPT --target cpu --precision int8 --calibration PHOTOS/ --output runs/model_repository

gpu: DALI preprocessing (`sscd_preprocess/1/dali.py`, autoserialized by the server's DALI)
+ the descriptor ONNX (fp16 by default) with a plan build recipe: the serving container
builds `sscd_descriptor/1/model.plan` from them at start (docker/build_plan.sh) and serves it
on the tensorrt backend. `--descriptor onnxruntime` is the fallback (onnxruntime + TensorRT
EP, fp32); `--plan FILE` serves a plan you built on the serving host yourself.
cpu: python-backend preprocessing (PIL) + the same ONNX on ONNX Runtime.
`--postprocess PARAMS.npz` (from `sscd-postprocess fit`) appends centering or PCA
whitening to the served ONNX: the server returns postprocessed descriptors.
Every config records the model's name, the served ONNX's sha256 and the preprocessing.
Exit status: 0 ok, 1 a parity bound failed, 2 bad input.
The library function is sscd_triton.serving.build.build_repository.
"""
from __future__ import annotations

import argparse
import sys

from sscd_triton import spec
from sscd_triton.cli._help import DefaultsHelpFormatter
from sscd_triton.cli.export_onnx import add_int8_arguments, load_calibration
from sscd_triton.export import onnx_export
from sscd_triton.serving import build, repository


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--checkpoint", help="published SSCD checkpoint (default: untrained demo "
                   "weights, or with --onnx no parity check)")
    p.add_argument("--onnx", metavar="FILE", help="serve this already exported ONNX (from "
                   "export/export_onnx.py) instead of exporting again; its names and width are "
                   "checked, and its parity against --checkpoint when given")
    p.add_argument("--target", choices=repository.TARGETS, default="gpu",
                   help="gpu: DALI + TensorRT for the production image; cpu: PIL + ONNX Runtime "
                   "on the tritonserver in .venv")
    p.add_argument("--output", default="runs/model_repository", help="repository folder")
    p.add_argument("--precision", choices=onnx_export.PRECISIONS, default=None,
                   help="precision of the exported ONNX (default: fp16 for the gpu target's "
                   "TensorRT plan, whose GeM/Linear/L2 stay fp32; fp32 otherwise); int8: the "
                   "trunk quantised in the target's Q/DQ form, calibrated on --calibration")
    add_int8_arguments(p)
    p.add_argument("--descriptor", choices=repository.DESCRIPTORS, default="tensorrt",
                   help="gpu: tensorrt (a plan built at container start) or the onnxruntime "
                   "fallback (TensorRT EP, fp32 with TF32 off)")
    p.add_argument("--preprocess", choices=sorted(spec.PREPROCESS), default=spec.DEFAULT_PREPROCESS,
                   help="square320 = upstream skew_320, short288 = upstream small_288")
    p.add_argument("--max-batch", type=int, default=None,
                   help="largest batch a model step runs (default: 64 gpu, 16 cpu)")
    p.add_argument("--max-pixels", type=int, default=spec.MAX_IMAGE_PIXELS,
                   help="refuse images with more pixels, before decoding them")
    p.add_argument("--plan", help="gpu: serve this TensorRT plan from export/build_tensorrt.py "
                   "instead of building one at start (it runs only with the TensorRT and GPU "
                   "that built it)")
    p.add_argument("--dims", type=int, help="descriptor size (checked against the checkpoint)")
    p.add_argument("--postprocess", metavar="PARAMS.npz", help="append this fitted centering "
                   "or PCA whitening (sscd-postprocess fit) to the served graph: the server "
                   "returns postprocessed descriptors of its width")
    p.add_argument("--configs-only", action="store_true",
                   help="write configs only (no export; model identity 'unknown'): regenerates "
                   "the committed model_repository/")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from sscd_triton.export import int8

    args = parse_args(argv)
    try:
        calibration = None
        if args.onnx or args.configs_only:
            if args.calibration or args.calibration_size is not None:
                raise build.BuildError("--calibration with --onnx or --configs-only: nothing "
                                       "is exported here to calibrate (export_onnx.py "
                                       "calibrates the int8 ONNX it writes)")
        else:
            calibration = load_calibration(args, spec.PREPROCESS[args.preprocess],
                                           args.max_pixels)
        built = build.build_repository(
            args.output, args.target, args.checkpoint, onnx=args.onnx, plan=args.plan,
            precision=args.precision, descriptor=args.descriptor, preprocess=args.preprocess,
            max_batch=args.max_batch, max_pixels=args.max_pixels, dims=args.dims,
            configs_only=args.configs_only, postprocess=args.postprocess,
            calibration=calibration, calibration_method=args.calibration_method,
            stream=sys.stdout)
    except (build.BuildError, int8.CalibrationError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.configs_only:
        print("\n".join(f"wrote {p}" for p in built.written))
        return 0
    if built.report.checks:
        built.report.table()
    else:
        print("\nno parity check: give --checkpoint with --onnx to compare it with PyTorch")
    steps = build.next_steps(built, args.checkpoint)
    print(f"\nNext: {steps[0]}")
    for line in steps[1:]:
        print(f"      {line}")
    return 0 if built.passed else 1


if __name__ == "__main__":
    sys.exit(main())
