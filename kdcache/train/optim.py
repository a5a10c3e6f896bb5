"""The optimiser and the learning-rate schedule of a student run, by name (the presets' values are in config.py)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from kdcache.errors import KDCacheError

OPTIMIZERS = ("sgd", "adamw", "adam")
LR_SCHEDULES = ("constant", "linear", "cosine")


def build_optimizer(name: str, model: nn.Module, *, lr: float, weight_decay: float,
                    momentum: float = 0.9, compiling: bool = False) -> torch.optim.Optimizer:
    """SGD (momentum) or Adam(W); biases and normalisation weights (1-d tensors) get no weight decay. Unless the
    run compiles, the optimiser runs without torch._dynamo (see `without_dynamo`)."""
    if name not in OPTIMIZERS:
        raise KDCacheError(f"--optimizer {name!r} is not one of {', '.join(OPTIMIZERS)}")
    if not (lr > 0 and math.isfinite(lr)):
        raise KDCacheError(f"--lr must be a positive number, got {lr}")
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name]
    if not compiling:
        _skip_dynamo_guards(cls)
    # on the GPU, torch's fused kernels: one launch for every parameter instead of a few per tensor
    fused = {"fused": True} if decay + no_decay and all(p.is_cuda for p in decay + no_decay) else {}
    optimizer = (cls(groups, lr=lr, momentum=momentum, nesterov=momentum > 0, **fused) if name == "sgd"
                 else cls(groups, lr=lr, **fused))
    return optimizer if compiling else without_dynamo(optimizer)


def _skip_dynamo_guards(*classes: type) -> None:
    """torch marks a few optimiser and scheduler methods `_disable_dynamo`, which imports torch._dynamo (over a
    second of start-up) on their first call just to wrap them; when nothing is compiled there is nothing to guard
    against, so each is given itself as its disabled form (the attribute torch caches that form in). Skipped when
    torch._dynamo is already loaded (it costs nothing then), or when torch no longer works this way. It lasts for
    the process: a later torch.compile in the same process may trace into these few methods, which is harmless."""
    import sys

    if "torch._dynamo" in sys.modules:
        return
    try:
        import torch._compile

        probe = torch._compile._disable_dynamo(lambda: None).__code__
    except (ImportError, AttributeError):
        return
    for cls in classes:
        for klass in cls.__mro__:
            for attr in vars(klass).values():
                if getattr(attr, "__code__", None) is probe:
                    attr.__wrapped__.__dynamo_disable = attr.__wrapped__


def without_dynamo(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimiser's own step under torch.no_grad, without the wrapper that imports torch._dynamo to insert a graph
    break (meaningful only under torch.compile) and calls profiler hooks (unused here): the same update, computed
    by the same code, without the second of start-up the import costs."""
    import types

    raw = type(optimizer).step
    while hasattr(raw, "__wrapped__"):
        raw = raw.__wrapped__

    def step(self: torch.optim.Optimizer, closure: Any = None) -> Any:
        with torch.no_grad():
            return raw(self, closure)

    optimizer.step = types.MethodType(step, optimizer)
    return optimizer


def build_lr_schedule(name: str, optimizer: torch.optim.Optimizer, *, total_steps: int,
                      warmup_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then constant, linear decay to 0, or cosine decay to 0, stepped once per optimiser step."""
    if name not in LR_SCHEDULES:
        raise KDCacheError(f"--lr-schedule {name!r} is not one of {', '.join(LR_SCHEDULES)}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if name == "linear":
            return 1.0 - progress
        if name == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    _skip_dynamo_guards(torch.optim.lr_scheduler.LambdaLR)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


__all__ = ["LR_SCHEDULES", "OPTIMIZERS", "build_lr_schedule", "build_optimizer"]
