#!/usr/bin/env bash
# The main job on this machine: set up, export a checkpoint (untrained demo weights when
# none is given) into a cpu Triton repository, serve it with tritonserver on 127.0.0.1,
# embed real photographs in six formats through it, print parity against PyTorch, stop.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
ckpt=()
[ $# -ge 1 ] && ckpt=(--checkpoint "$1")
.venv/bin/python export/build_repository.py --target cpu --output runs/model_repository "${ckpt[@]}"
.venv/bin/python export/serve_check.py --repository runs/model_repository "${ckpt[@]}"
# What a user runs next, on their own folder (the server bound to 127.0.0.1 only).
cat <<'NEXT'

Next, the copies among your own photographs, in one command (it starts and stops its own
local server; add --checkpoint CKPT for real descriptors):
  .venv/bin/sscd-dedup ~/photos --output runs/my-photos-dedup    # then open report.html

Or step by step, with a server of your own (stop it with Ctrl-C or kill %1):
  .venv/bin/tritonserver --model-repository runs/model_repository \
      --grpc-address 127.0.0.1 --http-address 127.0.0.1 --metrics-address 127.0.0.1 &
  .venv/bin/sscd-embed ~/photos --output runs/my-photos
  .venv/bin/sscd-dedup --embeddings runs/my-photos --groups runs/my-photos-groups.csv
NEXT
