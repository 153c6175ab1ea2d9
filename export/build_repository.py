#!/usr/bin/env python3
"""Build a Triton model repository for SSCD from one checkpoint (installed as `sscd-build-repository`; the code is sscd_triton/cli/build_repository.py)."""
import sys

from sscd_triton.cli.build_repository import main

if __name__ == "__main__":
    sys.exit(main())
