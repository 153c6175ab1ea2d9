#!/usr/bin/env python3
"""Embed image collections with SSCD descriptors through Triton (installed as `sscd-embed`; the code is sscd_triton/cli/embed.py)."""
import sys

from sscd_triton.cli.embed import main

if __name__ == "__main__":
    sys.exit(main())
