"""Demo weights: a seeded, UNTRAINED SSCD checkpoint for trying the pipeline end to end.

Its descriptors mean nothing for copy detection. BatchNorm statistics are re-estimated
on seeded noise so activations have a trained network's scale (unit-variance features
instead of values growing through 16 residual blocks), which keeps fp16 checks honest.
"""
from __future__ import annotations

import os

import torch

from sscd_triton import files
from sscd_triton.export.model import SSCD

DEMO_LABEL = "demo weights (seeded random, UNTRAINED: descriptors are meaningless)"


def demo_model(trunk: str = "resnet50", dims: int = 512, seed: int = 0) -> SSCD:
    gen = torch.manual_seed(seed)
    model = SSCD(trunk, dims)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, 3, 160, 160, generator=gen))
    return model.eval()


DEMO_CHECKPOINT = "runs/demo-untrained.torchvision.pt"


def write_demo_checkpoint(path: str = DEMO_CHECKPOINT, trunk: str = "resnet50", dims: int = 512,
                          seed: int = 0) -> str:
    """Save demo weights in the published `.torchvision.pt` layout; returns `path`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if not os.path.exists(path):
        state = demo_model(trunk, dims, seed).state_dict()
        files.write_atomic(path, lambda f: torch.save(state, f))
    return path
