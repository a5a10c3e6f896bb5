"""Components of the student training loop: inputs by row, label-only batches, evaluation, optimiser, checkpoints.

The loop itself is the recipe in `kdcache/recipes/distill.py`; everything here is testable alone.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import pickle
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from kdcache.data.base import Batch, SplitData
from kdcache.errors import KDCacheError
from kdcache.fingerprint import labels_equal
from kdcache.metrics import compute_metrics
from kdcache.runtime import autocast
from kdcache.stream import epoch_seed

OPTIMIZERS = ("sgd", "adamw", "adam")
LR_SCHEDULES = ("constant", "linear", "cosine")


class StudentInputs:
    """The model inputs of one split, fetched by row: the student sees row r of the cache as row r of the data.

    Images and feature vectors are decoded once and kept as one uint8/float tensor (on the training device when
    it is a GPU, so a batch is a gather); tokenised text keeps its rows and pads each batch to its longest row.
    Reading the split once also collects every row's fingerprint and label, for the alignment check.
    """

    def __init__(self, split: SplitData, device: torch.device, *, decode_batch: int = 512) -> None:
        self.split, self.device = split, device
        # text rows are kept as items; read them once and collate those (not the dataset a second time)
        items = [split.dataset[i] for i in range(len(split.dataset))] if split.modality == "text" else None
        loader = torch.utils.data.DataLoader(items if items is not None else split.dataset, batch_size=decode_batch,
                                             shuffle=False, collate_fn=split.collate, num_workers=0)
        fingerprints, labels, inputs = [], [], []
        for batch in loader:
            fingerprints.append(np.asarray(batch.fingerprint, dtype=np.uint64))
            labels.append(batch.labels)
            if split.modality != "text":
                inputs.append(batch.inputs)
        self.fingerprints = np.concatenate(fingerprints) if fingerprints else np.zeros(0, np.uint64)
        self.labels = torch.cat(labels) if labels else torch.zeros(0)
        self._items = items
        self._inputs = None
        if items is None and inputs:
            self._inputs = torch.cat(inputs).to(device if device.type == "cuda" else "cpu")

    def __len__(self) -> int:
        return len(self.fingerprints)

    def batch(self, rows: torch.Tensor) -> Any:
        """Model input for these rows (CPU row positions), on the training device."""
        if self._items is not None:
            return self.split.prepare(self.split.collate([self._items[int(r)] for r in rows]), self.device)
        index = rows.to(self._inputs.device)
        batch = Batch(inputs=self._inputs[index], labels=self.labels[rows], index=rows, fingerprint=None)
        return self.split.prepare(batch, self.device)


def check_alignment(inputs: StudentInputs, cache: Any, source: str) -> None:
    """Refuse to train unless the data re-read now is, row for row, the data the teacher saw: the same inputs (by
    fingerprint) with the same labels (a relabelled row would silently teach the student another answer)."""
    where = f"{cache.path}/{cache.split}"
    if len(inputs) != len(cache):
        raise KDCacheError(f"{source}: has {len(inputs)} rows for split {cache.split!r} but the cache {where} has "
                           f"{len(cache)}; the data changed since the teacher was cached")
    stored = np.asarray(cache.read("fingerprint"), dtype=np.uint64)  # checked read: damage names its chunk file
    bad = np.flatnonzero(stored != inputs.fingerprints)
    if len(bad):
        row = int(bad[0])
        index = int(cache.read("index", row, row + 1)[0])
        raise KDCacheError(f"{source}: row {row} (source index {index}) does not match the cache {where} "
                           f"(fingerprint {int(inputs.fingerprints[row]):016x} vs {int(stored[row]):016x}; "
                           f"{len(bad)} of {len(stored)} rows differ); the data changed since the teacher was cached")
    stored_labels = cache.read("labels")
    fresh = inputs.labels.numpy().astype(stored_labels.dtype)
    wrong = np.flatnonzero(~labels_equal(stored_labels, fresh))
    if len(wrong):
        row = int(wrong[0])
        index = int(cache.read("index", row, row + 1)[0])
        raise KDCacheError(f"{source}: row {row} (source index {index}) has label {fresh[row]} but the cache {where} "
                           f"holds {stored_labels[row]} ({len(wrong)} of {len(stored)} labels differ); the labels "
                           "changed since the teacher was cached")


class LabelBatches:
    """Shuffled minibatches of (rows, None, labels) without a cache: `kdcache train`'s twin of LogitBatches."""

    def __init__(self, labels: torch.Tensor, batch_size: int, *, seed: int, device: torch.device) -> None:
        self.labels, self.batch_size, self.seed = labels.to(device), batch_size, seed
        self.rows = len(labels)

    def __len__(self) -> int:
        return -(-self.rows // self.batch_size)

    def epoch(self, e: int) -> Iterator[tuple[torch.Tensor, None, torch.Tensor]]:
        order = torch.randperm(self.rows, generator=torch.Generator().manual_seed(epoch_seed(self.seed, e)))
        for start in range(0, self.rows, self.batch_size):
            rows = order[start : start + self.batch_size]
            yield rows, None, self.labels[rows.to(self.labels.device)]


def evaluate(student: Any, inputs: StudentInputs, labels: np.ndarray, *, task: str, kind: str,
             device: torch.device, precision: str = "fp32", batch_size: int = 256) -> dict[str, float]:
    """The task's metrics for the student on one split, in eval mode and without gradients."""
    model = student.model if hasattr(student, "model") else student
    was_training = model.training
    model.eval()
    outputs = []
    with torch.inference_mode(), autocast(device, precision):
        for start in range(0, len(inputs), batch_size):
            rows = torch.arange(start, min(start + batch_size, len(inputs)))
            outputs.append(student(inputs.batch(rows)).float().cpu())
    model.train(was_training)
    return compute_metrics(torch.cat(outputs).numpy(), labels, task=task, kind=kind)


def build_optimizer(name: str, model: nn.Module, *, lr: float, weight_decay: float,
                    momentum: float = 0.9) -> torch.optim.Optimizer:
    """SGD (momentum) or Adam(W); biases and normalisation weights (1-d tensors) get no weight decay."""
    if name not in OPTIMIZERS:
        raise KDCacheError(f"--optimizer {name!r} is not one of {', '.join(OPTIMIZERS)}")
    if not (lr > 0 and math.isfinite(lr)):
        raise KDCacheError(f"--lr must be a positive number, got {lr}")
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr)
    return torch.optim.AdamW(groups, lr=lr)


