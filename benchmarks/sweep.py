#!/usr/bin/env python3
"""perf_analyzer sweep + in-process rows -> benchmarks/results/ CSV, machine file, plot (the code is sscd_triton/cli/sweep.py)."""
import sys

from sscd_triton.cli.sweep import main

if __name__ == "__main__":
    sys.exit(main())
