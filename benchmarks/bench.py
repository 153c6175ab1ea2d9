#!/usr/bin/env python3
"""Latency and throughput, side by side with PyTorch and ONNX Runtime (installed as `sscd-bench`; the code is sscd_triton/cli/bench.py)."""
import sys

from sscd_triton.cli.bench import main

if __name__ == "__main__":
    sys.exit(main())
