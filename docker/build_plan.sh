#!/usr/bin/env bash
# Build sscd_descriptor/1/model.plan at container start, with this image's TensorRT on the
# GPU that serves it (a plan runs only with the TensorRT version and GPU family that built
# it), cached on the volume under a key of GPU name, TensorRT version and build, model.onnx and the
# build recipe: rebuilt only when one of them changes.
#
#   docker/build_plan.sh [REPOSITORY]      (default /models; docker/entrypoint.sh calls it)
#
# The recipe (sscd_descriptor/plan_build.args, written by export/build_repository.py from
# sscd_triton.spec) holds the trtexec flags: profile shapes, --stronglyTyped, --noTF32,
# workspace. No recipe: nothing to build (onnxruntime fallback, or a plan given with --plan).
# Environment: SSCD_TRT_CACHE (cache folder, default /var/cache/sscd), SSCD_TRTEXEC (trtexec
# path; default: PATH, then /usr/src/tensorrt/bin/trtexec).
# Exit status 0: model.plan in place (or nothing to build); 1: one "[sscd] error:" line.
set -euo pipefail

repo=${1:-/models}
model_dir="$repo/sscd_descriptor"
recipe="$model_dir/plan_build.args"
onnx="$model_dir/1/model.onnx"
served="$model_dir/1/model.plan"
cache="${SSCD_TRT_CACHE:-/var/cache/sscd}/plans"

log() { echo "[sscd] $*"; }
fail() { echo "[sscd] error: $*" >&2; exit 1; }

if [[ ! -f $recipe ]]; then
  if [[ -f $served ]]; then
    log "serving the prebuilt plan $served (no build recipe)"
  else
    log "no TensorRT plan to build ($recipe absent): the descriptor runs on its configured backend"
  fi
  exit 0
fi
[[ -f $onnx ]] || fail "$onnx is missing: the repository was not built with export/build_repository.py --target gpu"

trtexec=${SSCD_TRTEXEC:-$(command -v trtexec || true)}
[[ -n $trtexec ]] || trtexec=/usr/src/tensorrt/bin/trtexec
[[ -x $trtexec ]] || fail "no trtexec in this image (looked for \$SSCD_TRTEXEC, trtexec on PATH, /usr/src/tensorrt/bin/trtexec): cannot build the TensorRT plan"

gpus=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null) \
  || fail "nvidia-smi failed: no GPU visible (run the container with --gpus)"
gpu=$(sort -u <<<"$gpus" | sed '/^[[:space:]]*$/d')
[[ -n $gpu ]] || fail "nvidia-smi lists no GPU (run the container with --gpus)"
[[ $(wc -l <<<"$gpu") -eq 1 ]] \
  || fail "GPUs of different models are visible ($(paste -sd, <<<"$gpu")): a plan serves one; pick one with NVIDIA_VISIBLE_DEVICES"

# trtexec opens every run with "&&&& RUNNING TensorRT.trtexec [TensorRT v101300] [b23] # ...":
# the version, then the build number (two builds of one version can differ in kernels and
# tactics: a plan is keyed on both). An older trtexec without the build number keys on "-".
banner=$("$trtexec" --help 2>&1 || true)
[[ $banner =~ TensorRT\ v([0-9]+) ]] || fail "$trtexec --help did not name its TensorRT version"
trt=${BASH_REMATCH[1]}
trt_build=-
[[ $banner =~ \[TensorRT\ v[0-9]+\]\ \[b([0-9]+)\] ]] && trt_build=${BASH_REMATCH[1]}

mapfile -t flags < <(grep -v -e '^[[:space:]]*#' -e '^[[:space:]]*$' "$recipe")
for f in "${flags[@]}"; do
  [[ $f == --* ]] || fail "$recipe: '$f' is not a trtexec flag (regenerate it with export/build_repository.py)"
done

onnx_sha=$(sha256sum "$onnx" | cut -d' ' -f1)
recipe_sha=$(sha256sum "$recipe" | cut -d' ' -f1)
key=$(printf 'gpu=%s\ntensorrt=%s\nbuild=%s\nonnx=%s\nrecipe=%s\n' "$gpu" "$trt" "$trt_build" "$onnx_sha" "$recipe_sha" \
  | sha256sum | cut -c1-24)
plan="$cache/sscd-$key.plan"
mkdir -p "$cache" || fail "cannot create the plan cache $cache (mount a writable volume there)"
[[ -w $cache ]] || fail "the plan cache $cache is not writable by $(id -un)"

# Containers sharing the volume build one at a time; the second finds the first one's plan.
if command -v flock >/dev/null; then
  exec 9>"$cache/.lock" || fail "cannot open $cache/.lock for writing (is the cache volume writable by uid $(id -u)?)"
  flock 9
fi

if [[ -s $plan ]]; then
  log "reusing cached TensorRT plan $plan ($gpu, TensorRT v$trt build $trt_build, model.onnx ${onnx_sha:0:12})"
else
  build_log="$cache/sscd-$key.build.log"
  tmp="$plan.tmp.$$"
  log "building TensorRT plan for $gpu with TensorRT v$trt build $trt_build (model.onnx ${onnx_sha:0:12}): takes minutes; cached in $cache for later starts; log $build_log"
  start=$SECONDS
  if "$trtexec" --onnx="$onnx" --saveEngine="$tmp" --skipInference \
       --timingCacheFile="$cache/timing-v$trt-${gpu//[^A-Za-z0-9]/_}.cache" \
       "${flags[@]}" >"$build_log" 2>&1 && [[ -s $tmp ]]; then
    mv -f "$tmp" "$plan"
    printf 'gpu=%s\ntensorrt=%s\nbuild=%s\nonnx_sha256=%s\nrecipe_sha256=%s\nflags=%s\nseconds=%s\n' \
      "$gpu" "$trt" "$trt_build" "$onnx_sha" "$recipe_sha" "${flags[*]}" "$((SECONDS - start))" >"$plan.txt"
    log "built $plan in $((SECONDS - start)) s"
  else
    status=$?
    rm -f "$tmp"
    last=$(grep -v '^[[:space:]]*$' "$build_log" | tail -n 1 || true)
    fail "TensorRT plan build failed (trtexec exit $status; log $build_log): ${last:-no output}"
  fi
fi

tmp="$served.tmp.$$"
if ! { cp "$plan" "$tmp" && mv -f "$tmp" "$served"; }; then
  rm -f "$tmp"
  fail "cannot write $served (is the version folder writable?)"
fi
log "serving $served"
