#!/usr/bin/env bash
# The image's ENTRYPOINT, chained after NVIDIA's /opt/nvidia/nvidia_entrypoint.sh (CUDA
# forward compatibility, banner, driver and shm checks), which execs this script:
#  1. build (or reuse from the cache volume) the TensorRT plan for this GPU (build_plan.sh);
#     a failed build stops the container with one "[sscd] error:" line;
#  2. exec tritonserver with the production flags of ../shared/triton/NOTES.md: no dynamic
#     model loading, admin protocols (logging included) behind a key, strict readiness,
#     bounded exit. Extra arguments go to tritonserver.
set -euo pipefail
key=${SSCD_ADMIN_KEY:?set SSCD_ADMIN_KEY: it guards the shared-memory, repository, config, statistics, trace and logging APIs}
repo=${SSCD_MODEL_REPOSITORY:-/models}
admin="shared-memory,model-repository,model-config,statistics,trace,logging:sscd-admin-key=${key}"
/usr/local/bin/sscd-build-plan "$repo"
# Memory pools and gRPC threads sized for this repository (its max batch, in-flight bound and
# image shape), one flag per line: sscd/server.args, written by export/build_repository.py
# (sscd_triton/serving/repository.py sized_server_flags: --cuda-memory-pool-byte-size for
# max_inflight x max_batch x 3x320x320 float32 intermediates, --pinned-memory-pool-byte-size,
# --grpc-infer-thread-count). A repository without it gets Triton's defaults.
sized=()
if [[ -f $repo/sscd/server.args ]]; then
  mapfile -t sized < <(grep -v -e '^[[:space:]]*#' -e '^[[:space:]]*$' "$repo/sscd/server.args")
fi
# --disable-auto-complete-config: else the DALI backend adds a dynamic batcher to
# sscd_preprocess, and one corrupt image fails other requests' images too
# (sscd_triton/serving/repository.py GPU_SERVER_FLAGS).
exec tritonserver --model-repository="$repo" \
  --model-control-mode=none --exit-on-error=true --strict-readiness=true \
  --disable-auto-complete-config \
  --exit-timeout-secs=30 \
  --grpc-restricted-protocol="$admin" \
  --http-restricted-api="$admin" \
  "${sized[@]}" \
  "$@"
