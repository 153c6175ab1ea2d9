#!/usr/bin/env bash
# Create .venv and install the project into it; re-runs only when the pins change.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
want=$(cat requirements.txt pyproject.toml scripts/install_tritonserver.py | sha256sum | cut -d' ' -f1)
if [ "$(cat .venv/.installed 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing pinned requirements into .venv (first run: a few minutes)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements.txt
  .venv/bin/python -m pip install -q --no-deps -e .
  .venv/bin/python scripts/install_tritonserver.py
  echo "$want" > .venv/.installed
fi
# perf_analyzer for benchmarks/sweep.py (idempotent, ~0.1 s once installed; never fatal).
.venv/bin/python scripts/install_perf_analyzer.py ||
  echo "[setup] perf_analyzer not installed: benchmarks/sweep.py will say so"
