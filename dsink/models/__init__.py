"""Backbones: ResNet-32 (long-tail papers), PreAct ResNet-18 (noisy-label papers), a small CNN (28x28)."""

from dsink.models.registry import MODELS, build_model

__all__ = ["MODELS", "build_model"]
