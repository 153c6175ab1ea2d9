"""Load any published SSCD checkpoint, detecting its layout from the file's contents.

Layouts (../shared/sscd/FACTS.md): `.torchvision.pt` and `.classy.pt` are bare
state_dicts; `.torchscript.pt` is a traced module. Classy Vision is not a dependency:
its keys map 1:1 onto torchvision's ResNet names.
"""
from __future__ import annotations

import os
import re
import warnings
import zipfile
from dataclasses import dataclass

import torch
from torch import nn

from sscd_triton.export.model import SSCD
from sscd_triton import spec


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message says why and what to do."""


@dataclass
class Loaded:
    """A checkpoint ready to export: `model` maps `[N,3,H,W]` to `[N,dims]` descriptors."""

    model: nn.Module
    layout: str  # "torchvision" | "classy" | "torchscript"
    trunk: str  # a key of spec.TRUNKS, or "unknown (TorchScript)" when it cannot be told
    dims: int
    parameters: int
    path: str


_CLASSY_BLOCK = re.compile(r"blocks\.(\d+)\.block\d+-(\d+)\.(.*)")
_CLASSY_CONV = {"convolutional_block.0": "conv1", "convolutional_block.1": "bn1",
                "convolutional_block.3": "conv2", "convolutional_block.4": "bn2",
                "convolutional_block.6": "conv3", "bn": "bn3"}


def classy_to_torchvision(key: str) -> str:
    """Map one Classy Vision SSCD key onto the `.torchvision.pt` name (FACTS table)."""
    if key.startswith("embeddings.1."):
        return "backbone.fc." + key[len("embeddings.1."):]
    if not key.startswith("backbone."):
        return key
    k = key[len("backbone."):]
    if k.startswith("initial_block._module.0."):
        return "backbone.conv1." + k[len("initial_block._module.0."):]
    if k.startswith("initial_block._module.1."):
        return "backbone.bn1." + k[len("initial_block._module.1."):]
    m = _CLASSY_BLOCK.fullmatch(k)
    if not m:
        return key
    stage, block, rest = int(m.group(1)), m.group(2), m.group(3)
    for src, dst in _CLASSY_CONV.items():
        if rest.startswith(src + "."):
            rest = dst + rest[len(src):]
            break
    return f"backbone.layer{stage + 1}.{block}.{rest}"


def _trunk_of(state: dict) -> str:
    blocks = tuple(
        len({k.split(".")[2] for k in state if k.startswith(f"backbone.layer{s}.")})
        for s in (1, 2, 3, 4)
    )
    conv2 = state.get("backbone.layer1.0.conv2.weight")
    groups = 1 if conv2 is None else max(1, conv2.shape[0] // conv2.shape[1])
    for name, t in spec.TRUNKS.items():
        if t.blocks == blocks and t.groups == groups:
            return name
    raise CheckpointError(f"unknown trunk: stages of {list(blocks)} blocks with {groups} "
                          "groups match neither ResNet50 nor ResNeXt101 32x4d")


def _lightning_message(path: str) -> str:
    return (f"{path} is a PyTorch Lightning training checkpoint (.ckpt), not a published SSCD "
            "model. Export its weights first, e.g. "
            "`torch.save({k.removeprefix('model.'): v for k, v in ckpt['state_dict'].items()}, "
            "'model.classy.pt')`, or use a published .classy.pt/.torchvision.pt/.torchscript.pt")


def _load_state_dict(state: dict, path: str, dims: int | None) -> Loaded:
    if "state_dict" in state or "pytorch-lightning_version" in state:
        raise CheckpointError(_lightning_message(path))
    if not all(isinstance(k, str) for k in state):
        bad = next(k for k in state if not isinstance(k, str))
        raise CheckpointError(f"{path} is not an SSCD state_dict: key {bad!r} is not a name")
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        bad = next(k for k, v in state.items() if not isinstance(v, torch.Tensor))
        raise CheckpointError(f"{path} is not an SSCD state_dict: entry {bad!r} is a "
                              f"{type(state[bad]).__name__}, not a tensor")
    if any(k.startswith("backbone.initial_block.") for k in state):
        layout = "classy"
        state = {classy_to_torchvision(k): v for k, v in state.items()}
    elif "backbone.conv1.weight" in state:
        layout = "torchvision"
    else:
        first = next(iter(state), "(none)")
        raise CheckpointError(f"{path}: unknown key layout, first key {first!r}; expected "
                              "'backbone.conv1.weight' (torchvision) or "
                              "'backbone.initial_block._module.0.weight' (classy)")
    fc = state.get("backbone.fc.weight")
    if fc is None:
        raise CheckpointError(f"{path}: missing key 'backbone.fc.weight' "
                              f"({'embeddings.1.weight' if layout == 'classy' else 'the Linear'})"
                              " : the file has no descriptor projection")
    file_dims = int(fc.shape[0])
    if dims is not None and dims != file_dims:
        raise CheckpointError(f"--dims {dims} contradicts {path}, whose projection gives "
                              f"{file_dims}-d descriptors")
    trunk = _trunk_of(state)
    model = SSCD(trunk, file_dims)
    expected = model.state_dict()
    # Published files may or may not carry BatchNorm's num_batches_tracked counters.
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing, first {missing[0]!r}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected, first {unexpected[0]!r}")
        raise CheckpointError(f"{path}: unknown key layout for {layout} {trunk}: "
                              + "; ".join(parts))
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise CheckpointError(f"{path}: key {k!r} has shape {tuple(v.shape)}, "
                                  f"expected {tuple(expected[k].shape)}")
    model.load_state_dict(state, strict=False)
    model.eval()
    params = sum(p.numel() for p in model.parameters())
    return Loaded(model, layout, trunk, file_dims, params, path)


def _is_torchscript(path: str) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _pickled_names(path: str) -> set[bytes]:
    """The marker strings present in a torch zip's pickle, read without unpickling it
    (unpickling an unknown file with weights_only=False would run its code)."""
    try:
        with zipfile.ZipFile(path) as z:
            blob = b"".join(z.read(n) for n in z.namelist() if n.endswith("data.pkl"))
    except (zipfile.BadZipFile, OSError):
        return set()
    return {m for m in (b"pytorch-lightning_version", b"state_dict") if m in blob}


def _not_sscd(path: str, reason: str) -> CheckpointError:
    return CheckpointError(f"{path} is not an SSCD checkpoint: {reason}")


def _head(path: str, n: int = 64) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


def _reason(error: Exception) -> str:
    """PyTorch's message in one short line, without its advice to unpickle with
    weights_only=False (the unpickler's own complaint is what is kept)."""
    message = str(error).strip()
    found = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", message)
    if found:
        return found.group(1).strip()[:200]
    if "weights_only" in message or not message:
        return type(error).__name__
    return message.splitlines()[0][:200]


def _unloadable(path: str, error: Exception) -> CheckpointError:
    """Why `path` did not load as a tensors-only checkpoint, in one line, judged from the
    file itself: PyTorch's own message suggests loading with weights_only=False, which
    runs whatever code the file carries, and is never the right advice here."""
    message = str(error)
    head = _head(path)
    if "Unsupported global" in message:  # a pickle naming classes other than tensors
        if _pickled_names(path):
            return CheckpointError(_lightning_message(path))
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message)
        what = f" ({found.group(1)})" if found else ""
        return _not_sscd(path, f"it holds Python objects other than tensors{what}; published "
                         "SSCD files hold tensors only, and unpickling other objects could run "
                         "code from the file, so it was not loaded")
    if head.startswith(b"PK\x03\x04") or zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError):
            return CheckpointError(f"{path}: truncated or corrupt checkpoint (a zip archive "
                                   "whose directory cannot be read)")
        if not any(n.endswith("/data.pkl") for n in names):
            shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "") or "nothing"
            return _not_sscd(path, f"a zip archive without PyTorch's data.pkl (it holds {shown})")
        return CheckpointError(f"{path}: truncated or corrupt checkpoint ({_reason(error)})")
    if not head:
        return _not_sscd(path, "the file is empty")
    if head.startswith(b"\x80") and b"\x6a\xa8\x50\x19" not in head[:16]:
        # A pickle without PyTorch's legacy magic number: pickle.dump, not torch.save.
        return _not_sscd(path, "a plain Python pickle, not a file written by torch.save")
    if head.startswith(b"\x80"):
        return CheckpointError(f"{path}: truncated or corrupt checkpoint (legacy PyTorch format)")
    text = head.decode("utf-8", errors="replace")
    if "\ufffd" not in text and all(c.isprintable() or c in "\r\n\t" for c in text):
        first = text.strip().splitlines()[0][:40] if text.strip() else ""
        return _not_sscd(path, f"a text file (it begins {first!r}), not a PyTorch checkpoint")
    return _not_sscd(path, f"not a PyTorch checkpoint (it begins with bytes {head[:8].hex(' ')})")


