#!/usr/bin/env python3
"""Build a TensorRT plan from an SSCD ONNX graph, with a parity report (installed as `sscd-build-tensorrt`; the code is sscd_triton/cli/build_tensorrt.py)."""
import sys

from sscd_triton.cli.build_tensorrt import main

if __name__ == "__main__":
    sys.exit(main())
