"""Backbones: logits for any image size / channel count, published sizes, deterministic init,
channels_last and bfloat16 autocast, and the registry's errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dsink.errors import DsinkError
from dsink.models import MODELS, build_model

torch.set_num_threads(1)

NAMES = ("resnet32", "preact_resnet18", "small_cnn", "mlp")


def test_registry_names():
    assert set(MODELS) == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (5, 40, 40), (2, 17, 23)])
def test_logits_for_any_geometry(name, shape):
    torch.manual_seed(0)
    model = build_model(name, 7, shape[0]).eval()
    with torch.no_grad():
        out = model(torch.randn(2, *shape))
    assert out.shape == (2, 7)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_smallest_supported_image_trains(name):
    # 8x8 in train mode (batch statistics) with a backward pass: gradients reach the stem
    torch.manual_seed(0)
    model = build_model(name, 3, 2).train()
    loss = model(torch.randn(4, 2, 8, 8)).logsumexp(1).mean()
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    stem = next(m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert stem.weight.grad.abs().sum() > 0


def n_params(name: str, num_classes: int = 10, in_channels: int = 3) -> int:
    return sum(p.numel() for p in build_model(name, num_classes, in_channels).parameters())


def test_parameter_counts_are_the_published_sizes():
    assert 0.45e6 < n_params("resnet32") < 0.48e6  # CIFAR ResNet-32: 0.46 M
    assert 11.0e6 < n_params("preact_resnet18") < 11.4e6  # PreAct ResNet-18: 11.2 M
    assert 50e3 < n_params("small_cnn", 10, 1) < 150e3  # ~0.1 M
    # only the stem and the classifier depend on the geometry
    assert n_params("resnet32", 100, 3) - n_params("resnet32", 10, 3) == 90 * 65
    assert n_params("small_cnn", 10, 4) - n_params("small_cnn", 10, 1) == 3 * 9 * 32


def test_small_cnn_is_cheap():
    model = build_model("small_cnn", 10, 1).eval()
    macs = 0

    def count(mod, inp, out):
        nonlocal macs
        if isinstance(mod, nn.Conv2d):
            k = mod.weight[0].numel()  # cin/groups * kh * kw
            macs += out.numel() * k
        elif isinstance(mod, nn.Linear):
            macs += out.numel() * mod.in_features

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(torch.zeros(1, 1, 28, 28))
    for h in hooks:
        h.remove()
    assert 5e6 < macs < 15e6  # ~7.5 M multiply-adds: well under 0.1 GFLOP per image


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_init(name):
    def init(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(seed)
        return build_model(name, 10, 3).state_dict()

    a, b, c = init(3), init(3), init(4)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


@pytest.mark.parametrize("name", NAMES)
def test_channels_last_and_bf16_autocast(name):
    torch.manual_seed(0)
    model = build_model(name, 10, 3).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        xc = x.contiguous(memory_format=torch.channels_last)
        cl = model(xc)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(xc)
    assert torch.allclose(cl, ref, rtol=1e-4, atol=1e-4)
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    scale = ref.abs().max().item()
    assert (low.float() - ref).abs().max().item() < 0.1 * scale + 0.05


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("resnet33", 10, 3), r"'resnet33'.*preact_resnet18, resnet32, small_cnn.*did you mean 'resnet32'"),
        (("small-cnn", 10, 3), r"did you mean 'small_cnn'"),
        (("vgg", 10, 3), r"unknown model 'vgg' \(valid: "),
        (("small_cnn", 1, 3), r"num_classes = 1"),
        (("small_cnn", 10.0, 3), r"num_classes = 10\.0"),
        (("small_cnn", True, 3), r"num_classes = True"),
        (("resnet32", 10, 0), r"in_channels = 0"),
    ],
)
def test_bad_model_arguments(args, match):
    with pytest.raises(DsinkError, match=match) as info:
        build_model(*args)
    assert "\n" not in str(info.value)


def test_numpy_integers_are_accepted():
    np = pytest.importorskip("numpy")
    model = build_model("small_cnn", np.int64(4), np.int32(1))
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 4)
