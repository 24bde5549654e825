"""A small CNN sized for 28x28 greyscale images (Fashion-MNIST) that trains fast on a 2-core CPU.

Downsampling early keeps it at ~7.5 M multiply-adds per 28x28 image (about 0.1 M parameters), so an epoch of
Fashion-MNIST-LT takes seconds on a CPU. Global average pooling makes it work for any image size >= 4x4 and
any channel count.
"""

from __future__ import annotations

import torch
from torch import nn


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class SmallCNN(nn.Module):
    """conv32-pool-conv64-pool-conv128-GAP-fc128-fc."""

    def __init__(self, num_classes: int, in_channels: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _block(in_channels, 32),
            nn.MaxPool2d(2, ceil_mode=True),
            _block(32, 64),
            nn.MaxPool2d(2, ceil_mode=True),
            _block(64, 128),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Linear(128, 128), nn.ReLU(inplace=True), nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
