"""Several processes training one student (torchrun): who does what, and the few collectives a run needs.

Under `torchrun` every process runs the same recipe. The epoch's row order depends on (seed, epoch) only, so every
rank computes the same global batches and takes a contiguous share of each (`World.shard`); the loss of a share is
weighted by its size, and gradients are summed over the ranks after each backward pass, so a step computes the
mean over the global batch whatever the number of processes (up to float rounding; a student with batch norm
normalises each share by its own statistics). Rank 0 alone writes the run folder. Without torchrun `World()` is one
process and every method here is a no-op, so the single-process path is the code that always ran.

Why a summed all-reduce after backward rather than `DistributedDataParallel`: methods switch what a step reads
(curriculum's projections, then logits; Pro-KD's checkpoints), which leaves parameters without gradients in some
steps, and their own trainable modules live outside the student; one flat all-reduce covers both without DDP's
unused-parameter search. DDP's overlap of communication with the backward pass is what it costs (see docs/cli.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, TypeVar

import numpy as np
import torch

from kdcache.errors import KDCacheError, SharedError

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among the run's processes (rank 0 of 1 without torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this recipe started the process group (and ends it)

    @property
    def main(self) -> bool:
        """Whether this process writes the run folder, the progress bar and the summary."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def shard(self, rows: np.ndarray) -> tuple[slice, float]:
        """This rank's contiguous share of a global batch and the weight of its mean loss (its share of the
        rows). A rank left without rows (a last batch smaller than the world) takes the first row with weight 0,
        so every rank runs the same number of steps and collectives."""
        if not self.distributed:  # (every batch of every epoch: nothing to compute for one process)
            return slice(None), 1.0
        bounds = np.linspace(0, len(rows), self.size + 1).round().astype(int)
        a, b = int(bounds[self.rank]), int(bounds[self.rank + 1])
        if a == b:
            return slice(0, 1), 0.0
        return slice(a, b), (b - a) / len(rows)

    def sum_gradients(self, parameters: list[torch.nn.Parameter]) -> None:
        """Gradients of the weighted shares, summed over the ranks: the global batch's gradient on every rank. A
        parameter no rank used in this step (curriculum's head during a projection phase) keeps no gradient, as in
        one process, so the optimiser leaves it alone (no weight decay, no momentum, no Adam step)."""
        if not self.distributed:
            return
        params = [p for p in parameters if p.requires_grad]
        if not params:
            return
        used = [p.grad is not None for p in params]
        device = next((p.grad.device for p in params if p.grad is not None), params[0].device)
        flat = torch.cat([*(p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=device,
                                                                                       dtype=p.dtype)
                            for p in params), torch.tensor(used, dtype=params[0].dtype, device=device)])
        torch.distributed.all_reduce(flat)
        offset = 0
        # which parameters any rank used: read back (a wait for the device) only when this rank left some unused
        anywhere = [1.0] * len(params) if all(used) else flat[-len(params):].tolist()
        for p, count in zip(params, anywhere):
            n = p.numel()
            if count > 0:
                p.grad = flat[offset:offset + n].view_as(p).clone() if p.grad is None else \
                    p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            else:
                p.grad = None
            offset += n

    def sync_buffers(self, module: torch.nn.Module) -> None:
        """Batch norm's running statistics averaged over the ranks (each updated them from its own shares), so
        every rank evaluates, and rank 0 saves, the same model."""
        if not self.distributed:
            return
        with torch.no_grad():
            for buffer in module.buffers():
                if buffer.is_floating_point():
                    torch.distributed.all_reduce(buffer)
                    buffer.div_(self.size)
                else:  # counters (num_batches_tracked): equal on every rank anyway
                    torch.distributed.broadcast(buffer, src=0)

    def fail(self, message: str) -> KDCacheError:
        """An error every rank finds by itself (a resume under another world size, divergence): told by rank 0."""
        return KDCacheError(message) if self.main else SharedError(message)

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over the ranks (loss and row counts for the log)."""
        if self.distributed:
            values = values.clone()
            torch.distributed.all_reduce(values)
        return values

    def gather(self, value: T) -> list[T]:
        """Every rank's `value` (picklable), in rank order."""
        if not self.distributed:
            return [value]
        out: list[Any] = [None] * self.size
        torch.distributed.all_gather_object(out, value)
        return out

    def agree(self, work: Callable[[], T]) -> T:
        """Run `work` on rank 0 and hand its result, or its one-line error, to every rank: a refusal on rank 0
        (a run folder that already holds a run) stops every process instead of leaving them waiting."""
        if not self.distributed:
            return work()
        outcome: list[Any] = [None]
        error: BaseException | None = None
        if self.main:
            try:
                outcome = [("ok", work())]
            except KDCacheError as exc:
                outcome, error = [("error", str(exc))], exc
            except BaseException as exc:  # noqa: BLE001 - told to the other ranks, then raised here
                outcome, error = [("error", f"rank 0 failed: {type(exc).__name__}: {exc}")], exc
        torch.distributed.broadcast_object_list(outcome, src=0)
        status, value = outcome[0]
        if error is not None:
            raise error
        if status == "error":
            raise self.fail(value)
        return value

    def all_ok(self, work: Callable[[], T]) -> T:
        """Run `work` on every rank; when any rank fails with a one-line error, every rank stops with the first
        such error, naming its rank (a cache that one machine of the run cannot read)."""
        if not self.distributed:
            return work()
        try:
            value, error = work(), None
        except KDCacheError as exc:
            value, error = None, str(exc)
        errors = self.gather(error)
        failed = [(rank, text) for rank, text in enumerate(errors) if text is not None]
        if failed:
            rank, text = failed[0]
            raise self.fail(f"rank {rank} of {self.size}: {text}")
        return value

    def broadcast_parameters(self, module: torch.nn.Module) -> None:
        """Start every rank from rank 0's weights and buffers."""
        if not self.distributed:
            return
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                torch.distributed.broadcast(tensor.data, src=0)

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def merge_seen(self, check: Any) -> None:
        """A row check's rows, as every rank has seen them: a row counts as checked when any rank checked it
        (and a `train` run's recorded fingerprints come from the rank that read the row)."""
        if not self.distributed or check is None or all(self.gather(bool(check.done))):
            return
        fingerprints = getattr(check, "recording", False)
        seen = np.flatnonzero(check.seen)
        parts = self.gather((seen, check.fingerprints[seen] if fingerprints else None))
        for rows, prints in parts:
            check.seen[rows] = True
            if fingerprints:
                check.fingerprints[rows] = prints


def init_world(device_name: str) -> tuple[World, str]:
    """The world torchrun describes in the environment (one process when it describes none), its process group
    started (nccl on CUDA, gloo on the CPU), and the device this rank trains on."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(), device_name
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and device_name in ("auto", "cuda") or device_name.startswith("cuda")
    if cuda:
        if device_name not in ("auto", "cuda"):
            raise KDCacheError(f"--device {device_name} under torchrun: each process takes cuda:LOCAL_RANK; pass "
                               "--device cuda (or auto)")
        torch.cuda.set_device(local)
        device_name = f"cuda:{local}"
    owns = not torch.distributed.is_initialized()
    if owns:
        torch.distributed.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=size,
                                             timeout=timedelta(minutes=30))
    return World(rank, size, local, owns), device_name


def close_world(world: World) -> None:
    """End the process group this recipe started (one a caller started stays theirs)."""
    if world.owns_group and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


__all__ = ["World", "close_world", "init_world"]
