#!/usr/bin/env python3
"""Export an SSCD checkpoint to ONNX with a parity report (installed as `sscd-export-onnx`; the code is sscd_triton/cli/export_onnx.py)."""
import sys

from sscd_triton.cli.export_onnx import main

if __name__ == "__main__":
    sys.exit(main())
