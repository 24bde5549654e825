"""PreAct ResNet-18 (He et al. 2016, identity mappings), the backbone of noisy-label papers (DivideMix).

CIFAR-style 3x3 stem with stride 1; stages of 64/128/256/512 channels with two PreActBlocks each.
"""

from __future__ import annotations

import torch
from torch import nn


class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(x))
        short = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + short


class PreActResNet18(nn.Module):
    def __init__(self, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        layers: list[nn.Module] = []
        cin = 64
        for i, width in enumerate((64, 128, 256, 512)):
            for b in range(2):
                layers.append(PreActBlock(cin, width, 2 if (i > 0 and b == 0) else 1))
                cin = width
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(512)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn(self.layers(self.stem(x))))
        return self.fc(torch.flatten(self.pool(out), 1))
