#!/usr/bin/env python3
"""Copy detection on real photographs, served against PyTorch (installed as `sscd-copy-detection`; the code is sscd_triton/cli/copy_detection.py)."""
import sys

from sscd_triton.cli.copy_detection import main

if __name__ == "__main__":
    sys.exit(main())
