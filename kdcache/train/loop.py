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

from kdcache.errors import Interrupted
from kdcache.methods import Method
from kdcache.runtime import autocast
from kdcache.train.dist import World
from kdcache.train.inputs import StudentInputs
from kdcache.train.run_dir import rng_state, set_rng_state


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
    world: World = field(default_factory=World)  # the processes sharing each batch (torchrun)


@dataclass
class EpochResult:
    step: int  # optimiser steps taken over the run after this epoch
    loss: float  # mean loss per row
    rows: int
    values: dict[str, Any]  # the method's values at the epoch's last step
    lr: float | None
    stopped: bool = False  # --max-steps was reached within the epoch


@dataclass
class Member:
    """One student of those stepped on the same batches: its stepper, the global step it starts the epoch at,
    and (several students) its own random stream, swapped in for its steps so that its dropout draws are those
    of a lone run."""

    s: Stepper
    step: int
    rng: dict[str, Any] | None = None


@dataclass
class _Tally:
    loss_sum: torch.Tensor
    first_unread: int
    rows: int = 0
    plan: Any = None
    lr: float | None = None
    stopped: bool = False


def train_together(members: list[Member], order: Any, targets: Any, inputs: StudentInputs, epoch: int, *,
                   on_step: Callable[[int, torch.Tensor], None] = lambda i, loss: None, log_every: int = 0,
                   max_steps: int | None = None, on_batch: Callable[[], None] = lambda: None) -> list[EpochResult]:
    """Run the minibatches of `epoch` (an order fixed by the seed and the epoch) for one student, or several on the
    same batches (`kdcache sweep`): each batch is decoded, checked and moved to the device once, the teacher's rows
    for it gathered once, then every student takes its step, starting at its own global step.

    Nothing waits for the device within a step: the loss is summed on the device and read back every `log_every`
    steps (and at the end of the epoch), where a non-finite value stops the run. `on_step` receives each student's
    index and loss tensor (a progress bar reads it a few times a second, not every step); `on_batch` is called as
    each batch's steps begin, the batch decoded and on the device (the recipe times its start-up there). Under
    torchrun each process trains on its share of every batch (`World.shard`) and the log's loss is the mean over
    all rows."""
    world = members[0].s.world
    for m in members:
        m.s.student.model.train()
        m.s.method.start_epoch(epoch, m.s.student)
    plan = order.plan(epoch)
    wanted = [m.s.method.epoch_arrays(epoch) for m in members]
    arrays = None if not all(wanted) else tuple(dict.fromkeys(a for w in wanted for a in w))
    teacher = targets.epoch(plan, arrays) if targets is not None else itertools.repeat((None, None))
    tallies = [_Tally(torch.zeros((), device=m.s.device), m.step) for m in members]
    shares = [world.shard(rows) for rows in plan.batches]
    local = [rows[share] for rows, (share, _) in zip(plan.batches, shares)]
    for (rows, model_input, batch_labels), (target, labels), (share, weight) in zip(
            inputs.epoch(local, epoch=epoch, train=True), teacher, shares):
        if labels is None:  # `kdcache train`: the labels come with the inputs
            labels = batch_labels.to(members[0].s.device, non_blocking=True)
        elif world.distributed:  # the teacher's rows of the whole batch: this rank's share
            labels = labels[share]
            target = {k: v[share] for k, v in target.items()} if isinstance(target, dict) else target[share]
        on_batch()
        for i, (m, t) in enumerate(zip(members, tallies)):
            if t.stopped:
                continue
            if m.rng is not None:
                set_rng_state(m.rng)
            loss = _step(m, t, epoch, model_input, target, labels, weight)
            if m.rng is not None:
                m.rng = rng_state()
            if weight:  # (a rank without rows in this batch trained on a stand-in row with weight 0)
                t.loss_sum += loss.detach().float() * len(rows)
                t.rows += len(rows)
            on_step(i, loss)
            if log_every and m.step % log_every == 0:
                _check_finite(float(world.sum(t.loss_sum)), epoch, t.first_unread, m.step, world)
                t.first_unread = m.step
            t.stopped = max_steps is not None and m.step >= max_steps
        if all(t.stopped for t in tallies):
            break
    results = []
    for m, t in zip(members, tallies):
        sums = torch.stack([t.loss_sum.double(), torch.tensor(float(t.rows), dtype=torch.float64, device=m.s.device)])
        total, rows_seen = (float(v) for v in world.sum(sums))
        _check_finite(total, epoch, t.first_unread, m.step, world)
        results.append(EpochResult(m.step, total / max(rows_seen, 1), int(rows_seen),
                                   t.plan.values if t.plan else {}, t.lr, t.stopped))
    return results


def _step(m: Member, t: _Tally, epoch: int, model_input: Any, target: Any, labels: torch.Tensor,
          weight: float) -> torch.Tensor:
    """One optimiser step of one student; returns its loss (on the device, not read)."""
    s = m.s
    t.plan = s.method.plan(epoch, m.step)
    target = s.method.target_of(target, t.plan)  # a tensor (dense), or the cache's kind of typed target
    with autocast(s.device, s.precision):
        output = s.method.forward(s.student, model_input, t.plan)
    loss = s.method.step_loss(output, target, labels, t.plan)
    s.optimizer.zero_grad(set_to_none=True)
    s.scaler.scale(loss * weight if s.world.distributed else loss).backward()
    s.world.sum_gradients(s.parameters)
    if s.max_grad_norm:
        s.scaler.unscale_(s.optimizer)
        torch.nn.utils.clip_grad_norm_(s.parameters, float(s.max_grad_norm))
    s.scaler.step(s.optimizer)
    s.scaler.update()
    t.lr = s.optimizer.param_groups[0]["lr"]
    s.scheduler.step()
    m.step += 1
    return loss


def _check_finite(value: float, epoch: int, first: int, last: int, world: World = World()) -> None:
    if not math.isfinite(value):  # (the sum over every rank: each finds it, rank 0 says it)
        raise world.fail(f"training diverged: the loss became {value} in epoch {epoch} (steps {first + 1}-{last}); "
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


__all__ = ["EpochResult", "Member", "Stepper", "on_interrupt", "train_together"]
