#!/usr/bin/env python
"""What the completeness check costs (issue 16): `images.check_complete` per image, and the
gpu ensemble's python-backend check step per request on a real local tritonserver.

    .venv/bin/python benchmarks/check_cost.py [--requests 200]

1. the function, on the 16 photographs shipped with the package as JPEG, PNG, WebP and BMP
   (unpadded and zero-padded by 64 KiB), and on one 12-megapixel JPEG: the common path, and
   with a 1 MB trailer after its end (a motion photo: the scans are searched for EOI);
2. the step: the gpu repository's generated `sscd_check` model alone on the bundled
   tritonserver (python backend, KIND_CPU), requests of spec.CLIENT_BATCH photographs as
   JPEG: median round trip, against the same requests to a python-backend model that only
   passes its input on (the step's overhead without the check). Host clock; one client.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np


def per_call_us(fn, items, rounds: int) -> float:
    t = time.perf_counter()
    for _ in range(rounds):
        for x in items:
            fn(x)
    return (time.perf_counter() - t) / (rounds * len(items)) * 1e6


def function_costs() -> list[tuple[str, float]]:
    from sscd_triton import images, samples

    photos = [img for _, img in samples.photographs()]
    rows = []
    for fmt in ("JPEG", "PNG", "WEBP", "BMP"):
        data = [images.encode(img, fmt) for img in photos]
        kb = sum(map(len, data)) / len(data) / 1024
        rows.append((f"{fmt}, 16 photographs (mean {kb:.0f} KB)",
                     per_call_us(images.check_complete, data, 200)))
        rows.append((f"{fmt}, zero-padded by 64 KiB",
                     per_call_us(images.check_complete, [d + b"\0" * 65536 for d in data], 50)))
    big = images.encode(photos[0].resize((4000, 3000)), "JPEG", quality=90)
    rows.append((f"JPEG 12 MP ({len(big) / 1e6:.1f} MB)", per_call_us(images.check_complete, [big], 200)))
    trailer = big + os.urandom(1 << 20)
    rows.append(("JPEG 12 MP + 1 MB after its end (scans searched)",
                 per_call_us(images.check_complete, [trailer], 20)))
    return rows


PASS_THROUGH = '''
import triton_python_backend_utils as pb
class TritonPythonModel:
    def execute(self, requests):
        return [pb.InferenceResponse(output_tensors=[pb.Tensor("image_checked",
                pb.get_input_tensor_by_name(r, "image").as_numpy())]) for r in requests]
'''


def step_costs(requests: int) -> list[tuple[str, float]]:
    import tritonclient.grpc as grpcclient

    from sscd_triton import images, samples, spec
    from sscd_triton.serving import repository
    from sscd_triton.serving.server import TritonServer

    with tempfile.TemporaryDirectory() as d:
        gpu = os.path.join(d, "gpu")
        repository.write_configs(gpu, repository.ServingConfig(target="gpu"))
        serve = os.path.join(d, "serve")
        shutil.copytree(os.path.join(gpu, spec.CHECK_MODEL), os.path.join(serve, spec.CHECK_MODEL))
        other = os.path.join(serve, "pass_through")
        shutil.copytree(os.path.join(gpu, spec.CHECK_MODEL), other)
        cfg = open(os.path.join(other, "config.pbtxt")).read()
        open(os.path.join(other, "config.pbtxt"), "w").write(
            cfg.replace(f'name: "{spec.CHECK_MODEL}"', 'name: "pass_through"'))
        open(os.path.join(other, "1", "model.py"), "w").write(PASS_THROUGH)
        photos = [images.encode(img, "JPEG") for _, img in samples.photographs()]
        arr = images.pack_rows(photos[: spec.CLIENT_BATCH])
        rows = []
        with TritonServer(serve) as server:
            client = grpcclient.InferenceServerClient(server.grpc_url)
            inp = grpcclient.InferInput(spec.ENSEMBLE_INPUT, list(arr.shape), "UINT8")
            inp.set_data_from_numpy(arr)
            for model in ("pass_through", spec.CHECK_MODEL) * 2:  # interleaved, warm second
                times = []
                for _ in range(requests):
                    t = time.perf_counter()
                    client.infer(model, [inp])
                    times.append(time.perf_counter() - t)
                rows.append((f"{model}: request of {arr.shape[0]} JPEGs ({arr.nbytes / 1e6:.2f} MB), "
                             "median round trip", statistics.median(times) * 1e6))
            client.close()
        return rows[2:]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--no-server", action="store_true", help="the function only")
    args = p.parse_args(argv)
    rows = function_costs() + ([] if args.no_server else step_costs(args.requests))
    width = max(len(r[0]) for r in rows)
    for what, us in rows:
        print(f"  {what:<{width}}  {us:10.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
