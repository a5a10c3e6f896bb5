"""Vanilla KD (Hinton et al., 2015): the hard-label loss mixed with the KL divergence to the softened teacher."""

from __future__ import annotations

from typing import Any

import torch

from kdcache.methods import losses
from kdcache.methods.base import Method, StepPlan


class VanillaKD(Method):
    name = "vanilla"
    # Hinton et al. leave T and alpha to the task; T = 4, alpha = 0.5 are the common choice (docs/methods.md)
    defaults = {preset: {"temperature": 4.0, "alpha": 0.5} for preset in ("cifar", "glue", "small")}

    def values(self, epoch: int, step: int, n: int) -> dict[str, Any]:
        return {"T": float(self.run.hp["temperature"]), "alpha": float(self.run.hp["alpha"])}

    def loss(self, output: torch.Tensor, target: torch.Tensor | None, labels: torch.Tensor,
             plan: StepPlan) -> torch.Tensor:
        return losses.vanilla_kd_loss(output, target, labels, temperature=plan.values["T"],
                                      alpha=plan.values["alpha"], kind=self.run.kind)
