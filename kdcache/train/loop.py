"""One epoch of optimiser steps for one student: the body of the training loop, testable alone.

The method decides everything that differs between methods (which cached array each step reads, what is
compared, the loss); this loop only moves tensors, steps the optimiser and watches for divergence. It never asks
the method its name.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from kdcache.errors import Interrupted, KDCacheError
from kdcache.methods import Method
from kdcache.runtime import autocast
from kdcache.train.inputs import StudentInputs


@dataclass
class Stepper:
    """What every step of a run uses: the student, its method, the optimiser and its schedule, the precision."""

    student: Any
    method: Method
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    device: torch.device
    precision: str = "fp32"
    max_grad_norm: float | None = None
    parameters: list[torch.nn.Parameter] = field(default_factory=list)  # what gradient clipping covers


@dataclass
class EpochResult:
    step: int  # optimiser steps taken over the run after this epoch
    loss: float  # mean loss per row
    rows: int
    values: dict[str, Any]  # the method's values at the epoch's last step
    lr: float | None


def train_epoch(s: Stepper, batches: Any, inputs: StudentInputs, epoch: int, step: int,
                on_step: Callable[[float], None] = lambda loss: None) -> EpochResult:
    """Run the minibatches of `epoch` (an order fixed by the seed and the epoch) starting at global step `step`."""
    s.student.model.train()
    s.method.start_epoch(epoch, s.student)
    loss_sum, rows_seen, plan, lr = 0.0, 0, None, None
    for rows, teacher, labels in batches.epoch(epoch, s.method.epoch_arrays(epoch) or None):
        plan = s.method.plan(epoch, step)
        target = teacher[plan.array] if isinstance(teacher, dict) else teacher
        with autocast(s.device, s.precision):
            output = s.method.forward(s.student, inputs.batch(rows), plan)
        loss = s.method.loss(output, target, labels, plan)
        s.optimizer.zero_grad(set_to_none=True)
        s.scaler.scale(loss).backward()
        if s.max_grad_norm:
            s.scaler.unscale_(s.optimizer)
            torch.nn.utils.clip_grad_norm_(s.parameters, float(s.max_grad_norm))
        s.scaler.step(s.optimizer)
        s.scaler.update()
        lr = s.optimizer.param_groups[0]["lr"]
        s.scheduler.step()
        step += 1
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise KDCacheError(f"training diverged: loss is {loss_value} at epoch {epoch}, step {step}; "
                               "lower --lr (or use --max-grad-norm)")
        loss_sum += loss_value * len(rows)
        rows_seen += len(rows)
        on_step(loss_value)
    return EpochResult(step, loss_sum / max(rows_seen, 1), rows_seen, plan.values if plan else {}, lr)


@contextlib.contextmanager
def on_interrupt(last: str, current: Callable[[], int], n: int) -> Iterator[None]:
    """Ctrl-C says where the run stopped and how to continue it (`last` holds every finished epoch)."""
    try:
        yield
    except KeyboardInterrupt:
        epoch = current()
        kept = f"epochs 1-{epoch - 1} are saved in {last}" if epoch > 1 else "no epoch was finished yet"
        raise Interrupted(f"interrupted in epoch {epoch} of {n}; {kept}: rerun the same command with --resume to "
                          "continue") from None


__all__ = ["EpochResult", "Stepper", "on_interrupt", "train_epoch"]
