"""Build a complete Triton model repository for SSCD: the library behind
`export/build_repository.py` (sscd_triton.cli.build_repository only parses arguments,
maps errors to exit statuses and prints).

    from sscd_triton.serving.build import build_repository
    built = build_repository("runs/model_repository", "cpu", "sscd_disc_mixup.classy.pt")
    built.passed, built.written, built.serving.weights_sha256

gpu: DALI preprocessing (`sscd_preprocess/1/dali.py`, autoserialized by the server's DALI)
+ the descriptor ONNX (fp16 by default) with a plan build recipe: the serving container
builds `sscd_descriptor/1/model.plan` from them at start (docker/build_plan.sh).
cpu: python-backend preprocessing (PIL) + the same ONNX on ONNX Runtime.
`postprocess=PARAMS.npz` (from `sscd-postprocess fit`) appends centering or PCA whitening
to the served ONNX (serving.postprocess_graph): the server returns postprocessed
descriptors of the params' width, and the weights fingerprint (the served ONNX's sha256)
changes with them.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shlex
import sys
from dataclasses import dataclass, field

import numpy as np

from sscd_triton import spec
from sscd_triton.files import OutputError, check_writable, copy_atomic, write_atomic
from sscd_triton.report import Report
from sscd_triton.serving import repository
from sscd_triton.serving.repository import ServingConfig

DEMO_MODEL_NAME = spec.DEMO_MODEL_NAME
REPORT_FILE = "build_report.json"
# What a checkpoint's file name ends with besides the model's name (stripped for the
# model name recorded in the configs).
_SUFFIXES = (".classy.pt", ".torchvision.pt", ".torchscript.pt", ".pth", ".pt", ".ckpt", ".onnx")
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class BuildError(ValueError):
    """Bad input to a build (arguments, checkpoint, ONNX, output): one line saying why."""


@dataclass
class Built:
    """What `build_repository` wrote."""

    output: str
    serving: ServingConfig  # what the configs were generated from (identity included)
    written: list[str] = field(default_factory=list)  # config.pbtxt files and recipe
    report: Report | None = None  # log and parity checks; None with configs_only
    onnx: str | None = None  # the served descriptor ONNX
    precision: str | None = None  # of that ONNX
    postprocess: dict | None = None  # the appended postprocessing's record, if any

    @property
    def passed(self) -> bool:
        """Every parity check passed (True when none ran)."""
        return self.report is None or self.report.passed


# --- model identity ----------------------------------------------------------------------
def model_name(source: str | None) -> str:
    """The name recorded as spec.PARAM_MODEL_NAME: the published model a file is named
    after, else its base name without the layout suffix; the demo label without a file."""
    if source is None:
        return DEMO_MODEL_NAME
    published = spec.published_model(source)
    if published:
        return published.name
    base = os.path.basename(source)
    for suffix in _SUFFIXES:
        if base.endswith(suffix) and len(base) > len(suffix):
            return base[: -len(suffix)]
    return base


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --- checks of given artifacts -----------------------------------------------------------
def plan_problems(plan: str, max_batch: int, preprocess: spec.Preprocess) -> list[str]:
    """What contradicts serving `plan` here, read from the report build_tensorrt.py wrote
    beside it (a plan file itself cannot be read without TensorRT and a GPU)."""
    report_path = plan + ".parity.json"
    try:
        with open(report_path) as f:
            report = json.load(f)
        lo, _, hi = report["profile"]
    except (OSError, ValueError, KeyError):
        return [f"--plan {plan}: no readable {os.path.basename(report_path)} beside it; build "
                "plans with export/build_tensorrt.py, which records the profile to check"]
    problems = []
    if not report.get("passed", False):
        problems.append(f"--plan {plan}: its parity report says a check failed ({report_path})")
    if lo[0] > 1:  # the config warms the model up at batch 1
        problems.append(f"the plan's profile starts at batch {lo[0]}; the repository sends "
                        "batches from 1: rebuild it with --min-batch 1")
    if hi[0] < max_batch:
        problems.append(f"--max-batch {max_batch} exceeds the plan's profile (batch <= {hi[0]}); "
                        f"pass --max-batch {hi[0]} or rebuild the plan")
    # The tensors this repository sends: the same range its own plan recipe would cover.
    want_lo, _, want_hi = repository.ServingConfig(preprocess=preprocess.name).profile()
    if not (lo[2] <= want_lo[2] and lo[3] <= want_lo[3]
            and hi[2] >= want_hi[2] and hi[3] >= want_hi[3]):
        problems.append(f"the plan's profile ({lo[2]}x{lo[3]}..{hi[2]}x{hi[3]}) does not take "
                        f"{preprocess.name}'s {want_lo[2]}x{want_lo[3]}..{want_hi[2]}x{want_hi[3]} "
                        "tensors")
    return problems


@dataclass(frozen=True)
class OnnxFacts:
    dims: int
    precision: str  # onnx_graph.onnx_precision: "int8" (Q/DQ), "fp16" or "fp32"
    static_size: int | None  # H = W fixed at export, or None when dynamic
    int8_problems: list[str]  # why TensorRT cannot build its Q/DQ (the cpu form of int8)


def inspect_onnx(path: str, dims: int | None, preprocess: spec.Preprocess) -> OnnxFacts:
    """Check that `path` is a descriptor ONNX this repository can serve: spec's input and
    output names and types, [N, 3, H, W] -> [N, dims] (`dims` when known), and H, W that
    `preprocess` can feed. Raises BuildError naming the first contradiction."""
    import onnx

    name = f"--onnx {path}"
    if not os.path.isfile(path):
        raise BuildError(f"{name}: no such file")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as e:  # noqa: BLE001  protobuf raises several kinds
        raise BuildError(f"{name}: not an ONNX model ({str(e).strip()[:160] or type(e).__name__})") from None
    try:  # the exporter leaves the width symbolic ("Divdescriptors_dim_1"); inference fixes it
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001  then the declared shapes are all there is
        pass
    graph = model.graph
    weights = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in weights]
    if [i.name for i in inputs] != [spec.INPUT_NAME] or \
            [o.name for o in graph.output] != [spec.OUTPUT_NAME]:
        raise BuildError(f"{name}: inputs {[i.name for i in inputs]} and outputs "
                         f"{[o.name for o in graph.output]}; the served model needs "
                         f"['{spec.INPUT_NAME}'] -> ['{spec.OUTPUT_NAME}'] (export it with "
                         "export/export_onnx.py)")

    def shape(value) -> list:
        return [d.dim_value if d.HasField("dim_value") else None
                for d in value.type.tensor_type.shape.dim]

    float32 = onnx.TensorProto.FLOAT
    x, y = shape(inputs[0]), shape(graph.output[0])
    if inputs[0].type.tensor_type.elem_type != float32 or len(x) != 4 or x[1] != spec.CHANNELS:
        raise BuildError(f"{name}: input '{spec.INPUT_NAME}' is not float32 [N, 3, H, W]")
    if graph.output[0].type.tensor_type.elem_type != float32 or len(y) != 2 or not y[1]:
        raise BuildError(f"{name}: output '{spec.OUTPUT_NAME}' is not float32 [N, dims] "
                         "with a fixed descriptor width")
    if dims is not None and y[1] != dims:
        raise BuildError(f"{name} gives {y[1]}-d descriptors, the checkpoint (or --dims) {dims}-d")
    height, width = x[2], x[3]
    static = height if height and height == width else None
    if (height or width) and not static:
        raise BuildError(f"{name}: fixed input {height}x{width}; serving takes square or "
                         "fully dynamic H and W")
    if static and not preprocess.square:
        raise BuildError(f"{name}: fixed {static}x{static} input, but {preprocess.name} keeps the "
                         "aspect ratio (export it without --static-size)")
    if static and static != preprocess.size:
        raise BuildError(f"{name}: fixed {static}x{static} input, {preprocess.name} gives "
                         f"{preprocess.size}x{preprocess.size}")
    from sscd_triton.export import onnx_graph

    return OnnxFacts(int(y[1]), onnx_graph.onnx_precision(model), static,
                     onnx_graph.int8_problems(model))


# --- the build ---------------------------------------------------------------------------
def _check_arguments(target, descriptor, preprocess, max_batch, max_pixels, plan, onnx,
                     configs_only, postprocess=None, precision=None) -> None:
    if target not in repository.TARGETS:
        raise BuildError(f"target {target!r}: one of {', '.join(repository.TARGETS)}")
    if descriptor not in repository.DESCRIPTORS:
        raise BuildError(f"--descriptor {descriptor}: one of {', '.join(repository.DESCRIPTORS)}")
    if precision is not None and precision not in spec.PRECISIONS:
        raise BuildError(f"--precision {precision}: one of {', '.join(spec.PRECISIONS)}")
    if precision == "int8" and target == "gpu" and descriptor == "onnxruntime":
        # onnxruntime's TensorRT EP needs its own int8 switch (trt_int8_enable), which maps
        # onto the implicit-int8 builder flag TensorRT 11 removed.
        raise BuildError("--precision int8 on the gpu target is served by the tensorrt "
                         "backend (an explicitly quantised plan); drop --descriptor onnxruntime")
    if preprocess not in spec.PREPROCESS:
        raise BuildError(f"--preprocess {preprocess}: one of {', '.join(sorted(spec.PREPROCESS))}")
    if max_batch < 1:
        raise BuildError(f"--max-batch {max_batch}: must be >= 1")
    if max_pixels < 1:
        raise BuildError(f"--max-pixels {max_pixels}: must be >= 1")
    if plan and target != "gpu":
        raise BuildError("--plan is for --target gpu; the cpu target serves ONNX")
    if plan and descriptor != "tensorrt":
        raise BuildError("--plan is served by the tensorrt backend; drop --descriptor onnxruntime")
    if plan and not os.path.isfile(plan):
        raise BuildError(f"--plan {plan}: no such file")
    if onnx and configs_only:
        raise BuildError("--onnx with --configs-only: configs-only writes no model files")
    if postprocess and configs_only:
        raise BuildError("--postprocess with --configs-only: configs-only writes no model files")
    if postprocess and plan:
        raise BuildError("--postprocess with --plan: a given plan cannot take the "
                         "postprocessing; let the container build the plan from the ONNX")
    if plan:
        problems = plan_problems(plan, max_batch, spec.PREPROCESS[preprocess])
        if problems:
            raise BuildError("; ".join(problems))


def _steps(target: str, checkpoint: bool, onnx: bool, postprocess: bool = False,
           int8: bool = False) -> int:
    model = 1 if checkpoint else 0
    # copy (+ validation), or export + validation (int8: calibration + export + measures)
    artifact = (1 + model) if onnx else 3 if int8 else 2
    return model + artifact + (1 if target == "gpu" else 0) + 1 + (1 if postprocess else 0)


def new_report(target: str, *, checkpoint: bool = True, onnx: bool = False,
               postprocess: bool = False, int8: bool = False, stream=None) -> Report:
    """The report `build_repository` logs to (the CLI passes one printing to stdout)."""
    return Report(f"sscd-triton repository: checkpoint -> Triton model repository ({target})",
                  _steps(target, checkpoint, onnx, postprocess, int8), stream=stream)


def _load_postprocess(path: str):
    from sscd_triton.copydetect import postprocess as pp

    try:
        return pp.load_params(path)
    except pp.PostprocessError as e:
        raise BuildError(f"--postprocess {e}") from None


def _append_postprocess(onnx_path: str, params, pre: spec.Preprocess, report: Report) -> None:
    """Append `params` to the served ONNX, then check on photographs that the served graph
    gives what the client-side transform gives on the raw graph's descriptors."""
    import onnx as onnx_lib

    from sscd_triton import images, runtime, samples
    from sscd_triton.report import Check
    from sscd_triton.serving import postprocess_graph

    raw = onnx_lib.load(onnx_path)
    try:
        served = postprocess_graph.append(raw, params)
    except postprocess_graph.GraphError as e:
        raise BuildError(f"--postprocess: {e}") from None
    raw_bytes = raw.SerializeToString()
    write_atomic(onnx_path, served.SerializeToString())
    report.log(f"appended {params.describe()} to {onnx_path}: the server returns "
               f"{params.dims_out}-d postprocessed descriptors",
               postprocess=params.record())
    run_raw = runtime.onnx_runner(runtime.onnx_session(raw_bytes))
    run_served = runtime.onnx_runner(runtime.onnx_session(onnx_path))
    worst = 0.0
    for _, img in samples.photographs()[:2]:
        x = images.to_tensor(img, pre)[None]
        worst = max(worst, float(np.abs(run_served(x) - params(run_raw(x))).max()))
    report.add([Check("postprocess: served graph vs client-side apply", worst <= 1e-5,
                      f"max |diff| {worst:.2e} on 2 photographs", "<= 1e-5",
                      {"max_abs": worst})])


