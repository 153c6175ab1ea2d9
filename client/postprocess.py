#!/usr/bin/env python3
"""Fit and apply descriptor centering / PCA whitening (installed as `sscd-postprocess`; the code is sscd_triton/cli/postprocess.py)."""
import sys

from sscd_triton.cli.postprocess import main

if __name__ == "__main__":
    sys.exit(main())
