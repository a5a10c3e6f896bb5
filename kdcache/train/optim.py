"""The optimiser and the learning-rate schedule of a student run, by name (the presets' values are in config.py)."""

from __future__ import annotations

import math

import torch
from torch import nn

from kdcache.errors import KDCacheError

OPTIMIZERS = ("sgd", "adamw", "adam")
LR_SCHEDULES = ("constant", "linear", "cosine")


def build_optimizer(name: str, model: nn.Module, *, lr: float, weight_decay: float,
                    momentum: float = 0.9) -> torch.optim.Optimizer:
    """SGD (momentum) or Adam(W); biases and normalisation weights (1-d tensors) get no weight decay."""
    if name not in OPTIMIZERS:
        raise KDCacheError(f"--optimizer {name!r} is not one of {', '.join(OPTIMIZERS)}")
    if not (lr > 0 and math.isfinite(lr)):
        raise KDCacheError(f"--lr must be a positive number, got {lr}")
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr)
    return torch.optim.AdamW(groups, lr=lr)


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

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


__all__ = ["LR_SCHEDULES", "OPTIMIZERS", "build_lr_schedule", "build_optimizer"]
