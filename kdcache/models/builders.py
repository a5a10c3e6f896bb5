"""Model builders for teachers and students: the CIFAR ResNets of He et al. (2016), a small MLP, and any
torchvision classifier or `package.module:factory` callable, so a saved model folder can name its architecture.

No builder ever loads pretrained weights: a teacher's weights come from its model folder, never a download.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable, Iterator

import torch
from torch import nn

from kdcache.errors import KDCacheError


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus a shortcut; the shortcut is a 1x1 conv + BN projection where the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al. 2016, Sec. 4.2: depth 6n+2 for 32x32 inputs (3x3 stem of 16, stages of 16/32/64, GAP, linear).

    Shortcuts are option B (1x1 conv + BN projection) at the two stage transitions, identity elsewhere; the
    paper's CIFAR runs used option A (zero-padding), which adds no parameters, so counts here are ~1% higher.
    """

    def __init__(self, depth: int, num_classes: int = 10, widths: tuple[int, int, int] = (16, 32, 64),
                 in_channels: int = 3) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise KDCacheError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        n = (depth - 2) // 6
        self.depth = depth
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers, in_planes = [], widths[0]
        for stage, planes in enumerate(widths):
            for block in range(n):
                layers.append(BasicBlock(in_planes, planes, stride=2 if stage > 0 and block == 0 else 1))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():  # He init for convs, as in the paper; BN starts as the identity
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet8(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """ResNet-8 (n=1, ~0.08M parameters): the smallest CIFAR student."""
    return CifarResNet(8, num_classes, in_channels=in_channels)


def resnet14(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """ResNet-14 (n=2, ~0.18M parameters): a small CIFAR student."""
    return CifarResNet(14, num_classes, in_channels=in_channels)


def resnet20(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """ResNet-20 (n=3, ~0.27M parameters): the usual CIFAR distillation student."""
    return CifarResNet(20, num_classes, in_channels=in_channels)


def resnet32(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """ResNet-32 (n=5, ~0.47M parameters)."""
    return CifarResNet(32, num_classes, in_channels=in_channels)


def resnet44(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """ResNet-44 (n=7, ~0.66M parameters)."""
    return CifarResNet(44, num_classes, in_channels=in_channels)


def resnet56(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """ResNet-56 (n=9, ~0.86M parameters): a common CIFAR teacher."""
    return CifarResNet(56, num_classes, in_channels=in_channels)


def resnet110(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """ResNet-110 (n=18, ~1.7M parameters): the deepest CIFAR teacher of the paper's Table 6."""
    return CifarResNet(110, num_classes, in_channels=in_channels)


def mlp(num_classes: int = 10, in_features: int = 64, hidden: int = 256, depth: int = 2) -> nn.Module:
    """`depth` hidden Linear+ReLU layers then a linear head, over flattened features (the digits demo teacher)."""
    if depth < 0 or in_features < 1 or hidden < 1:
        raise KDCacheError(f"mlp needs in_features >= 1, hidden >= 1, depth >= 0; got {in_features}, {hidden}, {depth}")
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


_KDCACHE_MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet8": resnet8,
    "resnet14": resnet14,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet44": resnet44,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "mlp": mlp,
}


def list_models() -> list[str]:
    """The kdcache architecture names, in the order build_model tries them first."""
    return list(_KDCACHE_MODELS)


def _takes_num_classes(factory: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # builtins and some C callables have no signature: assume the convention
        return True
    return any(p.name == "num_classes" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _from_factory(name: str, num_classes: int, kwargs: dict[str, Any]) -> nn.Module:
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise KDCacheError(f"model {name!r}: expected package.module:factory")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise KDCacheError(f"model {name!r}: cannot import module {module_name!r} ({exc})".splitlines()[0]) from exc
    factory: Any = module
    try:
        for part in attr.split("."):
            factory = getattr(factory, part)
    except AttributeError as exc:
        raise KDCacheError(f"model {name!r}: module {module_name!r} has no attribute {attr!r}") from exc
    if not callable(factory):
        raise KDCacheError(f"model {name!r}: {attr!r} is not callable")
    try:
        if _takes_num_classes(factory):
            model = factory(num_classes=num_classes, **kwargs)
        else:
            model = factory(**kwargs)
    except KDCacheError:
        raise
    except Exception as exc:  # noqa: BLE001 - user code may raise anything
        raise KDCacheError(f"model {name!r}: the factory failed ({type(exc).__name__}: {exc})".splitlines()[0]) from exc
    if not isinstance(model, nn.Module):
        raise KDCacheError(f"model {name!r}: the factory returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _torchvision_names() -> list[str]:
    try:
        import torchvision.models
    except ImportError:
        return []
    return list(torchvision.models.list_models(module=torchvision.models))  # classification models only


TRUST_HINT = ("kdcache imports and runs a model's Python code only when asked: pass --trust-model-code "
              "(trust_model_code=True), as with transformers' trust_remote_code, and only for code you trust")


def data_kwargs(name: str, kwargs: dict[str, Any], sample: Any) -> dict[str, Any]:
    """The arguments a kdcache architecture takes from the data (mlp's input width, a CIFAR ResNet's input
    channels), so `--student mlp` runs on any feature table or image size without a flag; a value the user gave
    that disagrees with the data is a one-line error. `sample` is one batch of model input."""
    if name not in _KDCACHE_MODELS or sample is None:
        return dict(kwargs)
    if isinstance(sample, dict):
        raise KDCacheError(f"student {name!r} reads tensors (images or features), but this task's rows are token "
                           "ids; use a Hugging Face model folder or config .json")
    shape = tuple(int(d) for d in sample.shape[1:])
    derived: dict[str, int] = {}
    if name == "mlp":
        derived["in_features"] = int(torch.Size(shape).numel())
    elif len(shape) == 3:
        if shape[0] != 3 or "in_channels" in kwargs:  # recorded only where it differs from RGB's default
            derived["in_channels"] = shape[0]
    else:
        raise KDCacheError(f"student {name!r} is a convolutional network for images, but this task's rows are "
                           f"vectors of {int(torch.Size(shape).numel())} values; use mlp or another model")
    for key, value in derived.items():
        if key in kwargs and int(kwargs[key]) != value:
            raise KDCacheError(f"student {name!r}: {key}={kwargs[key]} was given, but this task's rows "
                               f"({'x'.join(map(str, shape))}) need {key}={value}")
    return {**kwargs, **derived}


#: Bytes a parameter costs in training: float32 weights, gradients and Adam's two moments.
TRAINING_BYTES_PER_PARAMETER = 16


def check_model_size(make: Callable[[], nn.Module], what: str) -> None:
    """Build the model on the meta device (no memory) and refuse, in one line, one whose training state could not fit
    in this machine's memory: `--student-kwargs '{"hidden": 10**9}'` must not end in an allocator's traceback."""
    from kdcache.names import total_memory

    try:
        with torch.device("meta"):
            probe = make()
    except KDCacheError:
        raise
    except Exception:  # noqa: BLE001 - a model that cannot be built on meta is sized by its real build instead
        return
    count = sum(p.numel() for p in probe.parameters())
    need, have = count * TRAINING_BYTES_PER_PARAMETER, total_memory()
    if cuda_free := _cuda_total():
        have = max(have, cuda_free)
    if need > have:
        raise KDCacheError(f"{what}: {count:,} parameters need about {need / 1024**3:,.1f} GiB to train (weights, "
                           f"gradients, optimiser state), more than this machine's {have / 1024**3:,.1f} GiB; "
                           "choose smaller sizes")


def _cuda_total() -> int:
    try:
        return int(torch.cuda.get_device_properties(0).total_memory) if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001
        return 0


def allocation_guard(what: str) -> Any:
    """Turn an allocator's failure while building a model into one line naming the model."""
    import contextlib

    @contextlib.contextmanager
    def guard() -> Iterator[None]:
        try:
            yield
        except (MemoryError, torch.OutOfMemoryError) as exc:
            raise KDCacheError(f"{what}: out of memory while building it; choose smaller sizes") from exc
        except RuntimeError as exc:
            if "allocate" not in str(exc):
                raise
            raise KDCacheError(f"{what}: out of memory while building it ({str(exc).splitlines()[0][-120:]}); "
                               "choose smaller sizes") from exc

    return guard()


def build_model(name: str, num_classes: int, *, trust_model_code: bool = False, **kwargs: Any) -> nn.Module:
    """Build an untrained classifier by name: a kdcache name, then a torchvision name, then `module:factory`,
    which imports and runs user code and so needs `trust_model_code`. Sizes that could not train on this machine
    are refused before any memory is taken."""
    what = f"model {name!r}" + (f" with {kwargs}" if kwargs else "")
    if ":" not in name:
        check_model_size(lambda: _build_by_name(name, num_classes, trust_model_code, kwargs), what)
    with allocation_guard(what):
        return _build_by_name(name, num_classes, trust_model_code, kwargs)


def _build_by_name(name: str, num_classes: int, trust_model_code: bool, kwargs: dict[str, Any]) -> nn.Module:
    if name in _KDCACHE_MODELS:
        try:
            return _KDCACHE_MODELS[name](num_classes=num_classes, **kwargs)
        except TypeError as exc:
            raise KDCacheError(f"model {name!r}: bad arguments {sorted(kwargs)} ({exc})".splitlines()[0]) from exc
    if ":" in name:
        if not trust_model_code:
            raise KDCacheError(f"model {name!r} is Python code (module:factory); {TRUST_HINT}")
        return _from_factory(name, num_classes, kwargs)
    if name in _torchvision_names():
        if kwargs.get("weights") is not None or kwargs.get("pretrained"):
            raise KDCacheError(f"model {name!r}: kdcache never downloads weights; load them from the model folder")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("weights", "pretrained")}
        import torchvision.models

        try:
            return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
        except Exception as exc:  # noqa: BLE001 - torchvision raises ValueError/TypeError on bad arguments
            raise KDCacheError(f"model {name!r}: torchvision cannot build it ({type(exc).__name__}: {exc})".splitlines()[0]) from exc
    raise KDCacheError(
        f"unknown model {name!r}; kdcache models: {', '.join(list_models())}; also accepted: any torchvision "
        "classification model name (e.g. resnet18) and package.module:factory"
    )


__all__ = ["BasicBlock", "CifarResNet", "build_model", "data_kwargs", "list_models", "mlp", "resnet8", "resnet14", "resnet20",
           "resnet32", "resnet44", "resnet56", "resnet110"]
