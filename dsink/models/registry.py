"""Model registry: the architectures a params file can name, and their one validated constructor."""

from __future__ import annotations

import difflib
import operator
from collections.abc import Callable

from torch import nn

from dsink.errors import DsinkError
from dsink.models.mlp import MLP
from dsink.models.preact_resnet import PreActResNet18
from dsink.models.resnet32 import ResNet32
from dsink.models.small_cnn import SmallCNN

#: name -> constructor ``(num_classes, in_channels) -> nn.Module`` returning raw logits (N, num_classes).
MODELS: dict[str, Callable[[int, int], nn.Module]] = {
    "resnet32": ResNet32,
    "preact_resnet18": PreActResNet18,
    "small_cnn": SmallCNN,
    "mlp": MLP,
}


def _as_int(v: object) -> int | None:
    """``v`` as a Python int if it is an integer (numpy ints included, bools not), else None."""
    if isinstance(v, bool):
        return None
    try:
        return operator.index(v)  # type: ignore[arg-type]
    except TypeError:
        return None


def build_model(name: str, num_classes: int, in_channels: int) -> nn.Module:
    """Instantiate architecture ``name`` for ``num_classes`` classes and ``in_channels`` input channels.

    Raises :class:`DsinkError` (one line) on an unknown name, ``num_classes < 2`` or ``in_channels < 1``.
    """
    if not isinstance(name, str) or name not in MODELS:
        valid = ", ".join(sorted(MODELS))
        close = difflib.get_close_matches(str(name), list(MODELS), n=1) if isinstance(name, str) else []
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise DsinkError(f"unknown model {name!r} (valid: {valid}){hint}")
    n_cls, n_in = _as_int(num_classes), _as_int(in_channels)
    if n_cls is None or n_cls < 2:
        raise DsinkError(f"model {name!r}: num_classes = {num_classes!r}; expected an integer >= 2")
    if n_in is None or n_in < 1:
        raise DsinkError(f"model {name!r}: in_channels = {in_channels!r}; expected an integer >= 1")
    return MODELS[name](n_cls, n_in)
