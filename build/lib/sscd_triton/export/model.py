"""The SSCD descriptor as one torch module: trunk -> GeM(p=3) -> Linear -> L2 normalise.

The module's state_dict is upstream's `.torchvision.pt` layout (`backbone.*`, torchvision
ResNet names, `backbone.fc` the 2048 -> dims Linear), so every published layout loads
into it after key mapping.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

from sscd_triton import spec


def gem(x: torch.Tensor, p: float = spec.GEM_P, eps: float = spec.GEM_EPS) -> torch.Tensor:
    """Generalised mean pooling: `[N, C, h, w]` -> `[N, C]`."""
    return x.clamp(min=eps).pow(p).mean(dim=(2, 3)).pow(1.0 / p)


class SSCD(nn.Module):
    """`[N, 3, H, W]` float32 normalised images -> `[N, dims]` float32 unit descriptors.

    Half precision is applied to the exported ONNX graph, not here (export/onnx_export.py),
    so that TorchScript checkpoints get exactly the same treatment.
    """

    def __init__(self, trunk: str = "resnet50", dims: int = 512):
        super().__init__()
        t = spec.TRUNKS[trunk]
        self.trunk_name, self.dims = trunk, dims
        self.backbone = ResNet(Bottleneck, list(t.blocks), num_classes=dims,
                               groups=t.groups, width_per_group=t.width_per_group)
        self.backbone.avgpool = nn.Identity()  # GeM replaces it; stateless, applied in forward

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b = self.backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(images))))
        x = b.layer4(b.layer3(b.layer2(b.layer1(x))))
        x = b.fc(gem(x))
        return F.normalize(x, dim=1, eps=spec.L2_EPS)
