"""Loading every published layout is exact, and bad files fail with one clear line."""
from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest
import torch

from conftest import key_dump, reference_model, to_classy
from sscd_triton.export import checkpoints

ROOT = __import__("os").path.dirname(__import__("os").path.dirname(__file__))


@pytest.mark.parametrize("trunk,dump", [
    ("resnet50", "keys-classy-resnet50-512.txt"),
    ("resnext101_32x4d", "keys-classy-resnext101_32x4d-1024.txt"),
])
def test_classy_names_and_shapes_match_the_published_files(trunk, dump):
    state = reference_model(trunk).state_dict()
    written = [(to_classy(k), tuple(v.shape)) for k, v in state.items()]
    assert written == key_dump(dump)


def test_torchvision_names_and_shapes_match_the_published_file():
    state = reference_model("resnet50").state_dict()
    assert [(k, tuple(v.shape)) for k, v in state.items()] == \
        key_dump("keys-torchvision-resnet50-512.txt")


@pytest.mark.parametrize("name,layout,trunk,dims", [
    ("torchvision", "torchvision", "resnet50", 512),
    ("classy", "classy", "resnet50", 512),
    ("classy_nbt", "classy", "resnet50", 512),
    ("torchscript", "torchscript", "resnet50", 512),
    ("classy_large", "classy", "resnext101_32x4d", 1024),
])
def test_layout_is_detected_and_loads_exactly(ckpts, name, layout, trunk, dims):
    paths, refs = ckpts
    loaded = checkpoints.load(paths[name])
    assert (loaded.layout, loaded.trunk, loaded.dims) == (layout, trunk, dims)
    x = torch.randn(2, 3, 96, 128, generator=torch.manual_seed(3))
    with torch.no_grad():
        diff = (loaded.model(x) - refs[name](x)).abs().max().item()
    assert diff == 0.0


def _fail(path, *args):
    r = subprocess.run([sys.executable, "export/export_onnx.py", "--checkpoint", str(path),
                        *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    return lines[0]


def test_missing_file(tmp_path):
    assert "no such file" in _fail(tmp_path / "nope.pt", "--output", str(tmp_path / "m.onnx"))


def test_not_a_checkpoint(tmp_path):
    p = tmp_path / "notes.classy.pt"
    p.write_text("hello, I am text\n")
    line = _fail(p, "--output", str(tmp_path / "m.onnx"))
    assert f"{p} is not an SSCD checkpoint: a text file (it begins 'hello, I am text')" in line


def _not_sscd(path) -> str:
    """The one-line reason, which never advises loading with code execution."""
    with pytest.raises(checkpoints.CheckpointError) as e:
        checkpoints.load(str(path))
    message = str(e.value)
    assert "\n" not in message and "weights_only" not in message
    assert "arbitrary code" not in message and "trusted source" not in message
    return message


def test_files_that_are_not_checkpoints_say_what_they_are_not(tmp_path, recwarn):
    import argparse
    import pickle

    text = tmp_path / "readme.pt"
    text.write_text("# my model\nweights are elsewhere\n")
    assert _not_sscd(text).startswith(f"{text} is not an SSCD checkpoint: a text file")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    assert _not_sscd(empty).endswith("the file is empty")
    noise = tmp_path / "noise.pt"
    noise.write_bytes(bytes(range(7, 200)))
    assert "not a PyTorch checkpoint (it begins with bytes 07 08 09" in _not_sscd(noise)
    archive = tmp_path / "photos.zip.pt"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("a.jpg", b"x")
        z.writestr("b.jpg", b"y")
    assert _not_sscd(archive).endswith("a zip archive without PyTorch's data.pkl (it holds a.jpg, b.jpg)")
    objects = tmp_path / "objects.pt"
    torch.save({"config": argparse.Namespace(lr=0.1), "w": torch.zeros(2)}, objects)
    line = _not_sscd(objects)
    assert line.startswith(f"{objects} is not an SSCD checkpoint: it holds Python objects other "
                           "than tensors (argparse.Namespace)") and "was not loaded" in line
    plain = tmp_path / "plain.pt"
    plain.write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=4))
    assert _not_sscd(plain).endswith("a plain Python pickle, not a file written by torch.save")
    assert _not_sscd(tmp_path / "plain.pt")  # twice: nothing cached, nothing printed
    assert not [w for w in recwarn if "pickle protocol" in str(w.message)]
    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], listed)
    assert _not_sscd(listed).endswith("it holds a list, not a state_dict of tensors")


