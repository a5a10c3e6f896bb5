"""The training presets (`--preset`): epochs, optimiser and schedule per kind of run, in a module that imports
nothing, so that methods/ (which fit their schedules to a preset's epochs) and train/ (which resolves a run's
settings) both read it without an arrow pointing up. `kdcache.train.config` re-exports it; docs/methods.md says
which values are the paper's and which are ours.
"""

from __future__ import annotations

from typing import Any

TRAINING_PRESETS: dict[str, dict[str, Any]] = {
    "cifar": {"epochs": 200, "lr": 0.2, "batch_size": 32, "optimizer": "sgd", "weight_decay": 5e-4, "momentum": 0.9,
              "lr_schedule": "cosine", "warmup_ratio": 0.0, "max_grad_norm": 1.0},
    "glue": {"epochs": 30, "lr": 2e-5, "batch_size": 64, "optimizer": "adamw", "weight_decay": 0.01, "momentum": 0.9,
             "lr_schedule": "linear", "warmup_ratio": 0.06, "max_grad_norm": 1.0},
    "small": {"epochs": 30, "lr": 1e-3, "batch_size": 64, "optimizer": "adamw", "weight_decay": 0.0, "momentum": 0.9,
              "lr_schedule": "constant", "warmup_ratio": 0.0, "max_grad_norm": None},
    "text-scratch": {"epochs": 30, "lr": 1e-4, "batch_size": 64, "optimizer": "adamw", "weight_decay": 0.01,
                     "momentum": 0.9, "lr_schedule": "linear", "warmup_ratio": 0.06, "max_grad_norm": 1.0},
    # causal-LM students of a token-level cache: the values `train --task lm` trains its teachers with
    "lm": {"epochs": 10, "lr": 3e-4, "batch_size": 32, "optimizer": "adamw", "weight_decay": 0.1, "momentum": 0.9,
           "lr_schedule": "cosine", "warmup_ratio": 0.05, "max_grad_norm": 1.0},
}

__all__ = ["TRAINING_PRESETS"]
