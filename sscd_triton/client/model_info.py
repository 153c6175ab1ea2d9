"""What the served model is, asked of the server before any image is sent.

`describe(endpoints, model, headers)` returns the model's facts as a dict: `dims` (the
descriptor length), `max_batch`, `input` (name) and `input_dims`, the served `version`,
the identity the repository writes into its configs (`sscd_model`, `weights_sha256`,
`preprocess`, `precision`; None where the server does not say) and how its
preprocessing batches (`resampled`, `batch_mates`). A server that is not there fails
fast (GiveUp after `START_TIMEOUT` seconds); `http_hint` adds why when the address is
Triton's HTTP port.
"""
from __future__ import annotations

import asyncio
import socket

from tritonclient.utils import InferenceServerException

from sscd_triton import spec
from sscd_triton.client import transport
from sscd_triton.client.exceptions import UsageError

DEFAULT_BATCH = spec.CLIENT_BATCH  # the gpu repository is sized for it (serving/repository.py)
# A server that is not there at start fails the run this fast (a wrong address).
START_TIMEOUT = 5.0


async def describe(endpoints: transport.Endpoints, model: str, headers: dict | None,
                   start_timeout: float = START_TIMEOUT) -> dict:
    """The served model's facts from the first server that answers: dims, max batch,
    input name, preprocessing preset and identity, as far as the server tells them.

    A server that is not there (refused, unknown host, not gRPC, silent) is GiveUp after
    `start_timeout` seconds, naming each address and why: only servers lost mid-run get
    the patient --give-up-after. One that answers, even "not ready", gets that budget."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + min(start_timeout, endpoints.give_up_after)
    heard = False
    # Endpoint notes wait until a server is heard: a failed start is the one error line.
    held: list[str] = []
    say, endpoints.on_change = endpoints.on_change, held.append

    def left() -> float | None:
        if heard:
            return None
        if loop.time() >= deadline:
            raise transport.NoAnswer(not_there(endpoints, start_timeout))
        return deadline - loop.time()

    def hear() -> None:
        nonlocal heard
        heard, endpoints.on_change = True, say
        for message in held:
            say(message)
        held.clear()

    try:
        return await _first_facts(endpoints, model, headers, left, hear)
    finally:
        endpoints.on_change = say


async def _first_facts(endpoints, model, headers, left, hear) -> dict:
    """describe's loop: `left()` is the time left to hear a server (None once one was
    heard; raises GiveUp when it is over), `hear()` says one was."""
    while True:
        try:
            ep = await asyncio.wait_for(endpoints.pick(), left())
        except TimeoutError:
            left()  # raises GiveUp
            continue
        try:
            info = await asyncio.wait_for(_model_facts(ep.client, model, headers), left())
        except transport.Fatal:
            hear()
            await endpoints.report(ep, True)
            raise
        except TimeoutError:
            await endpoints.report(ep, False, TimeoutError("no answer"))
            continue
        except (InferenceServerException, OSError) as e:
            if transport.classify(e) == transport.RESTRICTED:
                hear()
                await endpoints.report(ep, True)
                raise transport.restricted(ep.url, e) from None
            if transport.answered(e):
                hear()
            await endpoints.report(ep, False, e)
            continue
        except BaseException:
            endpoints.release(ep)
            raise
        hear()
        await endpoints.report(ep, True)
        return info


def not_there(endpoints: transport.Endpoints, seconds: float) -> str:
    """Why no server could be reached at start, in one line."""
    return f"no server within {seconds:g}s: " + "; ".join(
        f"{e.url} ({e.last_error or 'no answer'})" for e in endpoints.all)


def _parameter(config: dict, key: str) -> str | None:
    value = (config.get("parameters") or {}).get(key) or {}
    return value.get("string_value") or None


async def _model_facts(client, model: str, headers: dict | None) -> dict:
    """Shapes from the model's config (or, when the model-config API is restricted, its
    metadata); identity from the `spec.PARAM_*` parameters the repository writes into
    the configs (None where absent: an older repository, or a restricted API) and the
    served version from the metadata."""
    cfg = None
    try:
        cfg = (await client.get_model_config(model, headers=headers, as_json=True,
                                             client_timeout=10))["config"]
    except Exception as e:  # noqa: BLE001
        # "Request for unknown model: 'x' is not found" is final (a restarting server says
        # "has no available versions" instead, which is retried).
        if transport.status_name(e) == "NOT_FOUND" and "is not found" in str(e):
            raise transport.Fatal(f"the server does not serve model {model!r} "
                                  f"({transport.clean_message(e)})") from None
        if transport.classify(e) == transport.RETRY:
            raise
    md = await client.get_model_metadata(model, headers=headers, as_json=True, client_timeout=10)
    versions = sorted(md.get("versions") or [], key=lambda v: (len(v), v))
    if cfg is not None:
        first = cfg["input"][0]
        info = {"dims": int(cfg["output"][0]["dims"][-1]),
                "max_batch": int(cfg.get("max_batch_size", 0)),
                "input": first["name"], "input_dims": [int(d) for d in first["dims"]]}
    else:  # the model-config API may be restricted: the metadata still gives the shapes
        first = md["inputs"][0]
        info = {"dims": int(md["outputs"][0]["shape"][-1]), "max_batch": 0,
                "input": first["name"], "input_dims": [int(d) for d in first["shape"][1:]]}
    cfg = cfg or {}
    info["version"] = versions[-1] if versions else None
    info["sscd_model"] = _parameter(cfg, spec.PARAM_MODEL_NAME)
    info["weights_sha256"] = _parameter(cfg, spec.PARAM_WEIGHTS_SHA256)
    info["preprocess"] = _parameter(cfg, spec.PARAM_PREPROCESS)
    info["precision"] = _parameter(cfg, spec.PARAM_PRECISION)
    # DALI (the gpu target) decodes and resizes otherwise than PIL: --check-parity then
    # applies the resampled-pipeline bounds (sscd_triton/spec.py).
    # A DALI model behind a dynamic batcher fails other requests' images with a corrupt
    # one: the client then isolates through its one-at-a-time lane (client/transport.py).
    # Assumed when the config cannot be read; this project's gpu repository has none.
    info["resampled"], info["batch_mates"] = False, True
    try:
        pre = (await client.get_model_config(spec.PREPROCESS_MODEL, headers=headers,
                                             as_json=True, client_timeout=10))["config"]
        info["preprocess"] = info["preprocess"] or _parameter(pre, spec.PARAM_PREPROCESS)
        info["resampled"] = pre.get("backend") == "dali"
        info["batch_mates"] = info["resampled"] and "dynamic_batching" in pre
    except Exception:  # noqa: BLE001  (not this repository's layout, or API restricted)
        pass
    return info


def resolve_preprocess(info: dict, model: str, preprocess_mode: str | None = None,
                       client_side: bool = False) -> spec.Preprocess:
    """The preprocessing preset to use with the served `model` (`info` from `describe`):
    `preprocess_mode` when given and the server agrees, else the one the server reports,
    else spec.DEFAULT_PREPROCESS. UsageError when they disagree, or when `client_side`
    tensors of that preset do not fit the model's fixed input."""
    served = info.get("preprocess")
    if preprocess_mode and served in spec.PREPROCESS and served != preprocess_mode:
        raise UsageError(f"--preprocess-mode {preprocess_mode}, but the server preprocesses "
                         f"with {served}: descriptors would not match; drop the flag or use "
                         f"{served}")
    mode = spec.PREPROCESS[preprocess_mode or (served if served in spec.PREPROCESS else
                                               spec.DEFAULT_PREPROCESS)]
    dims = info.get("input_dims") or []
    if client_side and len(dims) == 3 and dims[1] > 0 and (
            not mode.square or dims[1] != mode.size):
        raise UsageError(f"model {model} takes fixed {dims[1]}x{dims[2]} tensors; "
                         f"--preprocess-mode {mode.name} does not make those")
    return mode


