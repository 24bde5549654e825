"""Backbones returning raw logits: ResNet-32 (long-tail papers), PreAct ResNet-18 (noisy-label papers),
a small CNN (28x28 greyscale on a CPU). Build them by name with :func:`build_model`."""

from dsink.models.registry import MODELS, build_model

__all__ = ["MODELS", "build_model"]
