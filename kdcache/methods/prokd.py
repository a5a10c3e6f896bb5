"""Pro-KD (Rezagholizadeh et al., arXiv:2110.08532): the student follows the teacher's training checkpoints in
order, the trained teacher last, each for a block of epochs (or of optimiser steps); the logit loss of each block
is vanilla KD or Continuation-KD (`--kd-loss`). The checkpoints' logits are cached arrays (`checkpoint_k`)."""

from __future__ import annotations

from typing import Any

import torch

from kdcache.errors import KDCacheError
from kdcache.methods import schedules, targets
from kdcache.methods.base import Method, MethodOptions, Run, StepPlan
from kdcache.methods.continuation import ContinuationKD
from kdcache.methods.vanilla import VanillaKD

#: The logit losses Pro-KD and curriculum extraction's final phase use (--kd-loss), vanilla by default.
KD_LOSSES: dict[str, type[Method]] = {"vanilla": VanillaKD, "continuation": ContinuationKD}


def inner_method(options: MethodOptions) -> Method:
    """The logit loss a curriculum runs inside its blocks or phases."""
    name = options.kd_loss or "vanilla"
    if name not in KD_LOSSES:
        raise KDCacheError(f"--kd-loss {name!r} is not one of {', '.join(KD_LOSSES)}")
    return KD_LOSSES[name](MethodOptions(reduction=options.reduction))


def both_defaults() -> dict[str, dict[str, Any]]:
    """The hyper-parameters of either logit loss, per preset (--kd-loss picks one at run time)."""
    return {p: {**VanillaKD.defaults[p], **ContinuationKD.defaults[p]} for p in ContinuationKD.defaults}


def checkpoint_arrays(checkpoints: list[dict[str, Any]], where: str) -> list[str]:
    """The cache arrays Pro-KD walks through, in training order; a cache without checkpoints is refused."""
    if not checkpoints:
        raise KDCacheError(f"{where}: stores no teacher checkpoints, which --method prokd follows; cache them with "
                           "kdcache cache-teacher --checkpoints 'RUN/checkpoints/epoch-*'")
    return [str(c["array"]) for c in checkpoints]


def block_lengths(spec: str | None, k: int, n: int) -> list[int] | None:
    """Epochs per checkpoint from `--phase-epochs` (None: equal blocks). K numbers must sum to n; K-1 numbers (or
    one number, repeated K-1 times) leave the rest of the run to the trained teacher, which must get an epoch."""
    if not spec:
        return None
    try:
        lengths = [int(x) for x in spec.split(",")]
    except ValueError:
        raise KDCacheError(f"--phase-epochs {spec!r}: expected comma-separated epoch counts, e.g. 2,2,6") from None
    if len(lengths) == 1 and k > 2:
        lengths = lengths * (k - 1)
    if len(lengths) == k - 1:
        lengths.append(n - sum(lengths))
    if len(lengths) != k or min(lengths) < 1 or sum(lengths) != n:
        raise KDCacheError(f"--phase-epochs {spec!r}: Pro-KD needs {k} positive epoch counts summing to {n} (one per "
                           f"checkpoint), or {k - 1} and the trained teacher takes the rest")
    return lengths


def checkpoint_position(epoch: int, n: int, step: int, steps_per_epoch: int, k: int, unit: str,
                        lengths: list[int] | None = None) -> int:
    """The checkpoint (0-based) in use: blocks of epochs, or of optimiser steps with --schedule-unit step; with
    `lengths` (from --phase-epochs) the given number of epochs per checkpoint, switching at epoch boundaries."""
    if lengths is not None:
        total = 0
        for index, length in enumerate(lengths):
            total += length
            if epoch <= total:
                return index
        return len(lengths) - 1
    if unit == "step":
        if n * steps_per_epoch < k:
            raise KDCacheError(f"Pro-KD needs at least one optimiser step per teacher checkpoint: {n * steps_per_epoch} "
                               f"steps < {k} checkpoints")
        return schedules.prokd_checkpoint(step + 1, n * steps_per_epoch, k)
    return schedules.prokd_checkpoint(epoch, n, k)


class ProKD(Method):
    name = "prokd"
    accepts = ("kd_loss", "phase_epochs")
    refusals = {"checkpoint": "--checkpoint picks one teacher checkpoint; --method prokd follows all of them in turn"}
    defaults = both_defaults()
    # the checkpoints are stored dense; the trained teacher's own phase reads the cache's top-k rows (both logit
    # losses accept them; a sampled cache would train its last phase at RS-KD's T = 1, its others at T)
    target_kinds = ("dense", "topk")
    per_token = True  # a language-model cache's checkpoints are dense logits per token, [N, S, C]

    def setup(self, run: Run) -> None:
        super().setup(run)
        self.inner = inner_method(self.options)
        self.checkpoints = run.cache.checkpoints
        self.names = [str(c.get("name")) for c in self.checkpoints]
        self.order = checkpoint_arrays(self.checkpoints, run.where)
        # every checkpoint needs at least one epoch (or step) of its own: checked now
        checkpoint_position(1, run.epochs, 0, run.steps_per_epoch, len(self.order), run.unit)
        self.lengths = block_lengths(self.options.phase_epochs, len(self.order), run.epochs)
        run.hp["kd_loss"] = self.inner.name
        self.inner.setup(run)

    def _served(self, array: str) -> tuple[str, ...]:
        """The arrays one phase reads: a checkpoint's dense logits, or the trained teacher's target."""
        sparse = array == self.teacher_array and self.target_kind != "dense"
        return targets.KIND_ARRAYS[self.target_kind] if sparse else (array,)

    def arrays(self) -> tuple[str, ...]:
        return tuple(a for array in self.order for a in self._served(array))

    def epoch_arrays(self, epoch: int) -> tuple[str, ...]:
        if self.run.unit == "step" and self.lengths is None:  # equal blocks of steps switch within an epoch
            return self.arrays()
        return self._served(self.plan(epoch, (epoch - 1) * self.run.steps_per_epoch).array)

    def plan(self, epoch: int, step: int) -> StepPlan:
        k = checkpoint_position(epoch, self.run.epochs, step, self.run.steps_per_epoch, len(self.order),
                                self.run.unit, self.lengths)
        values = {**self.inner.values(epoch, step, self.run.epochs), "checkpoint": self.names[k]}
        return StepPlan(self.order[k], values)

    def loss(self, output: torch.Tensor, target: torch.Tensor | None, labels: torch.Tensor,
             plan: StepPlan, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.inner.loss(output, target, labels, plan, mask=mask)

    def identity(self) -> dict[str, Any]:
        return {"checkpoints_sha256": [c.get("sha256") for c in self.checkpoints]}

    def describe(self) -> dict[str, Any]:
        return {"checkpoints": self.names}