def _validate(loaded, onnx_path: str, precision: str, static: int | None, report: Report,
              pre: spec.Preprocess) -> None:
    """The ONNX's names, shapes and parity against the checkpoint's PyTorch model."""
    from sscd_triton import runtime
    from sscd_triton.export import onnx_export

    onnx_export.validate_onnx(runtime.onnx_session(onnx_path), loaded, precision, static, report,
                              pre)


def build_repository(output: str, target: str = "gpu", checkpoint: str | None = None, *,
                     onnx: str | None = None, plan: str | None = None,
                     precision: str | None = None, descriptor: str = "tensorrt",
                     preprocess: str = spec.DEFAULT_PREPROCESS, max_batch: int | None = None,
                     max_pixels: int = spec.MAX_IMAGE_PIXELS, dims: int | None = None,
                     configs_only: bool = False, postprocess: str | None = None,
                     calibration=None, calibration_method: str | None = None,
                     report: Report | None = None, stream=None) -> Built:
    """Write the Triton model repository `output` for `target` ("gpu" or "cpu").

    The descriptor ONNX is exported from `checkpoint` (None: the untrained demo weights),
    or `onnx`, an already exported one, is checked and copied (then parity is measured
    only when `checkpoint` is given too). `plan` (gpu): serve this TensorRT plan instead of
    building one at container start. `precision`: of the exported ONNX (default fp16 for
    the gpu TensorRT path, fp32 otherwise; "int8" needs `calibration`, an
    export.int8.Calibration made with this `preprocess`, and quantises in the target's Q/DQ
    form, `calibration_method` as export.int8.METHODS). `configs_only`: configs without model files,
    identity "unknown" (the committed model_repository/). `postprocess`: a params file of
    `sscd-postprocess fit`, appended to the served ONNX after the parity checks (which
    compare raw descriptors), with a check that the served graph equals the client-side
    transform; configs then give its width. Log lines and checks go to
    `report`, else a new one printing to `stream` (None: nowhere), in `Built.report`.

    Raises BuildError on bad input, before any model file or config is written; a failed
    parity bound is not an error: see `Built.passed`.
    """
    fast = target == "gpu" and descriptor == "tensorrt"
    if max_batch is None:
        max_batch = 64 if target == "gpu" else 16
    _check_arguments(target, descriptor, preprocess, max_batch, max_pixels, plan, onnx,
                     configs_only, postprocess, precision)
    if calibration is not None and precision != "int8":
        raise BuildError("--calibration is for --precision int8")
    if precision == "int8" and onnx is None and not configs_only:
        from sscd_triton.export import int8

        try:
            int8.check_method(calibration_method or int8.DEFAULT_METHOD,
                              spec.PREPROCESS[preprocess], None)
        except int8.CalibrationError as e:
            raise BuildError(str(e)) from None
    params = _load_postprocess(postprocess) if postprocess else None
    common = dict(target=target, preprocess=preprocess, max_batch=max_batch,
                  max_pixels=max_pixels, descriptor=descriptor, prebuilt_plan=bool(plan))
    if configs_only:
        serving = ServingConfig(dims=dims or 512, **common,
                                precision=precision or ("fp16" if fast else "fp32"),
                                model_name=model_name(checkpoint) if checkpoint else repository.UNKNOWN)
        return Built(output, serving, repository.write_configs(output, serving))

    pre = spec.PREPROCESS[preprocess]
    onnx_path = os.path.join(output, spec.DESCRIPTOR_MODEL, "1", repository.ONNX_FILE)
    try:
        os.makedirs(os.path.dirname(onnx_path), exist_ok=True)
        check_writable(onnx_path, "--output")
    except (OSError, OutputError) as e:
        raise BuildError(str(e)) from None

    from sscd_triton.export import checkpoints, demo

    loaded, source, facts = None, checkpoint, None
    if checkpoint is not None or onnx is None:
        source = checkpoint or demo.write_demo_checkpoint()
        try:
            loaded = checkpoints.load(source, dims)
        except checkpoints.CheckpointError as e:
            raise BuildError(str(e)) from None
    if onnx is not None:
        facts = inspect_onnx(onnx, loaded.dims if loaded else dims, pre)
        if precision and precision != facts.precision:
            raise BuildError(f"--precision {precision} contradicts --onnx {onnx}, which is "
                             f"{facts.precision}")
        if facts.precision == "int8" and target == "gpu" and not fast:
            raise BuildError(f"--onnx {onnx} is int8: on the gpu target it is served by the "
                             "tensorrt backend (an explicitly quantised plan); drop "
                             "--descriptor onnxruntime")
        if facts.int8_problems and fast:
            raise BuildError(f"--onnx {onnx} is the cpu form of int8 "
                             f"({', '.join(facts.int8_problems)}); TensorRT takes symmetric "
                             "int8 only: export it with --precision int8 --int8-target gpu")
    raw_dims = facts.dims if facts is not None else loaded.dims
    if params is not None and params.dims_in != raw_dims:
        raise BuildError(f"--postprocess {postprocess} takes {params.dims_in}-d descriptors; "
                         f"the model gives {raw_dims}-d")
    # Nothing contradicts the build from here on: the report starts.
    if report is None:
        report = new_report(target, checkpoint=loaded is not None, onnx=onnx is not None,
                            postprocess=params is not None, int8=precision == "int8",
                            stream=stream or io.StringIO())
    if loaded is not None:
        if checkpoint is None:
            report.note(f"no --checkpoint: using {demo.DEMO_LABEL}")
        report.log(f"loaded {source}: {loaded.layout} layout, {loaded.trunk}, {loaded.dims}-d",
                   checkpoint=source, dims=loaded.dims, target=target)
    if facts is not None:
        precision, static = facts.precision, facts.static_size
        copy_atomic(onnx, onnx_path)
        report.log(f"copied {facts.precision} ONNX ({facts.dims}-d, input "
                   f"{f'{static}x{static}' if static else 'H x W dynamic'}) {onnx} -> {onnx_path}",
                   onnx=onnx, precision=precision, static_size=static)
        if loaded is not None:
            _validate(loaded, onnx_path, precision, static, report, pre)
        served_dims = facts.dims
    else:
        from sscd_triton.export import onnx_export

        precision = precision or ("fp16" if fast else "fp32")
        if precision == "int8" and calibration is None:
            from sscd_triton.export import int8

            calibration = int8.bundled_calibration(pre)
        # Square preprocessing fixes the tensor shape: give engines a static H and W.
        static = pre.size if (target == "gpu" and pre.square) else None
        onnx_export.export(loaded, onnx_path, precision, static, report, calibration=calibration,
                           target=target, method=calibration_method, preprocess=pre)
        served_dims = loaded.dims
    if params is not None:
        _append_postprocess(onnx_path, params, pre, report)
        served_dims = params.dims_out

    identity = model_name(checkpoint if checkpoint is not None or onnx is None else onnx)
    serving = ServingConfig(dims=served_dims, model_name=identity, precision=precision,
                            weights_sha256=sha256_file(onnx_path), **common)
    if target == "gpu":
        from sscd_triton.serving import dali_pipeline

        dali = os.path.join(output, spec.PREPROCESS_MODEL, "1", "dali.py")
        os.makedirs(os.path.dirname(dali), exist_ok=True)
        dali_pipeline.write_dali_py(dali, pre, max_pixels, serving.hw_decoder_load)
        report.log(f"wrote DALI pipeline ({preprocess}, autoserialized by the server) -> {dali}")
        if plan:
            repository.place_artifact(output, spec.DESCRIPTOR_MODEL, plan, repository.PLAN_FILE)
            report.note(f"serving TensorRT plan {plan}")
        elif descriptor == "tensorrt":
            report.note("sscd_descriptor/1/model.plan is built at container start "
                        "(docker/build_plan.sh), on the serving GPU with the serving TensorRT")
    written = repository.write_configs(output, serving)
    report.log(f"wrote {len(written)} files (max batch {max_batch}, preprocess {preprocess}, "
               f"descriptor {descriptor if target == 'gpu' else 'python'} {precision}; model "
               f"{identity}, weights sha256 {serving.weights_sha256[:12]}...) under {output}",
               model=identity, weights_sha256=serving.weights_sha256)
    report_path = os.path.join(output, REPORT_FILE)
    if loaded is not None:
        report.write_json(report_path)
    elif os.path.exists(report_path):
        os.remove(report_path)  # a previous build's parity does not describe this ONNX
    return Built(output, serving, written, report, onnx_path, precision,
                 params.record() if params is not None else None)


