"""Small reference architectures with built-in permutation specs: an MLP and a BatchNorm ResNet.

``ResNet`` uses torchvision's naming (``conv1``/``bn1``, ``layerN.M.conv1/bn1/conv2/bn2/downsample.0/1``, ``fc``), so
:func:`hf_merge.permutation.resnet_spec` also covers torchvision ResNets built from ``BasicBlock``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn


class MLP(nn.Sequential):
    """Linear–ReLU stack: ``widths = (in, hidden..., out)``; layers are named ``0, 2, 4, ...``."""

    def __init__(self, widths: Sequence[int]) -> None:
        if len(widths) < 2:
            raise ValueError(f"MLP widths need at least an input and an output size, got {list(widths)}.")
        layers: list[nn.Module] = []
        for i, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
            layers.append(nn.Linear(fan_in, fan_out))
            if i < len(widths) - 2:
                layers.append(nn.ReLU())
        super().__init__(*layers)


class BasicBlock(nn.Module):
    """conv3×3–BN–ReLU–conv3×3–BN plus a shortcut (a 1×1 conv + BN ``downsample`` when the shape changes)."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return torch.relu(out + shortcut)


class ResNet(nn.Module):
    """A small ResNet: stem conv–BN–ReLU, stages of ``BasicBlock`` (stride 2 between stages), global pooling, ``fc``."""

    def __init__(
        self, in_channels: int = 1, widths: Sequence[int] = (16, 32), blocks_per_stage: int = 1, num_classes: int = 10
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        channels = widths[0]
        for stage, width in enumerate(widths):
            blocks = []
            for index in range(blocks_per_stage):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(BasicBlock(channels, width, stride))
                channels = width
            self.add_module(f"layer{stage + 1}", nn.Sequential(*blocks))
        self.num_stages = len(widths)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        for stage in range(self.num_stages):
            x = getattr(self, f"layer{stage + 1}")(x)
        return self.fc(x.mean(dim=(2, 3)))
