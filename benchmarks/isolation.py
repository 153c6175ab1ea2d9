#!/usr/bin/env python3
"""What isolating corrupt files costs the client, with and without DALI batching requests together (the code is sscd_triton/cli/isolation.py)."""
import sys

from sscd_triton.cli.isolation import main

if __name__ == "__main__":
    sys.exit(main())
