#!/usr/bin/env python3
"""Find groups of near-duplicates in one collection (installed as `sscd-dedup`; the code is sscd_triton/cli/dedup.py)."""
import sys

from sscd_triton.cli.dedup import main

if __name__ == "__main__":
    sys.exit(main())
