"""PreAct ResNet-18 (He et al. 2016, "Identity mappings"), the backbone of noisy-label papers (DivideMix).

CIFAR style: a 3x3 stride-1 stem conv to 64 channels (no stem pooling), then four stages of two
PreActBlocks (64/128/256/512 channels, stride 2 at the first block of stages 2-4), a final BN-ReLU
(the identity-mappings paper's post-stack activation; the popular kuangliu / DivideMix code omits it,
which costs nothing to add and keeps the pooled features normalised), global average pooling and a
linear classifier: ~11.2 M parameters. Shape-changing shortcuts are 1x1 convolutions applied to the
block's pre-activated input, as in the reference code. PyTorch's default init.

Global adaptive average pooling makes it work for any image size and channel count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3, plus shortcut (no activation after the addition)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Conv2d | None = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        identity = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv1(pre)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + identity


class PreActResNet18(nn.Module):
    """PreAct ResNet-18 for small images; returns raw logits."""

    def __init__(self, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        blocks: list[nn.Module] = []
        cin = 64
        for stage, width in enumerate((64, 128, 256, 512)):
            for b in range(2):
                stride = 2 if (stage > 0 and b == 0) else 1
                blocks.append(PreActBlock(cin, width, stride))
                cin = width
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(512)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.blocks(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(out), 1))
