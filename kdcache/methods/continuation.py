"""Continuation-KD (Jafari et al., 2022), the default: a hinge on the distance to the annealed teacher, with the
hard-label weight psi rising as the teacher's temperature T falls (Algorithm 1; docs/methods.md)."""

from __future__ import annotations

from typing import Any

import torch

from kdcache.errors import KDCacheError
from kdcache.methods import losses, schedules, sparse_losses
from kdcache.names import PHI_ON
from kdcache.methods.base import Method, Run, StepPlan
from kdcache.methods.targets import TopKTarget

#: The paper's presets (section 5): CIFAR T_max 20 and psi Eq. 7, GLUE T_max 10 and psi Eq. 8; the margin m is
#: not given by the paper (docs/methods.md says why 1.0).
ANNEALED_DEFAULTS = {
    "cifar": {"t_max": 20, "psi": "cifar", "margin": 1.0},
    "glue": {"t_max": 10, "psi": "glue", "margin": 1.0},
    "small": {"t_max": 10, "psi": "glue", "margin": 1.0},
    "text-scratch": {"t_max": 10, "psi": "glue", "margin": 1.0},
    "lm": {"t_max": 10, "psi": "glue", "margin": 1.0},
}


def scale_to_run(values: dict[str, Any], given: frozenset[str], preset_epochs: int, absolute: bool) -> list[str]:
    """Continuation-KD's preset psi and T_max over values["epochs"] epochs, in place; the phrases of what changed."""
    n, notes = int(values["epochs"]), []
    if absolute or n == preset_epochs or n < 2:  # one epoch has no shape to keep: psi(1) would be 1 (all CE)
        return notes
    psi = schedules.parse_psi(str(values["psi"]))
    if "psi" not in given and psi.form in schedules.PAPER_EPOCHS and psi.param is None:
        values["psi"] = f"{psi.form}:{n}"
        notes.append(f"psi {psi.spec} -> {values['psi']}")
    if "t_max" not in given and int(values["t_max"]) > n:
        notes.append(f"T_max {values['t_max']} -> {n}")
        values["t_max"] = n
    return notes


#: Fewer optimiser steps than this in all and Continuation-KD came last in the short runs we measured (docs/benchmarks.md,
#: "Short runs"): the hinge regresses the student onto the teacher's logits, and a regression fits their class means
#: before their per-row differences (digits MLP, validation accuracy: 115 steps 0.18 against vanilla KD's 0.78 over
#: 5 seeds; over 3 seeds 230 steps 0.65 vs 0.88, 345 steps 0.76 vs 0.90, 460 steps 0.89 vs 0.92, 690 steps 0.95 vs
#: 0.94; CIFAR-10 ResNet-8, 470 steps: ahead of vanilla KD). A rule of thumb from two tasks, said as a note, not enforced.
FEW_STEPS = 400


class ContinuationKD(Method):
    name = "continuation"
    accepts = ("checkpoint", "phi_on")
    defaults = ANNEALED_DEFAULTS
    target_kinds = ("dense", "topk")  # a sampled row proves no logit distance (docs/methods.md)
    per_token = True

    @classmethod
    def fit_schedules(cls, values: dict[str, Any], given: frozenset[str], preset_epochs: int,
                      absolute: bool) -> list[str]:
        """A run shorter or longer than the preset's keeps the paper's shape, not its absolute epochs: psi is Eq. 7
        or 8 over the run's n epochs and T_max is at most n, so T reaches 1 (docs/methods.md, "Presets")."""
        return scale_to_run(values, given, preset_epochs, absolute)

    def setup(self, run: Run) -> None:
        super().setup(run)
        schedules.parse_psi(run.hp["psi"])  # a bad spec is one line before any work
        if run.kind == "lm" and self.options.reduction in losses.WHOLE_BATCH:
            raise KDCacheError(f"--reduction {self.options.reduction} is one hinge on the whole batch's mean distance, "
                               "which the token loss, computed a chunk of positions at a time, does not form: use "
                               "sample or element with a language-model cache")
        if self.options.phi_on not in (None, *PHI_ON):  # (the CLI checks too; the API and sweep files come here)
            raise KDCacheError(f"--phi-on {self.options.phi_on!r} is not one of {', '.join(PHI_ON)}")

    def advice(self) -> str | None:
        """A note where our measurements put Continuation-KD behind Vanilla KD: short runs, and token targets."""
        steps = self.run.epochs * self.run.steps_per_epoch
        if self.run.kind == "lm":
            return ("note: on tokens Continuation-KD came last in our runs (Tiny Shakespeare, 400 steps: validation "
                    "perplexity 149 against 93 for --method vanilla and 104 for the tokens alone; docs/benchmarks.md, "
                    "\"Token-level targets\"): use --method vanilla unless you have measured otherwise")
        if steps >= FEW_STEPS:
            return None
        return (f"note: this run has {steps:,} optimiser steps in all; Continuation-KD regresses the student onto the "
                f"teacher's logits and came last in our runs of under {FEW_STEPS} steps (docs/benchmarks.md, "
                "\"Short runs\"): give it more epochs, or use --method vanilla")

    def values(self, epoch: int, step: int, n: int) -> dict[str, Any]:
        """T_i, phi(T_i) and psi(i); per step, T counts down over the run's steps and psi reads the real position."""
        t_max, per_epoch = int(self.run.hp["t_max"]), self.run.steps_per_epoch
        if self.run.unit == "step":
            T = schedules.temperature(step + 1, n * per_epoch, t_max)
            position = schedules.epoch_position(step, per_epoch)
        else:
            T, position = schedules.temperature(epoch, n, t_max), epoch
        values = {"T": T, "phi": schedules.phi(T, t_max), "psi": schedules.psi(self.run.hp["psi"], position, n)}
        on = self.options.phi_on or "both"
        if on != "both":  # Table 7's ablation: phi anneals only the teacher, only the margin, or neither
            values["phi_teacher"] = values["phi"] if on == "teacher" else 1.0
            values["phi_margin"] = values["phi"] if on == "margin" else 1.0
        return values

    def loss(self, output: torch.Tensor, target: Any, labels: torch.Tensor, plan: StepPlan,
             mask: torch.Tensor | None = None) -> torch.Tensor:
        v = plan.values
        if isinstance(target, TopKTarget):  # the kept logits, and the others held below the smallest kept one
            return sparse_losses.topk_continuation_kd_loss(
                output, target.values, target.indices, labels, phi=v.get("phi_teacher", v["phi"]), psi=v["psi"],
                margin=float(self.run.hp["margin"]), reduction=self.options.reduction, phi_margin=v.get("phi_margin"),
                mask=mask)
        return losses.continuation_kd_loss(output, target, labels, phi=v.get("phi_teacher", v["phi"]), psi=v["psi"],
                                           margin=float(self.run.hp["margin"]), reduction=self.options.reduction,
                                           kind=self.loss_kind, phi_margin=v.get("phi_margin"), mask=mask)
