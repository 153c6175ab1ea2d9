#!/usr/bin/env python3
"""Score matches against ground truth: uAP, acc@1, recall@P90 (installed as `sscd-evaluate`; the code is sscd_triton/cli/evaluate.py)."""
import sys

from sscd_triton.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
