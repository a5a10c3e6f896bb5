"""A student's score on one split with the task's metric: what selects the best checkpoint."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kdcache.runtime import autocast
from kdcache.train.inputs import StudentInputs
from kdcache.train.metrics import compute_metrics


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


__all__ = ["evaluate"]
