"""The errors of building a TensorRT plan, by the exit status of export/build_tensorrt.py.

  0  plan written; every check passed (parity shows `skip` without --checkpoint or CUDA torch)
  1  plan written; a parity check failed
  2  InputError: missing/unreadable ONNX, unwritable output or timing cache, invalid
     profile, --precision that the ONNX does not hold, bad checkpoint, or an ONNX/profile
     that TensorRT's parser or builder rejects
  3  Unavailable: TensorRT (10 or later) or a CUDA GPU is missing; no plan written
"""
from __future__ import annotations


class InputError(ValueError):
    """Bad input (exit 2); the message names the flag or file at fault."""


class Unavailable(RuntimeError):
    """TensorRT or a CUDA GPU is missing (exit 3)."""
