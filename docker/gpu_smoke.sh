#!/usr/bin/env bash
# GPU smoke test of the production image, for a GPU host with Docker and the NVIDIA runtime.
#
#   docker/gpu_smoke.sh CHECKPOINT PHOTOS_DIR
#
# Builds the image from docker/Dockerfile with CHECKPOINT, starts it, waits until it is
# ready (a TensorRT build at start can take minutes), then:
#   1. embeds PHOTOS_DIR with client/embed.py --check-parity against CHECKPOINT: exit 0;
#   2. embeds a folder of a few good photographs plus one truncated JPEG: exit 1, and the
#      truncated file is the one and only failure recorded (DALI fails the whole request
#      holding a bad image; the client must isolate it);
#   3. reads nv_inference_count / nv_inference_exec_count of sscd_descriptor from the
#      metrics port around step 1: the mean batch size the dynamic batcher formed; and
#      that the served sscd_preprocess (DALI) config has no dynamic batcher.
# Prints one table and exits 0 only if every step passed. The container is stopped (and its
# log kept in the work folder) whatever happens.
#
# Needs: docker, curl, and a Python with this project's client and export requirements
# (`pip install .[client,export]`: --check-parity runs PyTorch; the .venv of scripts/setup.sh,
# used when present). The checkpoint must lie inside the repository (the build context);
# one outside it, or in a folder .dockerignore leaves out, is copied to weights/
# (git-ignored as *.pt).
# Environment (all optional):
#   PYTHON            interpreter for client/embed.py, run from the repository root
#                     (default .venv/bin/python there, else python3)
#   IMAGE             image tag (default sscd-triton:gpu-smoke)
#   SSCD_ADMIN_KEY    admin key given to the server (default: a random one)
#   READY_TIMEOUT_S   how long to wait for readiness (default 1800, the image's start period:
#                     the first start builds the TensorRT plan)
#   POLL_S            seconds between readiness polls (default 5)
#   PARITY_N          photographs re-embedded with PyTorch for --check-parity (default 16)
#   HTTP_PORT GRPC_PORT METRICS_PORT   host ports (default 8000 8001 8002, on 127.0.0.1)
#   WORK              folder for outputs and logs (default: a new temporary folder, kept)
#   TRT_CACHE_VOLUME  docker volume for the plan cache (default sscd-trt-cache), mounted at
#   TRT_CACHE_PATH    (default /var/cache/sscd, the image's SSCD_TRT_CACHE)
#   DESCRIPTOR        passed as --build-arg DESCRIPTOR (tensorrt, the Dockerfile's default,
#                     or onnxruntime) when set
#   PRECISION         passed as --build-arg PRECISION when set: int8 serves an explicitly
#                     quantised plan, and step 1's --check-parity then holds it to int8's
#                     bounds against fp32 PyTorch (the client reads the served precision)
#   CALIBRATION       with PRECISION=int8: a folder of images to calibrate on, passed as
#                     --build-context calibration=DIR (default: the bundled photographs)
set -euo pipefail

# --- pure logic (tests/test_gpu_check.py sources this file and calls these) ------------

# metric_value NAME MODEL < metrics: the sum of NAME{...model="MODEL"...} samples, or
# nothing when there is none.
metric_value() {
  awk -v name="$1" -v model="$2" '
    index($0, name "{") == 1 && index($0, "model=\"" model "\"") { sum += $NF; n++ }
    END { if (n) printf "%.0f\n", sum }'
}

# mean_batch INFERENCES EXECUTIONS: inferences per execution with 2 decimals, or "n/a".
mean_batch() {
  awk -v c="${1:-}" -v e="${2:-}" 'BEGIN {
    if (c == "" || e == "" || e + 0 <= 0) print "n/a"; else printf "%.2f\n", c / e }'
}

# only_failure OUTPUT NAME: succeeds when the embed output OUTPUT recorded exactly one failure and its
# id names the file NAME (ids are the paths as the client enumerated them); prints its reason,
# or what it found otherwise.
only_failure() {
  "$PYTHON" - "$1" "$2" <<'PY'
import os, sys
from sscd_triton import load_failures  # Parquet shards, or a version-1 failures.jsonl
output, name = sys.argv[1], sys.argv[2]
try:
    records = load_failures(output)
except (OSError, ValueError) as e:
    sys.exit(f"cannot read the failures of {output}: {e}")
ids = [os.path.basename(r["id"]) for r in records]
if ids != [name]:
    sys.exit(f"failures {ids}, expected exactly [{name!r}]: "
             + "; ".join(f"{r['id']}: {r['reason']}" for r in records)[:400])
print(records[0]["reason"][:120])
PY
}

