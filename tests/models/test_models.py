"""Model builders: CIFAR ResNet sizes match He et al. (2016), and every naming route builds a working model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdcache.errors import KDCacheError
from kdcache.models import build_model, list_models, resnet8, resnet20, resnet110


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("factory,low,high", [
    (resnet8, 0.075e6, 0.085e6),     # option A would be 0.078M; projections add ~2.8k
    (resnet20, 0.265e6, 0.28e6),     # paper: 0.27M
    (resnet110, 1.69e6, 1.76e6),     # paper: 1.7M
])
def test_cifar_resnet_parameter_counts(factory, low, high):
    assert low <= _params(factory()) <= high


def test_resnet_depth_and_output_shape():
    model = resnet20(num_classes=100).eval()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) + 1 == 20  # 19 3x3 convs + the linear head (projections are not counted)
    with torch.no_grad():
        out = model(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, 100)


def test_list_models():
    names = list_models()
    for depth in (8, 14, 20, 32, 44, 56, 110):
        assert f"resnet{depth}" in names


def test_build_kdcache_name():
    model = build_model("resnet8", 5).eval()
    assert type(model).__name__ == "CifarResNet" and model.depth == 8
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    # a kdcache name wins over torchvision's model of a similar family
    assert _params(build_model("resnet20", 10)) == _params(resnet20(10))


def test_build_mlp_with_kwargs():
    model = build_model("mlp", 10, in_features=64, hidden=32, depth=2)
    assert model(torch.randn(4, 8, 8)).shape == (4, 10)
    with pytest.raises(KDCacheError, match="mlp"):
        build_model("mlp", 10, widht=3)


def test_build_torchvision_name():
    model = build_model("resnet18", 7).eval()
    assert type(model).__module__.startswith("torchvision.models")
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)
    with pytest.raises(KDCacheError, match="never downloads weights"):
        build_model("resnet18", 7, weights="DEFAULT")


def test_build_module_factory():
    trusted = {"trust_model_code": True}
    model = build_model("kdcache.models:resnet8", 3, **trusted)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    relu = build_model("torch.nn:ReLU", 3, inplace=True, **trusted)  # takes no num_classes: called without it
    assert isinstance(relu, nn.ReLU) and relu.inplace
    with pytest.raises(KDCacheError, match=r"cannot import module 'no_such_pkg\.mod' \(No module named"):
        build_model("no_such_pkg.mod:make", 3, **trusted)
    with pytest.raises(KDCacheError, match="has no attribute 'nope'"):
        build_model("kdcache.models:nope", 3, **trusted)
    with pytest.raises(KDCacheError, match="not a torch.nn.Module"):
        build_model("kdcache.models:list_models", 3, **trusted)
    with pytest.raises(KDCacheError, match="is Python code .* --trust-model-code"):  # never imported unasked
        build_model("kdcache.models:resnet8", 3)


def test_unknown_name():
    with pytest.raises(KDCacheError) as info:
        build_model("resnet9000", 10)
    message = str(info.value)
    assert "resnet9000" in message and "resnet20" in message and "resnet110" in message
    assert "torchvision" in message and "module:factory" in message and "\n" not in message
