"""The backbones: any image size and channel count, deterministic init, bf16 / channels_last."""

from __future__ import annotations

import pytest
import torch

from dsink.errors import DsinkError
from dsink.models import MODELS, build_model


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (5, 40, 40), (2, 17, 23)])
def test_models_give_logits_for_any_geometry(name, shape):
    torch.manual_seed(0)
    model = build_model(name, 7, shape[0]).eval()
    with torch.no_grad():
        out = model(torch.randn(2, *shape))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


def n_params(name: str) -> int:
    return sum(p.numel() for p in build_model(name, 10, 3).parameters())


def test_parameter_counts_are_the_published_sizes():
    assert 0.44e6 < n_params("resnet32") < 0.50e6  # ResNet-32 for CIFAR: ~0.46 M
    assert 10.5e6 < n_params("preact_resnet18") < 11.5e6  # PreAct ResNet-18: ~11.2 M
    assert n_params("small_cnn") < 0.2e6


def test_same_seed_same_init():
    torch.manual_seed(3)
    a = build_model("resnet32", 10, 3).state_dict()
    torch.manual_seed(3)
    b = build_model("resnet32", 10, 3).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_channels_last_and_bf16():
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 1).eval().to(memory_format=torch.channels_last)
    x = torch.randn(4, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x).float()
    assert (ref - low).abs().max() < 0.1 * ref.abs().max() + 0.05


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("resnet33", 10, 3), "resnet32"),
        (("small_cnn", 1, 3), "num_classes"),
        (("small_cnn", 10, 0), "in_channels"),
    ],
)
def test_bad_model_arguments(args, match):
    with pytest.raises(DsinkError, match=match):
        build_model(*args)
