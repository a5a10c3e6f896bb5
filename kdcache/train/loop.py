"""One epoch of optimiser steps for one student: the body of the training loop, testable alone.

The method decides everything that differs between methods (which cached array each step reads, what is
compared, the loss); this loop only moves tensors, steps the optimiser and watches for divergence. It never asks
the method its name.
"""

from __future__ import annotations

import contextlib
import itertools
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
    stopped: bool = False  # --max-steps was reached within the epoch


def train_epoch(s: Stepper, order: Any, targets: Any, inputs: StudentInputs, epoch: int, step: int, *,
                on_step: Callable[[torch.Tensor], None] = lambda loss: None, log_every: int = 0,
                max_steps: int | None = None, on_batch: Callable[[], None] = lambda: None) -> EpochResult:
    """Run the minibatches of `epoch` (an order fixed by the seed and the epoch) starting at global step `step`.

    Nothing waits for the device within a step: the loss is summed on the device and read back every `log_every`
    steps (and at the end of the epoch), where a non-finite value stops the run. `on_step` receives the step's
    loss tensor (a progress bar reads it a few times a second, not every step); `on_batch` is called as each
    step begins, its batch decoded and on the device (the recipe times its start-up there)."""
    s.student.model.train()
    s.method.start_epoch(epoch, s.student)
    plan = order.plan(epoch)
    arrays = s.method.epoch_arrays(epoch)
    teacher = targets.epoch(plan, arrays or None) if targets is not None else itertools.repeat((None, None))
    loss_sum = torch.zeros((), device=s.device)
    rows_seen, first_unread, step_plan, lr, stopped = 0, step, None, None, False
    for (rows, model_input, batch_labels), (target, labels) in zip(inputs.epoch(plan.batches, epoch=epoch,
                                                                               train=True), teacher):
        if labels is None:  # `kdcache train`: the labels come with the inputs
            labels = batch_labels.to(s.device, non_blocking=True)
        on_batch()
        step_plan = s.method.plan(epoch, step)
        target = target[step_plan.array] if isinstance(target, dict) else target
        with autocast(s.device, s.precision):
            output = s.method.forward(s.student, model_input, step_plan)
        loss = s.method.loss(output, target, labels, step_plan)
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
        loss_sum += loss.detach().float() * len(rows)
        rows_seen += len(rows)
        on_step(loss)
        if log_every and step % log_every == 0:
            _check_finite(float(loss_sum), epoch, first_unread, step)
            first_unread = step
        if max_steps is not None and step >= max_steps:
            stopped = True
            break
    total = float(loss_sum)
    _check_finite(total, epoch, first_unread, step)
    return EpochResult(step, total / max(rows_seen, 1), rows_seen, step_plan.values if step_plan else {}, lr, stopped)


def _check_finite(value: float, epoch: int, first: int, last: int) -> None:
    if not math.isfinite(value):
        raise KDCacheError(f"training diverged: the loss became {value} in epoch {epoch} (steps {first + 1}-{last}); "
                           "lower --lr (or use --max-grad-norm)")


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
