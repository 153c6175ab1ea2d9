"""The completeness check (images.check_complete) on every path: the function itself, the
gpu repository's generated check step (imported alone, and served by a real tritonserver's
python backend), and the client's early refusal. The cpu server's refusals are in
tests/test_repository.py (HOSTILE: truncated and padded-truncated files)."""
from __future__ import annotations

import subprocess
import sys
import types

import numpy as np
import pytest

from sscd_triton import images, samples, spec
from sscd_triton.serving import check_step, repository


def _photo(i=0):
    return samples.photographs()[i][1]


def _files() -> dict[str, bytes]:
    img = _photo(3)
    return {"jpeg": images.encode(img, "JPEG"), "progressive jpeg": images.encode(img, "JPEG", progressive=True),
            "png": images.encode(img, "PNG"), "webp": images.encode(img, "WEBP"),
            "lossless webp": images.encode(img, "WEBP", lossless=True), "bmp": images.encode(img, "BMP")}


def _cuts(data: bytes):
    """(label, bytes) of `data` cut at 10%, 50%, 90% and one byte short, alone and
    zero-padded past its full length (what a request row of a longer file holds)."""
    for frac in (0.1, 0.5, 0.9, None):
        n = len(data) - 1 if frac is None else int(len(data) * frac)
        yield f"cut to {n}", data[:n]
        yield f"cut to {n}, zero-padded", data[:n] + b"\0" * (len(data) - n + 64)


# A cut then zero-padded WebP or BMP cannot be told from a whole file whose data ends in
# zeros (images._check_webp/_check_bmp docstrings): only the unpadded cut is refused.
PADDED_UNKNOWABLE = ("webp", "lossless webp", "bmp")


def _refused(check, data) -> str | None:
    try:
        check(data)
    except ValueError as e:
        return str(e)
    return None


@pytest.mark.parametrize("kind", list(_files()))
def test_whole_files_pass_and_cut_ones_are_refused_with_a_reason(kind):
    data = _files()[kind]
    images.check_complete(data)
    images.check_complete(data + b"\0" * 1000)  # the request convention
    images.check_complete(data, images.GPU_FORMATS)
    for label, cut in _cuts(data):
        why = _refused(images.check_complete, cut)
        if kind in PADDED_UNKNOWABLE and "padded" in label:
            assert why is None  # the documented limit: zeros read as image data, nothing else
        else:
            assert why and "truncated" in why, (kind, label, why)


def test_the_package_exposes_the_check():
    import sscd_triton

    assert sscd_triton.check_complete is images.check_complete
    with pytest.raises(ValueError, match="^truncated PNG"):
        sscd_triton.check_complete(_files()["png"][:-5])


def test_jpeg_with_data_after_its_end_passes():
    """Motion photos carry a video after the JPEG's EOI; decoders stop at EOI."""
    data = _files()["jpeg"]
    images.check_complete(data + b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 40)
    with pytest.raises(images.ImageError, match="truncated JPEG: no end-of-image"):
        images.check_complete(data[:-2] + b"\0" * 10 + b"ftypmp42" + b"\x01" * 100)