def test_truncated_file(ckpts, tmp_path):
    data = open(ckpts[0]["classy"], "rb").read()
    p = tmp_path / "cut.classy.pt"
    p.write_bytes(data[: len(data) // 2])
    assert "truncated or corrupt" in _fail(p, "--output", str(tmp_path / "m.onnx"))


def test_truncated_torchscript(ckpts, tmp_path):
    data = open(ckpts[0]["torchscript"], "rb").read()
    p = tmp_path / "cut.torchscript.pt"
    p.write_bytes(data[: len(data) // 2])
    assert "truncated or corrupt" in _fail(p, "--output", str(tmp_path / "m.onnx"))


def test_lightning_ckpt_says_how_to_extract(ckpts, tmp_path):
    import argparse
    state = torch.load(ckpts[0]["classy"])
    p = tmp_path / "last.ckpt"
    torch.save({"epoch": 3, "pytorch-lightning_version": "1.5.10",
                "hyper_parameters": argparse.Namespace(lr=0.1),
                "state_dict": {"model." + k: v for k, v in state.items()}}, p)
    line = _fail(p, "--output", str(tmp_path / "m.onnx"))
    assert "Lightning" in line and "state_dict" in line


def test_unknown_layout_names_first_missing_and_unexpected(ckpts, tmp_path):
    state = torch.load(ckpts[0]["torchvision"])
    state["backbone.layer1.0.extra.weight"] = state.pop("backbone.layer1.0.conv2.weight")
    p = tmp_path / "odd.torchvision.pt"
    torch.save(state, p)
    line = _fail(p, "--output", str(tmp_path / "m.onnx"))
    assert "backbone.layer1.0.conv2.weight" in line and "backbone.layer1.0.extra.weight" in line

    p2 = tmp_path / "foreign.pt"
    torch.save({"encoder.weight": torch.zeros(2)}, p2)
    assert "unknown key layout" in _fail(p2, "--output", str(tmp_path / "m.onnx"))


def test_dims_that_contradict_the_file(ckpts, tmp_path):
    line = _fail(ckpts[0]["classy"], "--dims", "1024", "--output", str(tmp_path / "m.onnx"))
    assert "--dims 1024" in line and "512" in line


def test_output_that_cannot_be_written(ckpts, tmp_path):
    line = _fail(ckpts[0]["classy"], "--output", str(tmp_path / "no" / "such" / "m.onnx"))
    assert "does not exist" in line
    assert not (tmp_path / "no").exists()


def test_zip_that_is_not_torch(tmp_path):
    p = tmp_path / "x.torchscript.pt"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("readme.txt", "not a model")
    line = _fail(p, "--output", str(tmp_path / "m.onnx"))
    assert f"{p} is not an SSCD checkpoint: a zip archive without PyTorch's data.pkl" in line


def test_published_names_are_known_with_their_trunk_and_dims():
    from sscd_triton import spec

    assert len(spec.PUBLISHED_MODELS) == 7
    large = spec.published_model("/w/sscd_disc_large.torchscript.pt")
    assert (large.trunk, large.dims) == ("resnext101_32x4d", 1024)
    assert "torchvision" not in large.layouts
    assert spec.published_model("/w/sscd_disc_mixup.classy.pt").dims == 512
    assert spec.published_model("/w/my_model.pt") is None