# rel_to ROOT PATH: PATH relative to ROOT, or nothing when PATH is outside ROOT.
rel_to() {
  local root path
  root=$(cd "$1" && pwd -P)
  path=$(cd "$(dirname "$2")" && pwd -P)/$(basename "$2")
  case "$path" in
    "$root"/*) printf '%s\n' "${path#"$root"/}" ;;
  esac
}

ROWS=()
FAILED=0
# row STEP RESULT DETAIL: one line of the final table; RESULT FAIL counts as a failure.
row() {
  ROWS+=("$1"$'\t'"$2"$'\t'"$3")
  if [[ $2 == FAIL ]]; then FAILED=$((FAILED + 1)); fi
}

print_table() {
  local r step result detail w=4
  for r in "${ROWS[@]}"; do
    step=${r%%$'\t'*}
    if ((${#step} > w)); then w=${#step}; fi
  done
  printf '\n%-4s  %-*s  %s\n' "" "$w" "step" "detail"
  for r in "${ROWS[@]}"; do
    IFS=$'\t' read -r step result detail <<<"$r"
    printf '%-4s  %-*s  %s\n' "$result" "$w" "$step" "$detail"
  done
}

if [[ ${BASH_SOURCE[0]} != "$0" ]]; then
  return 0 # sourced by a test: the functions only
fi

# --- the run ------------------------------------------------------------------------------
usage() {
  echo "usage: $0 CHECKPOINT PHOTOS_DIR   (see the top of this file)" >&2
  exit 2
}
[[ $# -eq 2 ]] || usage
CHECKPOINT=$1
PHOTOS=${2%/}
[[ $CHECKPOINT == /* ]] || CHECKPOINT=$PWD/$CHECKPOINT
[[ $PHOTOS == /* ]] || PHOTOS=$PWD/$PHOTOS
WORK=${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/sscd-gpu-smoke.XXXXXX")}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd -P)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$ROOT" # the build context, and client/ for embed.py
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
# client/embed.py imports the sscd_triton package: found here even when not installed
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
IMAGE=${IMAGE:-sscd-triton:gpu-smoke}
KEY=${SSCD_ADMIN_KEY:-smoke-$(od -An -N8 -tx8 /dev/urandom | tr -d ' ')}
READY_TIMEOUT_S=${READY_TIMEOUT_S:-1800}
POLL_S=${POLL_S:-5}
PARITY_N=${PARITY_N:-16}
HTTP_PORT=${HTTP_PORT:-8000}
GRPC_PORT=${GRPC_PORT:-8001}
METRICS_PORT=${METRICS_PORT:-8002}
TRT_CACHE_VOLUME=${TRT_CACHE_VOLUME:-sscd-trt-cache}
TRT_CACHE_PATH=${TRT_CACHE_PATH:-/var/cache/sscd}
build_args=(--build-arg "CHECKPOINT=PLACEHOLDER")
if [[ -n ${DESCRIPTOR:-} ]]; then build_args+=(--build-arg "DESCRIPTOR=$DESCRIPTOR"); fi
if [[ -n ${PRECISION:-} ]]; then build_args+=(--build-arg "PRECISION=$PRECISION"); fi
if [[ -n ${CALIBRATION:-} ]]; then build_args+=(--build-context "calibration=$CALIBRATION"); fi
HEADER="triton-grpc-protocol-sscd-admin-key=$KEY"
CID=""
START=$SECONDS

finish() {
  local rc=$?
  if [[ -n $CID ]]; then
    docker logs "$CID" >"$WORK/server.log" 2>&1 || true
    docker stop -t 30 "$CID" >/dev/null 2>&1 || true
    docker rm -f "$CID" >/dev/null 2>&1 || true
  fi
  if ((rc != 0 && FAILED == 0)); then row "(aborted)" FAIL "exit status $rc; see $WORK"; fi
  print_table
  if ((FAILED)); then
    echo "gpu smoke: $FAILED step(s) FAILED in $((SECONDS - START))s; logs in $WORK"
    exit 1
  fi
  echo "gpu smoke: all steps passed in $((SECONDS - START))s; logs in $WORK"
  exit 0
}
trap finish EXIT
trap 'exit 130' INT TERM

# fail STEP DETAIL: record the failure and stop (the EXIT trap prints the table).
fail() {
  row "$1" FAIL "$2"
  exit 1
}

# 0. preflight
for tool in docker curl "$PYTHON"; do
  command -v "$tool" >/dev/null || fail preflight "$tool not found"
done
[[ -f $CHECKPOINT ]] || fail preflight "checkpoint $CHECKPOINT: no such file"
[[ -d $PHOTOS ]] || fail preflight "photos $PHOTOS: not a folder"
mapfile -t photos < <(find "$PHOTOS" -type f \
  \( -iname '*.jpg' -o -iname '*.jpeg' -o -iname '*.png' -o -iname '*.webp' -o -iname '*.bmp' \) | sort)
mapfile -t jpegs < <(printf '%s\n' "${photos[@]}" | grep -iE '\.jpe?g$' || true)
((${#photos[@]} >= 3)) || fail preflight "$PHOTOS holds ${#photos[@]} photographs; need >= 3"
((${#jpegs[@]} >= 1)) || fail preflight "$PHOTOS holds no JPEG to truncate"
rel=$(rel_to "$ROOT" "$CHECKPOINT")
if [[ -n $rel ]] && grep -qxF -e "${rel%%/*}" -e "${rel%%/*}/" .dockerignore; then
  rel="" # in a folder the build context leaves out (runs/: the demo checkpoint)
fi
if [[ -z $rel ]]; then # outside the build context: copy it in
  mkdir -p weights
  rel=weights/$(basename "$CHECKPOINT")
  if [[ -e $rel ]] && ! cmp -s "$CHECKPOINT" "$rel"; then
    fail preflight "$CHECKPOINT lies outside the repository and a different $rel exists"
  fi
  cp -p "$CHECKPOINT" "$rel"
fi
parity_n=$PARITY_N
if ((parity_n > ${#photos[@]})); then parity_n=${#photos[@]}; fi
row preflight PASS "${#photos[@]} photographs, checkpoint $rel, work $WORK"

# 1. build
t=$SECONDS
build_args[1]="CHECKPOINT=$rel"
if docker build -f docker/Dockerfile "${build_args[@]}" -t "$IMAGE" . \
  >"$WORK/build.log" 2>&1; then
  row "docker build" PASS "$IMAGE in $((SECONDS - t))s (export parity report in $WORK/build.log)"
else
  fail "docker build" "failed after $((SECONDS - t))s: $(tail -n 3 "$WORK/build.log" | tr '\n' ' ')"
fi

# 2. start and wait for readiness
CID=$(docker run --gpus all -d --shm-size 1g \
  -p "127.0.0.1:$HTTP_PORT:8000" -p "127.0.0.1:$GRPC_PORT:8001" -p "127.0.0.1:$METRICS_PORT:8002" \
  -e "SSCD_ADMIN_KEY=$KEY" -v "$TRT_CACHE_VOLUME:$TRT_CACHE_PATH" "$IMAGE") ||
  fail "docker run" "the container did not start"
t=$SECONDS
until curl -fsS "http://127.0.0.1:$HTTP_PORT/v2/health/ready" >/dev/null 2>&1; do
  if [[ $(docker inspect -f '{{.State.Running}}' "$CID" 2>/dev/null) != true ]]; then
    fail ready "the server exited after $((SECONDS - t))s: $(docker logs --tail 3 "$CID" 2>&1 | tr '\n' ' ')"
  fi
  if ((SECONDS - t > READY_TIMEOUT_S)); then
    fail ready "not ready after ${READY_TIMEOUT_S}s (READY_TIMEOUT_S)"
  fi
  sleep "$POLL_S"
done
row ready PASS "after $((SECONDS - t))s (TensorRT plan built, or taken from volume $TRT_CACHE_VOLUME)"

metrics() {
  curl -fsS "http://127.0.0.1:$METRICS_PORT/metrics" 2>/dev/null || true
}

# 3. the photographs, with parity against the checkpoint
before=$(metrics)
t=$SECONDS
rc=0
# the photographs found above, as a list: other files in the folder (a README) would be
# recorded as failures (exit 1) by client/embed.py, which accounts for every file it is given
printf '%s\n' "${photos[@]}" >"$WORK/photos.lst"
"$PYTHON" client/embed.py "@$WORK/photos.lst" --url "127.0.0.1:$GRPC_PORT" --output "$WORK/photos" \
  --check-parity "$parity_n" --checkpoint "$CHECKPOINT" --header "$HEADER" --quiet \
  >"$WORK/embed_photos.log" 2>&1 || rc=$?
took=$((SECONDS - t))
if ((rc == 0)); then
  row "embed + parity" PASS "${#photos[@]} photographs (${PRECISION:-default precision}) in ${took}s (whole seconds; client/embed.py's summary in $WORK/embed_photos.log gives images/s), parity on $parity_n: exit 0"
else
  row "embed + parity" FAIL "exit $rc (4: a parity bound failed); see $WORK/embed_photos.log"
fi
after=$(metrics)
c0=$(metric_value nv_inference_count sscd_descriptor <<<"$before")
c1=$(metric_value nv_inference_count sscd_descriptor <<<"$after")
e0=$(metric_value nv_inference_exec_count sscd_descriptor <<<"$before")
e1=$(metric_value nv_inference_exec_count sscd_descriptor <<<"$after")
count=$((${c1:-0} - ${c0:-0}))
execs=$((${e1:-0} - ${e0:-0}))
mean=$(mean_batch "$count" "$execs")
if [[ $mean == n/a ]]; then
  row "mean batch" FAIL "no sscd_descriptor executions on :$METRICS_PORT/metrics"
else
  row "mean batch" PASS "$mean = $count inferences / $execs executions of sscd_descriptor (step 'embed + parity')"
fi
# DALI must run each request alone (no dynamic batcher: one corrupt image would fail other
# requests' images); the DALI backend adds one unless --disable-auto-complete-config. The
# served config is the one the server completed.
if ! pre_config=$(curl -fsS -H "sscd-admin-key: $KEY" \
  "http://127.0.0.1:$HTTP_PORT/v2/models/sscd_preprocess/config" 2>&1); then
  row "DALI per request" FAIL "cannot read sscd_preprocess's config: $pre_config"
elif [[ $pre_config == *'"dynamic_batching"'* ]]; then
  row "DALI per request" FAIL "sscd_preprocess has a dynamic batcher: is tritonserver run with --disable-auto-complete-config?"
else
  row "DALI per request" PASS "sscd_preprocess's served config has no dynamic batcher"
fi

# 4. one truncated JPEG among good photographs
mkdir -p "$WORK/corrupt"
good=0
for p in "${photos[@]:0:7}"; do # numbered: photographs of subfolders may share a name
  cp -p "$p" "$WORK/corrupt/$good-$(basename "$p")"
  good=$((good + 1))
done
bad=corrupt-truncated.jpg
size=$(wc -c <"${jpegs[0]}")
head -c $((size / 2)) "${jpegs[0]}" >"$WORK/corrupt/$bad"
rc=0
"$PYTHON" client/embed.py "$WORK/corrupt" --url "127.0.0.1:$GRPC_PORT" --output "$WORK/corrupt_out" \
  --header "$HEADER" --quiet >"$WORK/embed_corrupt.log" 2>&1 || rc=$?
if ((rc != 1)); then
  row "corrupt JPEG" FAIL "exit $rc, expected 1; see $WORK/embed_corrupt.log"
elif reason=$(only_failure "$WORK/corrupt_out" "$bad" 2>&1); then
  embedded=$("$PYTHON" -c 'import sys; from sscd_triton import load_embeddings; print(len(load_embeddings(sys.argv[1])[0]))' "$WORK/corrupt_out" 2>&1 || true)
  if [[ $embedded == "$good" ]]; then
    row "corrupt JPEG" PASS "exit 1, only $bad failed ($reason), $embedded/$good good embedded"
  else
    row "corrupt JPEG" FAIL "only $bad failed, but $embedded of $good good photographs embedded"
  fi
else
  row "corrupt JPEG" FAIL "$reason"
fi
