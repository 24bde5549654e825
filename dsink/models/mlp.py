"""A multi-layer perceptron on raw pixels: the backbone for inputs that are feature vectors.

    adaptive-avgpool to side x side - flatten - [linear(hidden) - ReLU] x len(hidden) - linear(num_classes)

It stands for users whose inputs are tabular or embedding vectors, and it is the cheap backbone of the
memorising-regime benchmark: with no convolutional prior and ~0.8 M parameters it fits 40 % wrong
labels within a few dozen epochs on a 2-core CPU. Inputs of any size and channel count are first
average-pooled (or repeated, when smaller) to ``side x side`` so the first layer's width does not depend
on the dataset; 28x28 Fashion-MNIST becomes 32x32. No batch norm, no dropout: nothing hides memorisation.
"""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    """Pixels -> ``hidden`` ReLU layers -> raw logits."""

    def __init__(
        self, num_classes: int, in_channels: int = 1, side: int = 32, hidden: tuple[int, ...] = (512, 512)
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.AdaptiveAvgPool2d(side), nn.Flatten()]
        width = in_channels * side * side
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
