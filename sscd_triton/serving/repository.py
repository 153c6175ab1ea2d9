"""Triton model repository generation: every config from `sscd_triton.spec` and one
`ServingConfig`, written through tritonclient's `model_config_pb2` so that what is written parses.

Three models, the same names, inputs and outputs on both targets (a fourth on gpu):
  sscd            ensemble: uint8 [-1] encoded file -> float32 [dims] descriptor
  sscd_check      gpu only, the first step: python backend refusing incomplete files
                  (images.check_complete) before DALI; generated self-contained model.py
  sscd_preprocess gpu: DALI (nvJPEG, antialiased linear resize); cpu: python backend (PIL)
  sscd_descriptor gpu: a TensorRT plan (built at container start by docker/build_plan.sh
                  from the recipe written here), or the documented fallback onnxruntime +
                  TensorRT EP; cpu: python + ORT
Every config carries the served model's identity as `parameters` (spec.PARAM_MODEL_NAME,
PARAM_WEIGHTS_SHA256, PARAM_PREPROCESS), so a client can tell which weights answer it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from sscd_triton import images, spec
from sscd_triton.files import copy_atomic, write_atomic

TARGETS = ("gpu", "cpu")
# gpu descriptor backends: "tensorrt" serves 1/model.plan, built from 1/model.onnx on the
# serving GPU with the serving image's TensorRT (docker/build_plan.sh, at container start);
# "onnxruntime" is the fallback: the same ONNX through onnxruntime's TensorRT EP.
DESCRIPTORS = ("tensorrt", "onnxruntime")
WARMUP_FILE = "warmup_image.jpg"
# docker/ mounts a volume here so plans and engines survive restarts.
TRT_CACHE = "/var/cache/sscd"
ORT_ENGINE_CACHE = f"{TRT_CACHE}/onnxruntime"
# The plan build recipe beside sscd_descriptor/config.pbtxt: the trtexec flags that follow
# from this ServingConfig (profile shapes, typing, TF32, workspace), one per line. build_plan.sh
# adds --onnx/--saveEngine/--timingCacheFile and keys its cache on this file's hash.
PLAN_RECIPE = "plan_build.args"
PLAN_FILE = "model.plan"
ONNX_FILE = "model.onnx"
WORKSPACE_MIB = 4096
# short288 keeps the aspect ratio: H and W are dynamic. The profile must bound them; images
# longer than this many times their short side fail their batch on the gpu target.
SHORT_MAX_ASPECT = 3
PYTHON_SHIM = "from sscd_triton.serving.{module} import TritonPythonModel  # noqa: F401\n"


UNKNOWN = "unknown"  # the weights' hash when no ONNX is written (--configs-only)


@dataclass(frozen=True)
class ServingConfig:
    """What a repository serves (target, model identity, preprocessing, descriptor backend)
    and how hard it batches: everything its config.pbtxt files are generated from."""

    target: str = "gpu"
    dims: int = 512
    preprocess: str = spec.DEFAULT_PREPROCESS
    max_batch: int = 64
    max_pixels: int = spec.MAX_IMAGE_PIXELS
    descriptor: str = "tensorrt"  # gpu only: one of DESCRIPTORS
    prebuilt_plan: bool = False  # gpu tensorrt: 1/model.plan is given (--plan), no recipe
    queue_delay_us: int = 2000
    max_inflight: int = 0  # ensemble backpressure, requests per step; 0: `inflight`
    dali_threads: int = 4  # gpu: DALI CPU threads per instance (dali_backend `num_threads`)
    # gpu: share of JPEG decoding on the hardware decoder (A100, H100, H200); DALI's default
    # until a GPU measures better (decoders.image schema: hw_decoder_load, default 0.65).
    hw_decoder_load: float = 0.65
    model_name: str = UNKNOWN  # spec.PARAM_MODEL_NAME: e.g. "sscd_disc_mixup"
    weights_sha256: str = UNKNOWN  # spec.PARAM_WEIGHTS_SHA256: of the descriptor ONNX
    precision: str = UNKNOWN  # spec.PARAM_PRECISION: of the descriptor ONNX

    @property
    def image_dims(self) -> list[int]:
        p = spec.PREPROCESS[self.preprocess]
        return [spec.CHANNELS, p.size, p.size] if p.square else [spec.CHANNELS, -1, -1]

    @property
    def warmup_dims(self) -> list[int]:
        p = spec.PREPROCESS[self.preprocess]
        return [spec.CHANNELS, p.size, p.size if p.square else p.size * 4 // 3]

    @property
    def inflight(self) -> int:
        """The ensemble's max_inflight_requests: requests at each step, all callers together.

        Four max batches of the descriptor in flight, from spec.CLIENT_BATCH-image requests
        (16 for max_batch 64): two instances busy, two batches forming. Requests carry up to
        max_batch images, so memory is sized for inflight x max_batch (`cuda_pool_bytes`)."""
        return self.max_inflight or max(1, 4 * self.max_batch // spec.CLIENT_BATCH)

    def cuda_pool_bytes(self) -> int:
        """tritonserver --cuda-memory-pool-byte-size for GPU 0: the in-flight intermediates.

        Triton core allocates the ensemble's intermediate GPU tensors from this pool (the
        default 64 MiB, then slower allocations, spilling to host when the pool is short).
        Between DALI and the descriptor: inflight requests x max_batch images x float32
        C x H x W at the profile's largest shape (3 x 320 x 320 x 4 B = 1.2 MB for
        square320), plus the descriptors out; 16 x 64 x 1.2 MB = 1.26 GB by default.
        Rounded up to whole MiB."""
        _, _, hi = self.profile()
        image = 4 * hi[1] * hi[2] * hi[3]
        total = self.inflight * self.max_batch * (image + 4 * self.dims)
        return -(-total // (1 << 20)) << 20

    def pinned_pool_bytes(self) -> int:
        """tritonserver --pinned-memory-pool-byte-size: host staging of GPU<->CPU copies.

        The descriptors leave the GPU through it (inflight x max_batch x dims x 4 B: 2 MiB by
        default), and CPU inputs collected for a GPU model (the encoded bytes, when a backend
        gathers them through Triton) go through it: inflight x max_batch x 256 KiB (a
        typical photo; larger ones fall back to pageable copies, slower, never wrong). Never
        below Triton's default, 256 MiB."""
        per_image = 4 * self.dims + (256 << 10)
        return max(256 << 20, -(-self.inflight * self.max_batch * per_image // (1 << 20)) << 20)

    @property
    def opt_batch(self) -> int:
        return max(1, self.max_batch // 2)

    def profile(self) -> tuple[list[int], list[int], list[int]]:
        """min, opt and max input shapes [N, C, H, W] of the one optimisation profile."""
        p = spec.PREPROCESS[self.preprocess]
        if p.square:
            hw_min = hw_opt = hw_max = [p.size, p.size]
        else:
            hw_min, hw_opt = [p.size, p.size], [p.size, p.size * 4 // 3]
            hw_max = [p.size * SHORT_MAX_ASPECT] * 2
        c = spec.CHANNELS
        return [1, c, *hw_min], [self.opt_batch, c, *hw_opt], [self.max_batch, c, *hw_max]


# tritonserver flags the gpu repository needs. Without them the DALI backend auto-completes
# `sscd_preprocess` with an empty dynamic_batching block (dali_backend
# src/config_tools/config_tools.cc: any batched model without one gets it) and DALI batches
# requests together again, so one corrupt image fails other requests' images.
GPU_SERVER_FLAGS = ("--disable-auto-complete-config",)
# Handler threads for gRPC inference requests (Triton's default is 2, valid 1..128; server
# docs, inference_protocols.md: "in cases where the performance bottleneck is at the request
# handling step (e.g. ensemble models), increasing the number of gRPC inference handler
# threads may lead to a higher throughput"). 11.6k images/s in 16-image requests is ~725
# requests/s of ~3 MB each to parse and copy: 8 threads, as many as deploy/k8s requests
# CPUs for the front end. A starting point, for a GPU run to confirm.
GRPC_INFER_THREADS = 8
# The sized flags, one per line, beside the ensemble's config; docker/entrypoint.sh reads it
# so that a repository built with another --max-batch gets pools to match.
SERVER_ARGS = "server.args"
# Triton gained `ensemble_scheduling.max_inflight_requests` in release 25.11 (server
# docs/user_guide/ensemble_models.md, "Managing Memory Usage in Ensemble Models"; absent
# from model_config.proto before): an older server refuses the gpu ensemble's config.
# docker/Dockerfile's TRITON_VERSION must be at least this (tests/test_deploy.py).
MIN_TRITON_RELEASE = "25.11"


def gpu_server_flags(serving: ServingConfig) -> list[str]:
    """Every tritonserver flag the gpu repository `serving` needs: GPU_SERVER_FLAGS, then
    the pools and threads sized for it (what `server.args` holds)."""
    return [*GPU_SERVER_FLAGS, *sized_server_flags(serving)]


def sized_server_flags(serving: ServingConfig) -> list[str]:
    return [f"--cuda-memory-pool-byte-size=0:{serving.cuda_pool_bytes()}",
            f"--pinned-memory-pool-byte-size={serving.pinned_pool_bytes()}",
            f"--grpc-infer-thread-count={GRPC_INFER_THREADS}"]


def server_args_text(serving: ServingConfig) -> str:
    return ("# Written by export/build_repository.py from sscd_triton.spec: tritonserver flags\n"
            "# sized for this repository (sscd_triton/serving/repository.py ServingConfig\n"
            "# cuda_pool_bytes, pinned_pool_bytes; GRPC_INFER_THREADS); read by\n"
            "# docker/entrypoint.sh. The pool is for GPU 0: the container serves one GPU.\n"
            + "".join(f"{a}\n" for a in sized_server_flags(serving)))


def shapes_arg(shape: list[int]) -> str:
    """`images:1x3x320x320`: the form of trtexec's --minShapes and of onnxruntime's
    trt_profile_min_shapes."""
    return f"{spec.INPUT_NAME}:{'x'.join(map(str, shape))}"


def plan_recipe(serving: ServingConfig) -> list[str]:
    """trtexec flags for the plan served by `serving` (docker/build_plan.sh adds the paths).

    --stronglyTyped: tensor types come from the ONNX (an fp16 export keeps its fp32
    GeM/Linear/L2 island; an fp32 export builds fp32); required on TensorRT 10, always on
    (the flag a no-op) in 11. --noTF32: fp32 layers really run fp32 (1e-4 parity)."""
    lo, opt, hi = serving.profile()
    return [f"--minShapes={shapes_arg(lo)}", f"--optShapes={shapes_arg(opt)}",
            f"--maxShapes={shapes_arg(hi)}", "--stronglyTyped", "--noTF32",
            f"--memPoolSize=workspace:{WORKSPACE_MIB}M"]


def recipe_text(serving: ServingConfig) -> str:
    return ("# Written by export/build_repository.py from sscd_triton.spec; read by\n"
            "# docker/build_plan.sh at container start (trtexec flags, one per line).\n"
            + "".join(f"{a}\n" for a in plan_recipe(serving)))


def read_recipe(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def _param(cfg: mc.ModelConfig, key: str, value) -> None:
    cfg.parameters[key].string_value = str(value)


def _identity(cfg: mc.ModelConfig, serving: ServingConfig) -> None:
    """Which weights, precision and preprocessing answer: the same keys in every config."""
    _param(cfg, spec.PARAM_MODEL_NAME, serving.model_name)
    _param(cfg, spec.PARAM_WEIGHTS_SHA256, serving.weights_sha256)
    _param(cfg, spec.PARAM_PRECISION, serving.precision)
    _param(cfg, spec.PARAM_PREPROCESS, serving.preprocess)


def _batching(cfg: mc.ModelConfig, serving: ServingConfig) -> None:
    b = cfg.dynamic_batching
    b.preferred_batch_size.extend(sorted({max(1, serving.max_batch // 2), serving.max_batch}))
    b.max_queue_delay_microseconds = serving.queue_delay_us
    # Bounded queue: overload is refused at once instead of growing latency without end.
    b.default_queue_policy.max_queue_size = 16 * serving.max_batch


def _instances(cfg: mc.ModelConfig, serving: ServingConfig, count: int) -> None:
    g = cfg.instance_group.add()
    g.count = count
    g.kind = mc.ModelInstanceGroup.KIND_GPU if serving.target == "gpu" else mc.ModelInstanceGroup.KIND_CPU


def preprocess_config(serving: ServingConfig) -> mc.ModelConfig:
    cfg = mc.ModelConfig(name=spec.PREPROCESS_MODEL, max_batch_size=serving.max_batch)
    cfg.input.add(name=spec.ENSEMBLE_INPUT, data_type=mc.TYPE_UINT8, dims=[-1],
                  allow_ragged_batch=True)
    cfg.output.add(name=spec.INPUT_NAME, data_type=mc.TYPE_FP32, dims=serving.image_dims)
    # Recorded on both targets so clients and checks can read what the server does
    # (the DALI backend ignores parameters it does not know).
    _identity(cfg, serving)
    _param(cfg, "max_pixels", serving.max_pixels)
    if serving.target == "gpu":
        cfg.backend = "dali"
        # dali_backend docs/config.md: `num_threads`, the pipeline's CPU threads (the
        # host stage of nvJPEG, PNG/WebP/BMP decoding), overriding dali.py's per instance.
        _param(cfg, "num_threads", serving.dali_threads)
        _param(cfg, "hw_decoder_load", serving.hw_decoder_load)  # written into dali.py
        # No dynamic batcher: DALI fails the whole batch it runs when one image is corrupt
        # (dali_backend ExecuteBatched), so batching requests together would fail good
        # requests for another's bad file, and the client would need one-at-a-time
        # re-sends to find it (sscd_triton/client/transport.py). Each request is one DALI
        # batch (the client sends --batch-size images per request); two instances overlap
        # one request's decode with the next. The descriptor behind it still batches.
        _instances(cfg, serving, 2)
    else:
        cfg.backend = "python"
        # One process: PIL decodes + resizes a photograph in ~10 ms, the ResNet50 on ONNX
        # Runtime takes ~130 ms per image per 2 cores, so one decoder feeds ~20 cores. A second
        # instance only split the dynamic batches (the descriptor then ran smaller ones) and
        # ran beside ONNX Runtime's threads on the same cores, slowing it by ~25%
        # (benchmarks/sweep.py, composing-model statistics; see benchmarks/README.md).
        _instances(cfg, serving, 1)
        _batching(cfg, serving)
    w = cfg.model_warmup.add(name="one_jpeg", batch_size=1)
    w.inputs[spec.ENSEMBLE_INPUT].data_type = mc.TYPE_UINT8
    w.inputs[spec.ENSEMBLE_INPUT].dims.append(len(warmup_image()))
    w.inputs[spec.ENSEMBLE_INPUT].input_data_file = WARMUP_FILE
    return cfg


def descriptor_config(serving: ServingConfig) -> mc.ModelConfig:
    cfg = mc.ModelConfig(name=spec.DESCRIPTOR_MODEL, max_batch_size=serving.max_batch)
    cfg.input.add(name=spec.INPUT_NAME, data_type=mc.TYPE_FP32, dims=serving.image_dims)
    cfg.output.add(name=spec.OUTPUT_NAME, data_type=mc.TYPE_FP32, dims=[serving.dims])
    _identity(cfg, serving)
    if serving.target == "cpu":
        cfg.backend = "python"
        _param(cfg, "onnx_file", "model.onnx")
        _param(cfg, "threads", 0)
        _instances(cfg, serving, 1)  # ONNX Runtime already uses every core
    elif serving.descriptor == "tensorrt":
        cfg.backend = "tensorrt"  # loads 1/model.plan
        _instances(cfg, serving, 2)  # two execution contexts overlap copies and compute
        # CUDA graphs (TensorRT backend only). Without graph_spec the backend captures
        # batch 1, the preferred sizes and the max (tensorrt_backend src/instance_state.cc
        # `InitializeGraphSpecs`), and runs a graph only on an exact batch match (no
        # `graph_lower_bound`: `allow_inexact_match` false): 1, 32 and 64, while requests
        # of spec.CLIENT_BATCH images form 16, 32, 48 and 64. So the sizes that form are
        # listed; shapes are the profile's opt dims (`BuildCudaGraph`), exact for square.
        cfg.optimization.cuda.graphs = True
        if spec.PREPROCESS[serving.preprocess].square:
            for batch in graph_batches(serving):
                cfg.optimization.cuda.graph_spec.add(batch_size=batch)
    elif serving.descriptor == "onnxruntime":
        cfg.backend = "onnxruntime"
        _instances(cfg, serving, 2)
        trt = cfg.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
        # FP16 mode would let TensorRT pick half kernels for GeM's x**3 and the norm too
        # (NVIDIA/TensorRT#1954); the exported graph already says which part is fp16.
        # "FP32" is TF32 unless NVIDIA_TF32_OVERRIDE=0, which docker/Dockerfile sets.
        trt.parameters["precision_mode"] = "FP32"
        trt.parameters["max_workspace_size_bytes"] = str(WORKSPACE_MIB << 20)
        # One explicit profile, the plan's: without it the EP rebuilds engines per shape.
        lo, opt, hi = serving.profile()
        trt.parameters["trt_profile_min_shapes"] = shapes_arg(lo)
        trt.parameters["trt_profile_opt_shapes"] = shapes_arg(opt)
        trt.parameters["trt_profile_max_shapes"] = shapes_arg(hi)
        # Without the engine cache every model load rebuilds engines for minutes.
        trt.parameters["trt_engine_cache_enable"] = "1"
        trt.parameters["trt_engine_cache_path"] = ORT_ENGINE_CACHE
        trt.parameters["trt_timing_cache_enable"] = "1"
        trt.parameters["trt_timing_cache_path"] = ORT_ENGINE_CACHE
    else:
        raise ValueError(f"descriptor {serving.descriptor!r}: one of {', '.join(DESCRIPTORS)}")
    _batching(cfg, serving)
    # Warm the smallest and the largest batch: engines built lazily for a new shape
    # would otherwise stall the first full batch in production.
    for batch in sorted({1, serving.max_batch}):
        w = cfg.model_warmup.add(name=f"zeros_batch{batch}", batch_size=batch)
        w.inputs[spec.INPUT_NAME].data_type = mc.TYPE_FP32
        w.inputs[spec.INPUT_NAME].dims.extend(serving.warmup_dims)
        w.inputs[spec.INPUT_NAME].zero_data = True
    return cfg


def graph_batches(serving: ServingConfig) -> list[int]:
    """Descriptor batch sizes that form from spec.CLIENT_BATCH-image requests (the dynamic
    batcher never splits a request), with 1 and max_batch."""
    step = min(spec.CLIENT_BATCH, serving.max_batch)
    return sorted({1, serving.max_batch, *range(step, serving.max_batch + 1, step)})


def check_config(serving: ServingConfig) -> mc.ModelConfig:
    """gpu: the python-backend step ahead of DALI (sscd_triton/serving/triton_check.py)."""
    cfg = mc.ModelConfig(name=spec.CHECK_MODEL, backend="python", max_batch_size=serving.max_batch)
    cfg.input.add(name=spec.ENSEMBLE_INPUT, data_type=mc.TYPE_UINT8, dims=[-1])
    cfg.output.add(name=spec.CHECKED_NAME, data_type=mc.TYPE_UINT8, dims=[-1])
    _identity(cfg, serving)
    # CPU processes: the check reads host bytes, microseconds per image; two overlap one
    # request's shared-memory round trip with the next (no batcher: each request alone).
    g = cfg.instance_group.add()
    g.count = 2
    g.kind = mc.ModelInstanceGroup.KIND_CPU
    return cfg


def ensemble_config(serving: ServingConfig) -> mc.ModelConfig:
    cfg = mc.ModelConfig(name=spec.ENSEMBLE_NAME, platform="ensemble",
                         max_batch_size=serving.max_batch)
    cfg.input.add(name=spec.ENSEMBLE_INPUT, data_type=mc.TYPE_UINT8, dims=[-1])
    cfg.output.add(name=spec.ENSEMBLE_OUTPUT, data_type=mc.TYPE_FP32, dims=[serving.dims])
    _identity(cfg, serving)  # what clients read: the ensemble is the model they call
    steps = cfg.ensemble_scheduling
    encoded = spec.ENSEMBLE_INPUT
    if serving.target == "gpu":
        # Every file checked for completeness before DALI sees it (images.check_complete).
        check = steps.step.add(model_name=spec.CHECK_MODEL, model_version=-1)
        check.input_map[spec.ENSEMBLE_INPUT] = spec.ENSEMBLE_INPUT
        check.output_map[spec.CHECKED_NAME] = encoded = spec.CHECKED_NAME
    pre = steps.step.add(model_name=spec.PREPROCESS_MODEL, model_version=-1)
    pre.input_map[spec.ENSEMBLE_INPUT] = encoded
    pre.output_map[spec.INPUT_NAME] = "preprocessed"
    desc = steps.step.add(model_name=spec.DESCRIPTOR_MODEL, model_version=-1)
    desc.input_map[spec.INPUT_NAME] = "preprocessed"
    desc.output_map[spec.OUTPUT_NAME] = spec.ENSEMBLE_OUTPUT
    if serving.target == "gpu":
        # Backpressure: decoding outruns inference and a decoded tensor is ~10x its file;
        # bound what waits at each step, all requests together (Triton >= MIN_TRITON_RELEASE
        # 25.11; the 2.51 server bundled for the cpu target predates the field). The CUDA
        # pool is sized for it (ServingConfig.cuda_pool_bytes, server.args).
        steps.max_inflight_requests = serving.inflight
    return cfg


def configs(serving: ServingConfig) -> list[mc.ModelConfig]:
    check = [check_config(serving)] if serving.target == "gpu" else []
    return [ensemble_config(serving), *check, preprocess_config(serving),
            descriptor_config(serving)]


def to_pbtxt(cfg: mc.ModelConfig) -> str:
    return text_format.MessageToString(cfg)


def parse_pbtxt(text: str) -> mc.ModelConfig:
    return text_format.Parse(text, mc.ModelConfig())


def warmup_image() -> bytes:
    """A small real JPEG for warm-up requests (decoders reject synthetic zeros)."""
    from PIL import Image

    return images.encode(Image.new("RGB", (64, 48), (120, 90, 60)), "JPEG", quality=90)


def _write(path: str, data: bytes | str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_atomic(path, data)


def write_configs(root: str, serving: ServingConfig) -> list[str]:
    """Write config.pbtxt files (and the files they reference that are not artifacts)."""
    written = []
    for cfg in configs(serving):
        folder = os.path.join(root, cfg.name)
        _write(os.path.join(folder, "config.pbtxt"), to_pbtxt(cfg))
        written.append(os.path.join(folder, "config.pbtxt"))
        if cfg.model_warmup and cfg.name == spec.PREPROCESS_MODEL:
            _write(os.path.join(folder, "warmup", WARMUP_FILE), warmup_image())
        if cfg.name == spec.CHECK_MODEL:  # self-contained: the serving image has no sscd_triton
            from sscd_triton.serving import check_step

            _write(os.path.join(folder, "1", check_step.FILENAME), check_step.model_py_source())
        elif cfg.backend == "python":
            module = "triton_preprocess" if cfg.name == spec.PREPROCESS_MODEL else "triton_descriptor"
            _write(os.path.join(folder, "1", "model.py"), PYTHON_SHIM.format(module=module))
        if cfg.name == spec.ENSEMBLE_NAME and serving.target == "gpu":
            _write(os.path.join(folder, SERVER_ARGS), server_args_text(serving))
            written.append(os.path.join(folder, SERVER_ARGS))
        _write(os.path.join(folder, "1", ".gitkeep"), "")  # Triton needs the version folder
        if cfg.name == spec.DESCRIPTOR_MODEL:
            recipe = os.path.join(folder, PLAN_RECIPE)
            if builds_plan(serving):
                _write(recipe, recipe_text(serving))
                written.append(recipe)
            elif os.path.exists(recipe):
                os.remove(recipe)  # a stale recipe would make build_plan.sh build over --plan
    return written


def builds_plan(serving: ServingConfig) -> bool:
    """Whether the serving container builds this repository's plan at start."""
    return serving.target == "gpu" and serving.descriptor == "tensorrt" and not serving.prebuilt_plan


def place_artifact(root: str, model: str, source: str, name: str) -> str:
    """Copy an exported file into `root/model/1/name` atomically."""
    dest = os.path.join(root, model, "1", name)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    return copy_atomic(source, dest)
