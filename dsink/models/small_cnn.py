"""A small CNN sized for 28x28 greyscale images (Fashion-MNIST) that trains fast on a 2-core CPU."""

from __future__ import annotations

import torch
from torch import nn


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """conv32-conv32-pool-conv64-conv64-pool-GAP-fc128-fc: ~0.1M params; any size >= 8x8, any channels."""

    def __init__(self, num_classes: int, in_channels: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _block(in_channels, 32), _block(32, 32), nn.MaxPool2d(2),
            _block(32, 64), _block(64, 64), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Linear(64, 128), nn.ReLU(inplace=True), nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