def load(path: str, dims: int | None = None) -> Loaded:
    """Load `path` in whichever published layout it holds; raise CheckpointError if none."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file")
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    if _is_torchscript(path):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # jit deprecation notice
                module = torch.jit.load(path, map_location="cpu").eval()
        except Exception as e:
            raise CheckpointError(f"{path}: TorchScript archive that does not load "
                                  f"(truncated or corrupt?): {str(e).splitlines()[0]}") from None
        with torch.no_grad():
            out = module(torch.zeros(1, 3, 64, 64))
        if out.ndim != 2:
            raise CheckpointError(f"{path}: TorchScript module returns shape {tuple(out.shape)},"
                                  " not [N, dims] descriptors")
        file_dims = int(out.shape[1])
        if dims is not None and dims != file_dims:
            raise CheckpointError(f"--dims {dims} contradicts {path}, whose module gives "
                                  f"{file_dims}-d descriptors")
        state = module.state_dict()
        convs = sum(1 for k, v in state.items() if v.ndim == 4)
        trunk = {53: "resnet50", 104: "resnext101_32x4d"}.get(convs, "unknown (TorchScript)")
        params = sum(p.numel() for p in module.parameters())
        return Loaded(module, "torchscript", trunk, file_dims, params, path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4"
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise _unloadable(path, e) from None
    if not isinstance(state, dict):
        raise _not_sscd(path, f"it holds a {type(state).__name__}, not a state_dict of tensors")
    return _load_state_dict(state, path, dims)