def test_other_refusals_name_the_reason():
    def why(data, formats=images.FORMATS):
        with pytest.raises(ValueError) as e:
            images.check_complete(data, formats)
        return str(e.value)

    assert why(b"").startswith("empty input") and why(b"\0" * 50).startswith("empty input")
    assert why(b"<html>404</html>").startswith("not an image: ")
    assert why(images.encode(_photo(), "GIF"), images.GPU_FORMATS) == (
        "GIF is not accepted here (accepted: JPEG, PNG, WEBP, BMP)")
    assert why(images.encode(_photo(), "TIFF"), images.GPU_FORMATS).startswith("TIFF is not")
    images.check_complete(images.encode(_photo(), "GIF"))  # the cpu decoder judges these
    images.check_complete(images.encode(_photo(), "TIFF"))
    assert why(b"\xff\xd8\xff\xe0\x00\x10JFIF").startswith("truncated JPEG: a segment")
    png = _files()["png"]
    assert why(png[:8] + png[8:12] + b"XXXX" + png[16:]) == "corrupt PNG: its first chunk is not IHDR"
    # the decoder behind the check sees the same reason (cpu preprocessing calls decode)
    with pytest.raises(images.ImageError, match="truncated PNG: no IEND"):
        images.decode(png[: len(png) // 2] + b"\0" * 100)


# --- the gpu repository's generated step ----------------------------------------------
@pytest.fixture(scope="module")
def gpu_repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_repo")
    repository.write_configs(str(root), repository.ServingConfig(target="gpu"))
    return root


def test_generated_step_is_the_function_the_cpu_path_and_client_run(gpu_repo):
    path = gpu_repo / spec.CHECK_MODEL / "1" / check_step.FILENAME
    assert path.read_text() == check_step.model_py_source()
    import inspect

    module = check_step.load_model_py(path)
    for name in images.CHECK_SOURCE:  # character for character
        obj = getattr(images, name)
        if inspect.isfunction(obj):
            assert inspect.getsource(getattr(module, name)) == inspect.getsource(obj), name
    assert module.GPU_FORMATS == images.GPU_FORMATS and module.BAD_ROW == spec.BAD_ROW


def test_generated_step_stands_alone_and_refuses_cut_files(gpu_repo):
    """Run in a fresh interpreter without this project on its path (`-I`, another cwd), as
    the NGC image's python backend runs it: cut files of every kind, padded or not."""
    path = gpu_repo / spec.CHECK_MODEL / "1" / check_step.FILENAME
    cases = {}
    for kind, data in _files().items():
        cases[f"{kind} whole padded"] = data + b"\0" * 100
        for label, cut in _cuts(data):
            if "padded" not in label or kind not in PADDED_UNKNOWABLE:
                cases[f"{kind} {label}"] = cut
    script = (
        "import importlib.util, pickle, sys\n"
        f"s = importlib.util.spec_from_file_location('m', {str(path)!r})\n"
        "m = importlib.util.module_from_spec(s); s.loader.exec_module(m)\n"
        "cases = pickle.load(sys.stdin.buffer)\n"
        "out = {}\n"
        "for k, v in cases.items():\n"
        "    try:\n"
        "        m.check_complete(v, m.GPU_FORMATS); out[k] = None\n"
        "    except ValueError as e:\n"
        "        out[k] = str(e)\n"
        "out['__sscd_imported__'] = [n for n in sys.modules if n.startswith('sscd_triton')]\n"
        "sys.stdout.buffer.write(pickle.dumps(out))\n")
    import pickle

    r = subprocess.run([sys.executable, "-I", "-c", script], input=pickle.dumps(cases),
                       capture_output=True, cwd="/", check=True)
    out = pickle.loads(r.stdout)
    assert out.pop("__sscd_imported__") == []
    for name, why in out.items():
        if "whole" in name:
            assert why is None, (name, why)
        else:
            assert why and "truncated" in why, (name, why)
            assert why == _refused(images.check_complete, cases[name])  # same reason


class _FakePbUtils(types.ModuleType):
    """triton_python_backend_utils as the python backend's stub gives it (python_backend
    src/resources/triton_python_backend_utils.py and pb_stub.cc): `Tensor(name, array)`,
    `InferenceResponse(output_tensors=..., error=...)`, `TritonError(message, code)` with
    code constants, `get_input_tensor_by_name(request, name)` with `.as_numpy()`."""

    def __init__(self):
        super().__init__("triton_python_backend_utils")

        class Tensor:
            def __init__(self, name, array):
                self.name, self.array = name, array

            def as_numpy(self):
                return self.array

        class TritonError(Exception):
            UNKNOWN, INTERNAL, NOT_FOUND, INVALID_ARG = 0, 1, 2, 3

            def __init__(self, message, code=1):
                self.msg, self.code = message, code

            def message(self):
                return self.msg

        class InferenceResponse:
            def __init__(self, output_tensors=(), error=None):
                self.output_tensors, self.error = list(output_tensors), error

        self.Tensor, self.TritonError, self.InferenceResponse = Tensor, TritonError, InferenceResponse
        self.get_input_tensor_by_name = lambda request, name: request[name]


def test_generated_step_answers_each_request_alone(gpu_repo, monkeypatch):
    pb = _FakePbUtils()
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    module = check_step.load_model_py(gpu_repo / spec.CHECK_MODEL / "1" / check_step.FILENAME)
    model = module.TritonPythonModel()
    model.initialize({})
    files = _files()
    good = images.pack_rows([files["jpeg"], files["png"]])
    cut = images.pack_rows([files["webp"], files["jpeg"][:5000], files["png"]])
    gif = images.pack_rows([images.encode(_photo(), "GIF")])
    got = model.execute([{spec.ENSEMBLE_INPUT: pb.Tensor(spec.ENSEMBLE_INPUT, a)}
                         for a in (good, cut, gif)])
    assert len(got) == 3 and got[0].error is None
    (out,) = got[0].output_tensors
    assert out.name == spec.CHECKED_NAME and np.array_equal(out.as_numpy(), good)
    assert got[1].error.code == pb.TritonError.INVALID_ARG
    assert got[1].error.message().startswith(
        "bad image: item 1 of the request: truncated JPEG: no end-of-image marker")
    assert got[2].error.message().startswith("bad image: GIF is not accepted here")


def test_generated_step_on_a_real_tritonserver(gpu_repo, tmp_path):
    """The gpu repository's sscd_check folder, as generated, loaded by tritonserver's python
    backend (no GPU needed: KIND_CPU): cut files get INVALID_ARGUMENT naming the row, whole
    files pass through byte for byte. The client's isolation keys on exactly this."""
    import shutil

    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from sscd_triton.client import errors
    from sscd_triton.serving.server import TritonServer

    shutil.copytree(gpu_repo / spec.CHECK_MODEL, tmp_path / spec.CHECK_MODEL)
    files = _files()
    tiny = images.encode(_photo().resize((8, 8)), "PNG")

    def infer(client, rows):
        arr = images.pack_rows(rows)
        inp = grpcclient.InferInput(spec.ENSEMBLE_INPUT, list(arr.shape), "UINT8")
        inp.set_data_from_numpy(arr)
        return arr, client.infer(spec.CHECK_MODEL, [inp]).as_numpy(spec.CHECKED_NAME)

    with TritonServer(str(tmp_path)) as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        sent, back = infer(client, [files["jpeg"], files["png"], files["webp"]])
        assert np.array_equal(sent, back)
        for kind in ("jpeg", "png", "webp"):
            for label, cut in _cuts(files[kind]):
                if "padded" in label and kind in PADDED_UNKNOWABLE:
                    continue
                with pytest.raises(InferenceServerException) as e:  # row 0: a tiny whole PNG
                    infer(client, [tiny, cut])
                assert "INVALID_ARGUMENT" in str(e.value.status()), (kind, label)
                assert e.value.message().startswith("bad image: item 1 of the request: truncated"), (
                    kind, label, e.value.message())
                assert errors.classify(e.value) == errors.REJECT
                assert errors.split(["a", "b"], e.value.message()) == [["a"], ["b"]]
        client.close()


def test_client_refuses_cut_files_before_sending(tmp_path):
    from sscd_triton.client import pipeline

    data = _files()["png"]
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "whole.png").write_bytes(data)
    opts = pipeline.Options()
    why = pipeline.load_item(str(tmp_path / "cut.png"), None, opts)
    assert why == "not a usable image: " + _refused(images.check_complete, data[: len(data) // 2])
    item = pipeline.load_item(str(tmp_path / "whole.png"), None, opts)
    assert not isinstance(item, str) and not item.alone