# --- what to run next --------------------------------------------------------------------
def tritonserver_command(cwd: str | None = None) -> str:
    """How to start the local tritonserver from `cwd`: this project's `.venv/bin/tritonserver`
    (scripts/setup.sh installs it) when there is one, else `tritonserver` from PATH."""
    cwd = os.path.abspath(cwd or os.getcwd())
    for venv in (os.path.join(cwd, ".venv"), os.path.join(_ROOT, ".venv"), sys.prefix):
        exe = os.path.join(venv, "bin", "tritonserver")
        if os.path.isfile(exe) and os.access(exe, os.X_OK):
            rel = os.path.relpath(exe, cwd)
            return rel if not rel.startswith("..") else exe
    return "tritonserver"


def _ignored_folders(context: str) -> set[str]:
    """The top-level folders the build context's .dockerignore leaves out (runs, .venv...)."""
    try:
        with open(os.path.join(context, ".dockerignore")) as f:
            return {ln.strip().strip("/") for ln in f
                    if ln.strip() and not ln.startswith("#") and not set(ln.strip()) & set("*?![")}
    except OSError:
        return set()


def _docker_context_path(path: str, cwd: str) -> str:
    """`path` as the Dockerfile's COPY sees it from the build context `cwd`: where it lies
    inside and is not ignored, else weights/ (git-ignored *.pt), where it must be copied."""
    rel = os.path.relpath(os.path.abspath(path), cwd)
    if rel.startswith("..") or rel.split(os.sep, 1)[0] in _ignored_folders(cwd):
        return f"weights/{os.path.basename(path)}"
    return rel