def build_lr_schedule(name: str, optimizer: torch.optim.Optimizer, *, total_steps: int,
                      warmup_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then constant, linear decay to 0, or cosine decay to 0, stepped once per optimiser step."""
    if name not in LR_SCHEDULES:
        raise KDCacheError(f"--lr-schedule {name!r} is not one of {', '.join(LR_SCHEDULES)}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if name == "linear":
            return 1.0 - progress
        if name == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save through a temporary file and a rename, so a crash never leaves a half-written checkpoint.

    Serialised in memory first and written with plain file I/O, so a full disk or a read-only folder is one
    KDCacheError naming the file and the cause (torch's own writer reports them as an internal enforce failure).
    """
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise write_error(path, exc) from exc


def write_error(path: Path, exc: OSError) -> KDCacheError:
    """One line for a failed write of a run's file: the file, and the cause in words (disk full, read-only...)."""
    cause = "disk full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc)).lower()
    return KDCacheError(f"{path}: {cause} while writing it; the run stopped (free space or choose another --out, "
                        "then rerun with --resume)")


def load_checkpoint(path: Path) -> dict[str, Any]:
    """last.pt loaded with torch's weights-only unpickler: tensors and plain values, never code, so a crafted file
    in a run folder cannot run a command when a run is resumed."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise KDCacheError(f"{path}: refusing to load it: it holds objects other than tensors and plain values, "
                           "which kdcache never writes (a tampered or foreign file)") from exc
    except Exception as exc:  # noqa: BLE001 - torch raises many types for unreadable files
        raise KDCacheError(f"{path}: unreadable checkpoint ({type(exc).__name__})") from exc
    if not isinstance(state, dict):
        raise KDCacheError(f"{path}: not a kdcache checkpoint (a {type(state).__name__}, not a mapping)")
    return state


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
