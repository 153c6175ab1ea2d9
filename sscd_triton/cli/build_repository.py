"""Build a complete Triton model repository for SSCD from one checkpoint.

    python export/build_repository.py --checkpoint CKPT --target cpu --output runs/model_repository
    python export/build_repository.py --target gpu --configs-only --output model_repository

gpu: DALI preprocessing (`sscd_preprocess/1/dali.py`, autoserialized by the server's DALI)
+ the descriptor ONNX (fp16 by default) with a plan build recipe: the serving container
builds `sscd_descriptor/1/model.plan` from them at start (docker/build_plan.sh) and serves it
on the tensorrt backend. `--descriptor onnxruntime` is the fallback (onnxruntime + TensorRT
EP, fp32); `--plan FILE` serves a plan you built on the serving host yourself.
cpu: python-backend preprocessing (PIL) + the same ONNX on ONNX Runtime.
Exit status: 0 ok, 1 a parity bound failed, 2 bad input.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from sscd_triton.export import checkpoints, demo, onnx_export
from sscd_triton.serving import repository
from sscd_triton.report import Report
from sscd_triton import spec


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="published SSCD checkpoint (default: untrained demo weights)")
    p.add_argument("--target", choices=repository.TARGETS, default="gpu")
    p.add_argument("--output", default="runs/model_repository", help="repository folder")
    p.add_argument("--precision", choices=onnx_export.PRECISIONS, default=None,
                   help="precision of the exported ONNX (default: fp16 for the gpu target's "
                   "TensorRT plan, whose GeM/Linear/L2 stay fp32; fp32 otherwise)")
    p.add_argument("--descriptor", choices=repository.DESCRIPTORS, default="tensorrt",
                   help="gpu: tensorrt (a plan built at container start) or the onnxruntime "
                   "fallback (TensorRT EP, fp32 with TF32 off)")
    p.add_argument("--preprocess", choices=sorted(spec.PREPROCESS), default=spec.DEFAULT_PREPROCESS)
    p.add_argument("--max-batch", type=int, default=None,
                   help="largest batch a model step runs (default: 64 gpu, 16 cpu)")
    p.add_argument("--max-pixels", type=int, default=spec.MAX_IMAGE_PIXELS,
                   help="refuse images with more pixels, before decoding them")
    p.add_argument("--plan", help="gpu: serve this TensorRT plan from export/build_tensorrt.py "
                   "instead of building one at start (it runs only with the TensorRT and GPU "
                   "that built it)")
    p.add_argument("--dims", type=int, help="descriptor size (checked against the checkpoint)")
    p.add_argument("--configs-only", action="store_true",
                   help="write configs only (no export): regenerates the committed model_repository/")
    return p.parse_args(argv)


def plan_problems(plan: str, max_batch: int, preprocess: spec.Preprocess) -> list[str]:
    """What contradicts serving `plan` here, read from the report build_tensorrt.py wrote
    beside it (a plan file itself cannot be read without TensorRT and a GPU)."""
    report_path = plan + ".parity.json"
    try:
        with open(report_path) as f:
            report = json.load(f)
        lo, _, hi = report["profile"]
    except (OSError, ValueError, KeyError):
        return [f"--plan {plan}: no readable {os.path.basename(report_path)} beside it; build "
                "plans with export/build_tensorrt.py, which records the profile to check"]
    problems = []
    if not report.get("passed", False):
        problems.append(f"--plan {plan}: its parity report says a check failed ({report_path})")
    if hi[0] < max_batch:
        problems.append(f"--max-batch {max_batch} exceeds the plan's profile (batch <= {hi[0]}); "
                        f"pass --max-batch {hi[0]} or rebuild the plan")
    sizes = [preprocess.size] if preprocess.square else []
    for side in sizes:
        if not (lo[2] <= side <= hi[2] and lo[3] <= side <= hi[3]):
            problems.append(f"the plan's profile ({lo[2]}x{lo[3]}..{hi[2]}x{hi[3]}) does not "
                            f"take {preprocess.name}'s {side}x{side} tensors")
    return problems


def main(argv=None) -> int:
    args = parse_args(argv)
    fast = args.target == "gpu" and args.descriptor == "tensorrt"
    precision = args.precision or ("fp16" if fast else "fp32")
    max_batch = args.max_batch if args.max_batch is not None else (64 if args.target == "gpu" else 16)
    err = None
    if max_batch < 1:
        err = f"--max-batch {max_batch}: must be >= 1"
    elif args.plan and args.target != "gpu":
        err = "--plan is for --target gpu; the cpu target serves ONNX"
    elif args.plan and args.descriptor != "tensorrt":
        err = "--plan is served by the tensorrt backend; drop --descriptor onnxruntime"
    elif args.plan and not os.path.isfile(args.plan):
        err = f"--plan {args.plan}: no such file"
    elif args.max_pixels < 1:
        err = f"--max-pixels {args.max_pixels}: must be >= 1"
    elif args.plan:
        err = "; ".join(plan_problems(args.plan, max_batch, spec.PREPROCESS[args.preprocess]))
    if err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    layout = dict(target=args.target, preprocess=args.preprocess, max_batch=max_batch,
                  max_pixels=args.max_pixels, descriptor=args.descriptor,
                  prebuilt_plan=bool(args.plan))
    if args.configs_only:
        written = repository.write_configs(args.output, repository.Layout(dims=args.dims or 512, **layout))
        print("\n".join(f"wrote {p}" for p in written))
        return 0

    report = Report(f"sscd-triton repository: checkpoint -> Triton model repository ({args.target})", 6)
    onnx_path = os.path.join(args.output, spec.DESCRIPTOR_MODEL, "1", repository.ONNX_FILE)
    try:
        os.makedirs(os.path.dirname(onnx_path), exist_ok=True)
        onnx_export.check_writable(onnx_path)
        source = args.checkpoint
        if source is None:
            source = demo.write_demo_checkpoint()
            report.note(f"no --checkpoint: using {demo.DEMO_LABEL}")
        loaded = checkpoints.load(source, args.dims)
    except (OSError, checkpoints.CheckpointError, onnx_export.OutputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report.log(f"loaded {source}: {loaded.layout} layout, {loaded.trunk}, {loaded.dims}-d",
               checkpoint=source, dims=loaded.dims, target=args.target)
    lay = repository.Layout(dims=loaded.dims, **layout)
    # Square preprocessing fixes the tensor shape: give engines a static H and W.
    pre = spec.PREPROCESS[args.preprocess]
    static = pre.size if (args.target == "gpu" and pre.square) else None
    onnx_export.export(loaded, onnx_path, precision, static, report)
    if args.target == "gpu":
        from sscd_triton.serving import dali_pipeline

        dali = os.path.join(args.output, spec.PREPROCESS_MODEL, "1", "dali.py")
        os.makedirs(os.path.dirname(dali), exist_ok=True)
        dali_pipeline.write_dali_py(dali, pre, args.max_pixels)
        report.log(f"wrote DALI pipeline ({args.preprocess}, autoserialized by the server) -> {dali}")
        if args.plan:
            repository.place_artifact(args.output, spec.DESCRIPTOR_MODEL, args.plan,
                                      repository.PLAN_FILE)
            report.note(f"serving TensorRT plan {args.plan}")
        elif args.descriptor == "tensorrt":
            report.note("sscd_descriptor/1/model.plan is built at container start "
                        "(docker/build_plan.sh), on the serving GPU with the serving TensorRT")
    written = repository.write_configs(args.output, lay)
    report.log(f"wrote {len(written)} files (max batch {max_batch}, preprocess "
               f"{args.preprocess}, descriptor {args.descriptor if args.target == 'gpu' else 'python'} "
               f"{precision}) under {args.output}")
    report.table()
    report.write_json(os.path.join(args.output, "build_report.json"))
    if repository.builds_plan(lay):
        print(f"\nNext: docker/Dockerfile serves it, building {spec.DESCRIPTOR_MODEL}/1/"
              f"{repository.PLAN_FILE} at start; elsewhere run docker/build_plan.sh {args.output} "
              f"on the serving host, then tritonserver --model-repository {args.output}")
    else:
        print(f"\nNext: tritonserver --model-repository {args.output}")
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
