"""A student's score on one split with the task's metric: what selects the best checkpoint."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kdcache.runtime import autocast
from kdcache.train.dist import World
from kdcache.train.inputs import StudentInputs
from kdcache.train.metrics import compute_metrics


def evaluate(student: Any, inputs: StudentInputs, labels: np.ndarray, *, task: str, kind: str,
             device: torch.device, precision: str = "fp32", batch_size: int = 256,
             world: World = World()) -> dict[str, float]:
    """The task's metrics for the student on one split, in eval mode and without gradients; the split's rows go
    through its input pipeline in order, so its first evaluation also checks them against the cache. Under
    torchrun each rank scores a contiguous block of the rows and every rank computes the metrics of all of them."""
    model = student.model if hasattr(student, "model") else student
    was_training = model.training
    model.eval()
    outputs = []
    mine = np.array_split(np.arange(len(inputs)), world.size)[world.rank]
    batches = [mine[a:a + batch_size] for a in range(0, len(mine), batch_size)]
    with torch.inference_mode(), autocast(device, precision):
        for _, model_input, _ in inputs.epoch(batches):
            outputs.append(student(model_input).float())
    model.train(was_training)
    local = torch.cat(outputs).cpu().numpy() if outputs else None
    parts = [part for part in world.gather(local) if part is not None]
    scores = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
    return compute_metrics(scores, labels, task=task, kind=kind)


__all__ = ["evaluate"]
