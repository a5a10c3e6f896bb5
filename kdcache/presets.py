"""Every default of `distill` and `train`, in one visible place (reasons in docs/methods.md).

`cifar` and `glue` are the paper's settings (section 5: CIFAR 200 epochs, T_max 20, lr 0.2, batch 32, Eq. 7;
GLUE 30 epochs, T_max 10, lr 2e-5, batch 64, Eq. 8). What the paper leaves open (optimiser, margin, weight
decay, warm-up, clipping, Vanilla-KD's T and alpha, Annealing-KD's stage length) is ours and marked so in the
docs. `small` serves feature-vector tasks such as the bundled digits. `--preset auto` picks by modality.
"""

from __future__ import annotations

from typing import Any

from kdcache.errors import KDCacheError

METHODS = ("continuation", "vanilla", "annealing", "ce", "prokd", "curriculum")
#: The logit losses `prokd` and the last phase of `curriculum` can use (--kd-loss; vanilla by default).
KD_LOSSES = ("vanilla", "continuation")

PRESETS: dict[str, dict[str, Any]] = {
    "cifar": {
        "epochs": 200, "t_max": 20, "lr": 0.2, "batch_size": 32, "psi": "cifar", "margin": 1.0,
        "optimizer": "sgd", "weight_decay": 5e-4, "momentum": 0.9, "lr_schedule": "cosine", "warmup_ratio": 0.0,
        "max_grad_norm": 1.0, "temperature": 4.0, "alpha": 0.5, "anneal_fraction": 0.75,
    },
    "glue": {
        "epochs": 30, "t_max": 10, "lr": 2e-5, "batch_size": 64, "psi": "glue", "margin": 1.0,
        "optimizer": "adamw", "weight_decay": 0.01, "momentum": 0.9, "lr_schedule": "linear", "warmup_ratio": 0.06,
        "max_grad_norm": 1.0, "temperature": 4.0, "alpha": 0.5, "anneal_fraction": 2 / 3,
    },
    "small": {
        "epochs": 30, "t_max": 10, "lr": 1e-3, "batch_size": 64, "psi": "glue", "margin": 1.0,
        "optimizer": "adamw", "weight_decay": 0.0, "momentum": 0.9, "lr_schedule": "constant", "warmup_ratio": 0.0,
        "max_grad_norm": None, "temperature": 4.0, "alpha": 0.5, "anneal_fraction": 2 / 3,
    },
}
AUTO_PRESET = {"text": "glue", "image": "cifar", "features": "small"}


def resolve(preset: str, modality: str, overrides: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The preset's values with every flag the user gave (not None) on top; returns (preset name, values)."""
    name = AUTO_PRESET.get(modality, "small") if preset == "auto" else preset
    if name not in PRESETS:
        raise KDCacheError(f"--preset {preset!r} is not one of auto, {', '.join(PRESETS)}")
    values = dict(PRESETS[name])
    values.update({k: v for k, v in overrides.items() if v is not None})
    return name, values


def anneal_epochs(values: dict[str, Any], epochs: int, given: int | None) -> int:
    """Annealing-KD's stage-1 length K: as given, else the preset's fraction of the run (150 of 200, 20 of 30)."""
    k = given if given is not None else min(epochs - 1, max(1, round(values["anneal_fraction"] * epochs)))
    if not 1 <= k < epochs:
        raise KDCacheError(f"Annealing-KD needs 1 <= --anneal-epochs < --epochs ({epochs}), got {k}")
    return k
