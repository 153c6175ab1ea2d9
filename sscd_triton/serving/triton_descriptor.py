"""Triton python-backend model: the exported ONNX descriptor model on ONNX Runtime (cpu).

The same `model.onnx` the gpu target serves with the onnxruntime/TensorRT backends.
Config parameters: `onnx_file` (beside this file's version folder) and `threads` (0: the
instance's CPU share, runtime.cpu_share). fp32, fp16 and int8 (Q/DQ) graphs alike.
Input `spec.INPUT_NAME` float32 `[B, 3, H, W]`, output `spec.OUTPUT_NAME` `[B, dims]`.
Requests of one dynamic batch whose tensors share a shape run as one ONNX Runtime call.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict

import numpy as np

from sscd_triton import runtime, spec


class TritonPythonModel:
    def initialize(self, args):
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        params = json.loads(args["model_config"])["parameters"]
        folder = os.path.join(args["model_repository"], args["model_version"])
        path = os.path.join(folder, params["onnx_file"]["string_value"])
        self.run = runtime.onnx_runner(
            runtime.onnx_session(path, threads=int(params["threads"]["string_value"])))

    def execute(self, requests):
        inputs = [self.pb.get_input_tensor_by_name(r, spec.INPUT_NAME).as_numpy()
                  for r in requests]
        groups = defaultdict(list)
        for i, x in enumerate(inputs):
            groups[x.shape[1:]].append(i)
        responses = [None] * len(requests)
        for members in groups.values():
            try:
                out = self.run(np.concatenate([inputs[i] for i in members]))
            except Exception as e:  # e.g. an input too small for the trunk's strides
                for i in members:
                    responses[i] = self.pb.InferenceResponse(
                        error=self.pb.TritonError(f"descriptor model failed: {e}"))
                continue
            start = 0
            for i in members:
                n = len(inputs[i])
                tensor = self.pb.Tensor(spec.OUTPUT_NAME, out[start:start + n])
                responses[i] = self.pb.InferenceResponse(output_tensors=[tensor])
                start += n
        return responses
