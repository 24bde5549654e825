"""CIFAR ResNet-32 (He et al. 2016, section 4.2): the backbone of the long-tail literature (LDAM, LA).

A 3x3 stem to 16 channels, then three stages of five BasicBlocks (16/32/64 channels, stride 2 at the
first block of stages 2 and 3), global average pooling and a linear classifier: ~0.46 M parameters for
10 classes.

Shortcuts that change shape use **option A** of the paper, as the long-tail reference code does: the
input is subsampled by the stride and zero-padded along channels, so the shortcut has no parameters.
(Channel counts only ever grow inside the network, so this works for any ``in_channels``: the stem maps
the input to 16 channels first.) Convolutions and the classifier get Kaiming-normal init (fan-in, ReLU
gain); BN starts at weight 1, bias 0.

Global adaptive average pooling makes it work for any image size (>= 1x1; stride-2 stages round up).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _PadShortcut(nn.Module):
    """Option-A shortcut: ``x[:, :, ::stride, ::stride]`` zero-padded from ``cin`` to ``cout`` channels."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        if cout < cin:
            raise ValueError(f"option-A shortcut cannot shrink channels ({cin} -> {cout})")
        self.stride, self.extra = stride, cout - cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        # F.pad's last pair pads dim -1, then dim -2, then dim 1 (channels): split the extra channels.
        before = self.extra // 2
        return F.pad(x, (0, 0, 0, 0, before, self.extra - before))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus shortcut, then ReLU (post-activation, original ResNet)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = (
            _PadShortcut(cin, cout, stride) if (stride != 1 or cin != cout) else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet32(nn.Module):
    """CIFAR ResNet-(6n+2) with ``n = blocks_per_stage`` (5 gives ResNet-32); returns raw logits."""

    def __init__(self, num_classes: int, in_channels: int = 3, blocks_per_stage: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        blocks: list[nn.Module] = []
        cin = 16
        for stage, width in enumerate((16, 32, 64)):
            for b in range(blocks_per_stage):
                stride = 2 if (stage > 0 and b == 0) else 1
                blocks.append(BasicBlock(cin, width, stride))
                cin = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.pool(self.blocks(out))
        return self.fc(torch.flatten(out, 1))