def batch_size(info: dict, requested: int | None, log=None) -> int:
    """Images per request: `requested` (else spec.CLIENT_BATCH, which the gpu repository
    is sized for), capped at the model's max_batch_size (said through `log` when the cap
    applies to a requested size)."""
    batch = requested or DEFAULT_BATCH
    if info["max_batch"] and batch > info["max_batch"]:
        if requested and log is not None:
            log(f"--batch-size {batch} capped at the model's max_batch_size {info['max_batch']}")
        batch = info["max_batch"]
    return batch


def default_model(client_side: bool) -> str:
    """The model to call: the ensemble (file bytes in), or the descriptor model when the
    client preprocesses and sends float32 tensors."""
    return spec.DESCRIPTOR_MODEL if client_side else spec.ENSEMBLE_NAME


HTTP_HINT = "{url} looks like Triton's HTTP port; gRPC is usually 8001"
_HTTP_SIGNS = ("socket closed", "http/1", "http1", "protocol error")
_speaks_http: dict[str, bool] = {}


def speaks_http(url: str, timeout: float = 0.5) -> bool:
    """Whether HOST:PORT answers a plain HTTP/1 request (asked once per URL)."""
    if url not in _speaks_http:
        host, port = url.rsplit(":", 1)
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout) as sock:
                sock.settimeout(timeout)
                sock.sendall(b"GET /v2/health/live HTTP/1.0\r\nHost: x\r\n\r\n")
                _speaks_http[url] = sock.recv(5) == b"HTTP/"
        except (OSError, ValueError):
            _speaks_http[url] = False
    return _speaks_http[url]


def http_hint(message: str, urls: list[str]) -> str:
    """`message` (about failed requests), plus a hint for a URL named in it that fails the
    way gRPC fails against an HTTP/1 server and that does answer HTTP."""
    if not any(sign in message.lower() for sign in _HTTP_SIGNS):
        return message
    named = [u for u in urls if u in message and speaks_http(u)]
    return message + "".join(f"; {HTTP_HINT.format(url=u)}" for u in named)
