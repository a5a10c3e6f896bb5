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
    """The task's metrics for the student on one split, in eval mode and without gradients; the split's rows go
    through its input pipeline in order, so its first evaluation also checks them against the cache."""
    model = student.model if hasattr(student, "model") else student
    was_training = model.training
    model.eval()
    outputs = []
    batches = [np.arange(a, min(a + batch_size, len(inputs))) for a in range(0, len(inputs), batch_size)]
    with torch.inference_mode(), autocast(device, precision):
        for _, model_input, _ in inputs.epoch(batches):
            outputs.append(student(model_input).float())
    model.train(was_training)
    outputs = torch.cat(outputs).cpu() if outputs else torch.zeros(0)
    return compute_metrics(outputs.numpy(), labels, task=task, kind=kind)


__all__ = ["evaluate"]
