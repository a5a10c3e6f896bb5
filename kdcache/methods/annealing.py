"""Annealing-KD (Jafari et al., 2021): stage 1 regresses the student onto the annealed teacher (no labels),
stage 2 trains on the hard labels from the best stage-1 student. Continuation-KD with m = 0 and psi a 0/1 step."""

from __future__ import annotations

from typing import Any

import torch

from kdcache.errors import KDCacheError
from kdcache.methods import losses, schedules, sparse_losses
from kdcache.methods.base import Method, Run, StepPlan
from kdcache.methods.targets import TopKTarget
from kdcache.methods.continuation import ANNEALED_DEFAULTS
from kdcache.names import better

#: Stage 1's share of the run when --anneal-epochs is not given, as the authors' code splits it
#: (huawei-noah/Efficient-NLP, Annealing_KD): CIFAR 200 + 100 epochs, GLUE 10 + 3.
ANNEAL_FRACTION = {"cifar": 2 / 3, "glue": 10 / 13, "small": 2 / 3, "text-scratch": 10 / 13, "lm": 10 / 13}


def anneal_epochs(fraction: float, epochs: int, given: int | None) -> int:
    """Stage 1's length K: as given, else the preset's fraction of the run, kept within 1 <= K < epochs."""
    if given is None:
        if epochs < 2:
            raise KDCacheError(f"Annealing-KD needs at least 2 epochs (one per stage), got --epochs {epochs}")
        return min(epochs - 1, max(1, round(fraction * epochs)))
    if not 1 <= given < epochs:
        raise KDCacheError(f"Annealing-KD needs 1 <= --anneal-epochs < --epochs ({epochs}), got {given}")
    return given


def check_reaches_one(t_max: int, k: int) -> None:
    """Stage 1 must end on the teacher itself (phi = 1): the authors' script asserts that its first phase is at
    least max-temperature epochs long, since T moves at most one step per epoch; so do we, in one line."""
    if t_max > k:
        raise KDCacheError(f"Annealing-KD: --t-max {t_max} is more than stage 1's {k} epochs (--anneal-epochs); "
                           "stage 1 must be at least T_max epochs long for phi to reach 1 by its end, as the authors' "
                           f"script asserts: pass --t-max {k} or less, or a longer stage 1")


class AnnealingKD(Method):
    name = "annealing"
    accepts = ("checkpoint", "anneal_continuous")
    defaults = {p: {"t_max": v["t_max"], "anneal_fraction": ANNEAL_FRACTION[p]} for p, v in ANNEALED_DEFAULTS.items()}
    target_kinds = ("dense", "topk")
    per_token = True

    @classmethod
    def fit_schedules(cls, values: dict[str, Any], given: frozenset[str], preset_epochs: int,
                      absolute: bool) -> list[str]:
        """T_max capped at stage 1's length K at every run length (absolute or not), so that T reaches 1 and phi 1
        by the end of stage 1, as the authors' script requires; a --t-max above K is refused (`check_reaches_one`)."""
        k = anneal_epochs(float(values["anneal_fraction"]), int(values["epochs"]), values.get("anneal_epochs"))
        t_max = int(values["t_max"])
        if t_max <= k:
            return []
        if "t_max" in given:
            check_reaches_one(t_max, k)
        values["t_max"] = k
        return [f"T_max {t_max} -> {k} (at most stage 1's {k} epochs, so that phi reaches 1)"]

    def setup(self, run: Run) -> None:
        super().setup(run)
        self.k = anneal_epochs(float(run.hp["anneal_fraction"]), run.epochs, run.hp.get("anneal_epochs"))
        run.hp["anneal_epochs"] = self.k
        check_reaches_one(int(run.hp["t_max"]), self.k)
        self.stage1_best: dict[str, Any] | None = None

    def restart_epochs(self) -> tuple[int, ...]:
        """Stage 2 is a run of its own, with a fresh optimiser and learning-rate schedule over its epochs, as the
        authors' code trains it (both their CIFAR and GLUE scripts); --anneal-continuous keeps stage 1's."""
        return () if self.options.anneal_continuous else (self.k + 1,)

    def values(self, epoch: int, step: int, n: int) -> dict[str, Any]:
        if epoch > self.k:
            return {"stage": 2, "T": 1, "phi": 1.0, "psi": 1.0}
        t_max = int(self.run.hp["t_max"])
        if self.run.unit == "step":
            T = schedules.temperature(step + 1, self.k * self.run.steps_per_epoch, t_max)
        else:
            T = schedules.temperature(epoch, self.k, t_max)
        return {"stage": 1, "T": T, "phi": schedules.phi(T, t_max), "psi": 0.0}

    def loss(self, output: torch.Tensor, target: Any, labels: torch.Tensor, plan: StepPlan,
             mask: torch.Tensor | None = None) -> torch.Tensor:
        if plan.values["stage"] == 2:
            return losses.ce(output, labels, kind=self.loss_kind)
        if isinstance(target, TopKTarget):
            return sparse_losses.topk_annealing_kd_loss(output, target.values, target.indices, phi=plan.values["phi"],
                                                        mean_outputs=self.options.reduction in ("element", "mse"),
                                                        mask=mask)
        return losses.annealing_kd_loss(output, target, phi=plan.values["phi"],
                                        mean_outputs=self.options.reduction in ("element", "mse"), mask=mask)

    def start_epoch(self, epoch: int, student: Any) -> None:
        if epoch == self.k + 1 and self.stage1_best is not None:
            student.model.load_state_dict(self.stage1_best["model"])  # stage 2 starts from the best stage-1 student

    def end_epoch(self, epoch: int, student: Any, metric: float) -> None:
        if epoch <= self.k and (self.stage1_best is None or better(metric, self.stage1_best["metric"], self.run.kind)):
            self.stage1_best = {"metric": metric, "epoch": epoch,
                                "model": {k: v.detach().cpu().clone() for k, v in student.model.state_dict().items()}}

    def state_dict(self) -> dict[str, Any]:
        return {"stage1_best": self.stage1_best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stage1_best = state.get("stage1_best")