def next_steps(built: Built, checkpoint: str | None = None, cwd: str | None = None) -> list[str]:
    """Commands that serve what was built, as a user can paste them (docs/export.md: "Model
    repository", "Production")."""
    cwd = os.path.abspath(cwd or os.getcwd())
    out = shlex.quote(built.output)
    serving = built.serving
    # what docker/entrypoint.sh passes: the flags the repository needs, then server.args's
    gpu_flags = " ".join(repository.gpu_server_flags(serving))
    if serving.target == "cpu":
        from sscd_triton.serving.server import HOST

        # tritonserver listens on every interface unless told otherwise
        return [f"{tritonserver_command(cwd)} --model-repository {out} --grpc-address {HOST} "
                f"--http-address {HOST} --metrics-address {HOST}"]
    if serving.prebuilt_plan:
        return [f"tritonserver {gpu_flags} --model-repository {out}   # in an NGC Triton container "
                "on the host whose TensorRT and GPU built the plan"]
    if built.postprocess is not None:
        # docker/Dockerfile's export stage builds from the checkpoint without --postprocess:
        # serve this repository as built.
        finish = f"docker/build_plan.sh {out} && " if repository.builds_plan(serving) else ""
        return [f"{finish}tritonserver {gpu_flags} --model-repository {out}   # in an NGC Triton "
                "container (the Dockerfile's own export does not take --postprocess)"]
    source = checkpoint or (built.report.facts.get("checkpoint") if built.report else None) \
        or "CHECKPOINT"
    arg = "" if serving.descriptor == "tensorrt" else " --build-arg DESCRIPTOR=onnxruntime"
    in_context = _docker_context_path(source, cwd)
    lines = [] if source == "CHECKPOINT" or in_context == os.path.relpath(
        os.path.abspath(source), cwd) else [
        f"mkdir -p weights && cp {shlex.quote(source)} {shlex.quote(in_context)}   "
        "# into the build context (outside it, or in a folder .dockerignore leaves out)"]
    lines += [f"docker build -f docker/Dockerfile --build-arg CHECKPOINT="
              f"{shlex.quote(in_context)}{arg} -t sscd-triton .   "
              "# on a GPU host; the image exports this repository from the checkpoint",
              "docker run --gpus all --shm-size 1g -p 8001:8001 -p 8002:8002 "
              "-e SSCD_ADMIN_KEY=change-me -v sscd-trt-cache:/var/cache/sscd sscd-triton"]
    if repository.builds_plan(serving):
        lines.append(f"# or, in an NGC Triton container: docker/build_plan.sh {out} && "
                     f"tritonserver {gpu_flags} --model-repository {out}")
    else:
        lines.append(f"# or, in an NGC Triton container: tritonserver {gpu_flags} "
                     f"--model-repository {out}")
    return lines
