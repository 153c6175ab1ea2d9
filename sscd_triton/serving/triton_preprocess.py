"""Triton python-backend model: encoded image bytes -> normalised tensors (cpu target).

Config parameters (written by sscd_triton/serving/repository.py): `preprocess` (a key of
spec.PREPROCESS) and `max_pixels`. Input `spec.ENSEMBLE_INPUT` uint8 `[B, L]` per
request: B encoded files, zero-padded to a common length L (decoders ignore trailing
bytes). Output `spec.INPUT_NAME` float32 `[B, 3, H, W]`.
Each request fails alone: a bad file gives its request an error naming the reason, and
the other requests of the same dynamic batch still get their tensors.
"""
from __future__ import annotations

import json

import numpy as np

from sscd_triton import images, spec


class TritonPythonModel:
    def initialize(self, args):
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        params = json.loads(args["model_config"])["parameters"]
        self.preprocess = spec.PREPROCESS[params["preprocess"]["string_value"]]
        self.max_pixels = int(params["max_pixels"]["string_value"])

    def _tensors(self, batch: np.ndarray) -> np.ndarray:
        out = []
        for i, row in enumerate(batch):
            try:
                out.append(images.load_tensor(row.tobytes(), self.preprocess, self.max_pixels))
            except images.ImageError as e:
                raise images.ImageError((spec.BAD_ROW.format(index=i) if len(batch) > 1 else "")
                                        + str(e)) from None
        if len({t.shape for t in out}) > 1:
            raise images.ImageError("images of one request resize to different shapes "
                                    f"({self.preprocess.name}); send them one per request")
        return np.stack(out)

    def execute(self, requests):
        responses = []
        for request in requests:
            batch = self.pb.get_input_tensor_by_name(request, spec.ENSEMBLE_INPUT).as_numpy()
            try:
                tensor = self.pb.Tensor(spec.INPUT_NAME, self._tensors(batch))
                responses.append(self.pb.InferenceResponse(output_tensors=[tensor]))
            except images.ImageError as e:
                # INVALID_ARG tells clients the input is at fault: retrying cannot help.
                error = self.pb.TritonError(spec.BAD_IMAGE_PREFIX + str(e),
                                            self.pb.TritonError.INVALID_ARG)
                responses.append(self.pb.InferenceResponse(error=error))
            except Exception as e:  # a bug must not take the other requests down with it
                error = self.pb.TritonError(f"preprocessing failed: {type(e).__name__}: {e}")
                responses.append(self.pb.InferenceResponse(error=error))
        return responses
