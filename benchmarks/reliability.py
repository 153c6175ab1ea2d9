#!/usr/bin/env python3
"""Soak, faults, overload, hostile traffic and security against the real local tritonserver (the code is sscd_triton/cli/reliability.py)."""
import sys

from sscd_triton.cli.reliability import main

if __name__ == "__main__":
    sys.exit(main())
