"""Plain training on the hard labels: `kdcache train`, and the no-teacher baseline of `distill --method ce`.

Cross-entropy for classification, mean squared error for regression (STS-B, the noise toy): which is why reports
call this objective `ce` or `mse` by the task's kind.
"""

from __future__ import annotations

import torch

from kdcache.methods import losses, targets
from kdcache.methods.base import Method, Run, StepPlan


class CrossEntropy(Method):
    name = "ce"
    needs_cache = False

    def setup(self, run: Run) -> None:
        super().setup(run)
        if run.cache is None:
            self.teacher_array = None  # `kdcache train`: labels only
        elif self.options.checkpoint is None and targets.target_kind(run.cache) != "dense":
            self.teacher_array = run.cache.target.arrays[0]  # served beside the labels, never read by the loss

    def arrays(self) -> tuple[str, ...]:
        return () if self.teacher_array is None else (self.teacher_array,)

    per_token = True

    def loss(self, output: torch.Tensor, target: torch.Tensor | None, labels: torch.Tensor,
             plan: StepPlan, mask: torch.Tensor | None = None) -> torch.Tensor:
        return losses.ce(output, labels, kind=self.loss_kind)  # (a masked row's label is -1: skipped)

    def display_name(self, kind: str) -> str:
        return "mse" if kind == "regression" else "ce"
