"""Serve a model repository on this machine and check it against PyTorch, per format.

    python export/serve_check.py --repository runs/model_repository --checkpoint CKPT

Starts `tritonserver` on 127.0.0.1, sends real photographs encoded as JPEG, PNG, WebP,
BMP, TIFF and GIF through the `sscd` ensemble, and compares the descriptors with
upstream's pipeline: PIL decode, torchvision transforms, the PyTorch model from the same
checkpoint. Exit status: 0 every check passed, 1 a bound failed, 2 bad input.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from sscd_triton.cli._help import DefaultsHelpFormatter
from sscd_triton.export import checkpoints, demo, validate
from sscd_triton.report import Check, Report
from sscd_triton import images, parity, samples, spec

FORMATS = {"JPEG": {"quality": 95}, "PNG": {}, "WEBP": {"quality": 90}, "BMP": {},
           "TIFF": {}, "GIF": {}}


def upstream_transform(preprocess: spec.Preprocess):
    """Upstream's torchvision transforms for one mode (FACTS: small_288 / skew_320)."""
    from torchvision import transforms

    size = [preprocess.size] * 2 if preprocess.square else preprocess.size
    return transforms.Compose([transforms.Resize(size), transforms.ToTensor(),
                               transforms.Normalize(spec.MEAN, spec.STD)])


def reference_descriptors(model, encoded: list[bytes], preprocess: spec.Preprocess) -> np.ndarray:
    """Upstream: `Image.open(...).convert('RGB')`, transforms, model, one image at a time."""
    import io

    from PIL import Image

    tf, run = upstream_transform(preprocess), validate.torch_runner(model)
    return np.concatenate([run(tf(Image.open(io.BytesIO(b)).convert("RGB"))[None].numpy())
                           for b in encoded])


def encoded_photographs(fmt: str, count: int = len(samples.PHOTOGRAPHS)) -> list[bytes]:
    return [images.encode(img, fmt, **FORMATS[fmt]) for _, img in samples.photographs()[:count]]


def infer_ensemble(client, encoded: list[bytes]) -> np.ndarray:
    """One request per image through the ensemble: `[N, dims]`."""
    import tritonclient.grpc as grpcclient

    out = []
    for data in encoded:
        arr = images.pack_rows([data])
        inp = grpcclient.InferInput(spec.ENSEMBLE_INPUT, list(arr.shape), "UINT8")
        inp.set_data_from_numpy(arr)
        out.append(client.infer(spec.ENSEMBLE_NAME, [inp]).as_numpy(spec.ENSEMBLE_OUTPUT))
    return np.concatenate(out)


def format_checks(client, model, preprocess: spec.Preprocess, formats=tuple(FORMATS),
                  count: int = 8) -> list[Check]:
    checks = []
    for fmt in formats:
        encoded = encoded_photographs(fmt, count)
        p = parity.measure(infer_ensemble(client, encoded),
                           reference_descriptors(model, encoded, preprocess))
        checks += parity.checks(f"ensemble {fmt} x{p.n}", p, exact=False)
    return checks


def served_preprocess(repository: str) -> spec.Preprocess:
    from sscd_triton.serving.repository import parse_pbtxt

    with open(os.path.join(repository, spec.PREPROCESS_MODEL, "config.pbtxt")) as f:
        cfg = parse_pbtxt(f.read())
    return spec.PREPROCESS[cfg.parameters[spec.PARAM_PREPROCESS].string_value]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--repository", default="runs/model_repository",
                   help="a cpu model repository (export/build_repository.py --target cpu)")
    p.add_argument("--checkpoint", help="the checkpoint the repository was built from "
                   "(default: the demo weights)")
    p.add_argument("--photos", type=int, default=8, choices=range(2, len(samples.PHOTOGRAPHS) + 1),
                   metavar=f"2..{len(samples.PHOTOGRAPHS)}", help="photographs per format")
    args = p.parse_args(argv)
    if not os.path.isfile(os.path.join(args.repository, spec.ENSEMBLE_NAME, "config.pbtxt")):
        print(f"error: {args.repository} holds no '{spec.ENSEMBLE_NAME}' ensemble; build one with "
              "export/build_repository.py --target cpu", file=sys.stderr)
        return 2
    source = args.checkpoint or demo.write_demo_checkpoint()
    try:
        loaded = checkpoints.load(source)
        preprocess = served_preprocess(args.repository)
    except (checkpoints.CheckpointError, KeyError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import tritonclient.grpc as grpcclient

    from sscd_triton.serving.server import TritonServer

    report = Report("sscd-triton serve check: encoded bytes -> tritonserver -> descriptors, "
                    "against upstream PyTorch", 3)
    if args.checkpoint is None:
        report.note(f"using {demo.DEMO_LABEL}")
    with TritonServer(args.repository) as server:
        report.log(f"tritonserver ready on {server.grpc_url} serving {args.repository}",
                   repository=args.repository, preprocess=preprocess.name)
        client = grpcclient.InferenceServerClient(server.grpc_url)
        report.add(format_checks(client, loaded.model, preprocess, count=args.photos))
        report.log(f"embedded {args.photos} photographs x {len(FORMATS)} formats "
                   f"through '{spec.ENSEMBLE_NAME}' ({preprocess.upstream_name})")
        client.close()
    report.table()
    report.log("server stopped")
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
