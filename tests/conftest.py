"""Checkpoints in every published SSCD layout, written with seeded random weights.

The reference model here is built independently of export/ from ../shared/sscd/FACTS.md:
torchvision's ResNet with GeM(p=3) in place of avgpool, then L2 normalisation. Classy
Vision names are produced by the FACTS mapping table and checked against the key dumps
of the real files (tests/data/keys-*.txt).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

DATA = os.path.join(os.path.dirname(__file__), "data")


class RefGeM(nn.Module):
    def forward(self, x):
        return x.clamp(min=1e-6).pow(3.0).mean(dim=(-2, -1), keepdim=True).pow(1.0 / 3.0)


class RefModel(nn.Module):
    """Upstream `Model("TV_RESNET50", dims, 3.0)` as FACTS describes it."""

    def __init__(self, blocks, groups, width, dims):
        super().__init__()
        self.backbone = ResNet(Bottleneck, blocks, num_classes=dims, groups=groups,
                               width_per_group=width, zero_init_residual=True)
        self.backbone.avgpool = RefGeM()

    def forward(self, x):
        return F.normalize(self.backbone(x), dim=1)


TRUNKS = {"resnet50": ([3, 4, 6, 3], 1, 64, 512),
          "resnext101_32x4d": ([3, 4, 23, 3], 32, 4, 1024)}


def reference_model(trunk: str = "resnet50", seed: int = 1) -> RefModel:
    """Every parameter and buffer random (zero-init residual BN would hide mapping bugs),
    BatchNorm statistics then estimated on noise, so activations have a trained scale."""
    g = torch.manual_seed(seed)
    model = RefModel(*TRUNKS[trunk])
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.2, 0.2, generator=g)
                m.reset_running_stats()
                m.momentum = None
        model.train()
        model(torch.randn(6, 3, 128, 128, generator=g))
    return model.eval()


_TV_TO_CLASSY = {"conv1": "convolutional_block.0", "bn1": "convolutional_block.1",
                 "conv2": "convolutional_block.3", "bn2": "convolutional_block.4",
                 "conv3": "convolutional_block.6", "bn3": "bn"}


def to_classy(tv_key: str) -> str:
    k = tv_key[len("backbone."):]
    if k.startswith("fc."):
        return "embeddings.1." + k[3:]
    m = re.fullmatch(r"(conv1|bn1)\.(.*)", k)
    if m:
        return f"backbone.initial_block._module.{0 if m[1] == 'conv1' else 1}.{m[2]}"
    m = re.fullmatch(r"layer(\d)\.(\d+)\.(\w+)\.(.*)", k)
    s, b, mod, rest = int(m[1]) - 1, m[2], m[3], m[4]
    mod = _TV_TO_CLASSY.get(mod, mod)
    return f"backbone.blocks.{s}.block{s}-{b}.{mod}.{rest}"


def key_dump(name: str) -> list[tuple[str, tuple]]:
    out = []
    with open(os.path.join(DATA, name)) as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            key, rest = line.split(" ", 1)
            out.append((key, tuple(int(d) for d in re.findall(r"\d+", rest.rsplit(")", 1)[0]))))
    return out


def write_layout(model: RefModel, layout: str, path: str, keep_nbt: bool = True) -> str:
    state = model.state_dict()
    if not keep_nbt:
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    if layout == "torchvision":
        torch.save(state, path)
    elif layout == "classy":
        torch.save({to_classy(k): v for k, v in state.items()}, path)
    elif layout == "torchscript":
        torch.jit.trace(model.eval(), torch.randn(1, 3, 64, 64)).save(path)
    return path


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory):
    """Paths of checkpoints by name, and the reference models that wrote them."""
    d = tmp_path_factory.mktemp("ckpts")
    r50, r101 = reference_model("resnet50"), reference_model("resnext101_32x4d")
    paths = {
        "torchvision": write_layout(r50, "torchvision", str(d / "m.torchvision.pt")),
        "classy": write_layout(r50, "classy", str(d / "m.classy.pt"), keep_nbt=False),
        "classy_nbt": write_layout(r50, "classy", str(d / "m_nbt.classy.pt")),
        "torchscript": write_layout(r50, "torchscript", str(d / "m.torchscript.pt")),
        "classy_large": write_layout(r101, "classy", str(d / "large.classy.pt")),
    }
    refs = {name: r101 if name == "classy_large" else r50 for name in paths}
    return paths, refs


# --- the local tritonserver that the client tests (plain and --ray) share -----------------
ROOT = Path(__file__).resolve().parents[1]
EMBED = str(ROOT / "client" / "embed.py")


@pytest.fixture(scope="session")
def triton(tmp_path_factory):
    """A cpu repository (demo weights, max batch 8) served on 127.0.0.1 for the session."""
    from sscd_triton.serving.server import TritonServer

    work = tmp_path_factory.mktemp("client_server")
    build = subprocess.run(
        [sys.executable, str(ROOT / "export" / "build_repository.py"), "--target", "cpu",
         "--output", str(work / "repo"), "--max-batch", "8"],
        cwd=work, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    holder = SimpleNamespace(work=work, repo=work / "repo",
                             checkpoint=work / "runs" / "demo-untrained.torchvision.pt")
    holder.server = TritonServer(holder.repo, log_path=work / "server.log").start()
    yield holder
    holder.server.stop()


def embed(*args, url=None, stdin=None, env=None, timeout=300,
          cwd=ROOT) -> subprocess.CompletedProcess:
    """`python client/embed.py ARGS [--url URL]` as a user runs it."""
    cmd = [sys.executable, EMBED, *map(str, args)]
    if url:
        cmd += ["--url", url]
    return subprocess.run(cmd, cwd=cwd, input=stdin, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
