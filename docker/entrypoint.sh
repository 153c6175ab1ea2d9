#!/usr/bin/env bash
# Start tritonserver with the production flags from ../shared/triton/NOTES.md:
# no dynamic model loading, admin protocols behind a key, strict readiness, bounded exit.
set -euo pipefail
key=${SSCD_ADMIN_KEY:?set SSCD_ADMIN_KEY: it guards the shared-memory, repository, config and statistics APIs}
exec tritonserver --model-repository=/models \
  --model-control-mode=none --exit-on-error=true --strict-readiness=true \
  --exit-timeout-secs=30 \
  --grpc-restricted-protocol="shared-memory,model-repository,model-config,statistics,trace:sscd-admin-key=${key}" \
  --http-restricted-api="shared-memory,model-repository,model-config,statistics,trace:sscd-admin-key=${key}" \
  "$@"
