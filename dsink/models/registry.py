"""Model registry: the architectures a params file can name."""

from __future__ import annotations

import difflib
from collections.abc import Callable

from torch import nn

from dsink.errors import DsinkError
from dsink.models.preact_resnet import PreActResNet18
from dsink.models.resnet32 import ResNet32
from dsink.models.small_cnn import SmallCNN

MODELS: dict[str, Callable[[int, int], nn.Module]] = {
    "small_cnn": SmallCNN,
    "resnet32": ResNet32,
    "preact_resnet18": PreActResNet18,
}


def build_model(name: str, num_classes: int, in_channels: int) -> nn.Module:
    """Instantiate architecture ``name`` (raw logits out) for ``num_classes`` and ``in_channels``."""
    if name not in MODELS:
        close = difflib.get_close_matches(name, MODELS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise DsinkError(f"unknown model {name!r}{hint}; expected one of {', '.join(MODELS)}")
    if num_classes < 2:
        raise DsinkError(f"model {name}: num_classes = {num_classes}; expected >= 2")
    if in_channels < 1:
        raise DsinkError(f"model {name}: in_channels = {in_channels}; expected >= 1")
    return MODELS[name](num_classes, in_channels)
