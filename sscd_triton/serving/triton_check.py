"""Triton python-backend model `spec.CHECK_MODEL`: the gpu ensemble's first step, which
refuses incomplete or unaccepted files before they reach DALI.

Input `spec.ENSEMBLE_INPUT` uint8 `[B, L]` per request (B encoded files, zero-padded to a
common length L); output `spec.CHECKED_NAME`, the same tensor, unchanged, for
`sscd_preprocess`. A request holding a file that fails `images.check_complete(row,
images.GPU_FORMATS)` gets `INVALID_ARGUMENT` "bad image: item i of the request: <reason>",
the form the cpu target's preprocessing uses (`triton_preprocess`), so clients isolate the
file exactly as there; the other requests are untouched.

Why a python-backend step and not a DALI operator (dali_backend 01783f8f, read 2026-12):
- a DALI pipeline has no per-sample errors: any failure, a check included, fails every
  request of the batch it runs (src/dali_model_instance.cc `ExecuteBatched` sends one
  error to all of them) as `TRITONSERVER_ERROR_UNKNOWN` "DALI error: ..." (`ErrorHandler`),
  which clients cannot tell from a server fault, and resets the whole pipeline
  (src/dali_executor/dali_executor.cc: `pipeline_.Reset()`);
- the python backend answers each request on its own with the status it is given
  (python_backend src/resources/triton_python_backend_utils.py `TritonError.INVALID_ARG`,
  `InferenceResponse(error=...)`), and the ensemble passes a composing model's status on
  unchanged with "in ensemble 'sscd', " before the message (core
  src/ensemble_scheduler/ensemble_scheduler.cc);
- a second input to DALI carrying each row's true length (the issue's other option) would
  still fail inside DALI, with the same two problems.
Its cost, measured (benchmarks/check_cost.py, docs/bad-input.md): the check itself a few
microseconds per image; the step one python-backend round trip per request (input and
output copied through shared memory).

On the server this class runs from the generated `sscd_check/1/model.py`
(`sscd_triton.serving.check_step`), which holds this source and the check's
(`images.CHECK_SOURCE`) and imports nothing of this project: the serving image has none
of it. So the module-level names used below are exactly those that file defines.
"""
from __future__ import annotations

from sscd_triton.images import GPU_FORMATS, ImageError, check_complete
from sscd_triton.spec import BAD_IMAGE_PREFIX, BAD_ROW
from sscd_triton.spec import CHECKED_NAME as OUTPUT_NAME
from sscd_triton.spec import ENSEMBLE_INPUT as INPUT_NAME


class TritonPythonModel:
    def initialize(self, args):
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils

    def execute(self, requests):
        """One response per request, in order: the input tensor passed on, or its error."""
        responses = []
        for request in requests:
            batch = self.pb.get_input_tensor_by_name(request, INPUT_NAME).as_numpy()
            try:
                for i, row in enumerate(batch):
                    try:
                        check_complete(row.tobytes(), GPU_FORMATS)
                    except ImageError as e:
                        where = BAD_ROW.format(index=i) if len(batch) > 1 else ""
                        raise ImageError(where + str(e)) from None
                out = self.pb.Tensor(OUTPUT_NAME, batch)
                responses.append(self.pb.InferenceResponse(output_tensors=[out]))
            except ImageError as e:
                # INVALID_ARG: the input is at fault, retrying cannot help (as on cpu).
                error = self.pb.TritonError(BAD_IMAGE_PREFIX + str(e),
                                            self.pb.TritonError.INVALID_ARG)
                responses.append(self.pb.InferenceResponse(error=error))
            except Exception as e:  # a bug must not take the other requests down with it
                error = self.pb.TritonError(f"check failed: {type(e).__name__}: {e}")
                responses.append(self.pb.InferenceResponse(error=error))
        return responses
