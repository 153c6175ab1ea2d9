#!/usr/bin/env python3
"""Match queries against references: the k nearest by inner product (installed as `sscd-match`; the code is sscd_triton/cli/match.py)."""
import sys

from sscd_triton.cli.match import main

if __name__ == "__main__":
    sys.exit(main())
