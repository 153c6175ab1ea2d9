#!/usr/bin/env python3
"""Serve a repository on 127.0.0.1 and print parity against upstream (installed as `sscd-serve-check`; the code is sscd_triton/cli/serve_check.py)."""
import sys

from sscd_triton.cli.serve_check import main

if __name__ == "__main__":
    sys.exit(main())
