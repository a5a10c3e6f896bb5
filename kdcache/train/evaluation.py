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


def teacher_top_ids(cache: Any) -> np.ndarray:
    """[N, S] the teacher's most probable id at every position of a token-level split, from its cached target: the
    first top-k id, the argmax of dense logits, or the sampled id of the highest log-probability."""
    from kdcache.methods.targets import target_kind

    kind = target_kind(cache)
    if kind == "topk":
        return cache.read("topk_indices")[..., 0].astype(np.int64)
    if kind == "dense":
        return cache.read("logits").argmax(axis=-1).astype(np.int64)
    ids, logprobs = cache.read("sampled_ids").astype(np.int64), cache.read("sampled_logprobs")
    logprobs = np.where(cache.read("sampled_counts") > 0, logprobs, -np.inf)
    return np.take_along_axis(ids, logprobs.argmax(axis=-1)[..., None], axis=-1)[..., 0]


def evaluate_lm(student: Any, inputs: StudentInputs, teacher_top: np.ndarray | None, *, device: torch.device,
                precision: str = "fp32", batch_size: int = 32, chunk: int | None = None,
                world: World = World()) -> dict[str, float]:
    """A causal-LM student on one split of windows: perplexity (exp of the mean next-token cross-entropy over the
    real tokens), top-1 agreement with the teacher (the share of those tokens where the student's argmax is the
    teacher's most probable id) and tokens/s of the evaluation; "metric" is the perplexity (lower is better)."""
    import math
    import time

    from kdcache.methods import tokens as token_loss

    model = student.model if hasattr(student, "model") else student
    was_training = model.training
    model.eval()
    mine = np.array_split(np.arange(len(inputs)), world.size)[world.rank]
    batches = [mine[a:a + batch_size] for a in range(0, len(mine), batch_size)]
    ce, count, agree = 0.0, 0, 0
    started = time.perf_counter()
    with torch.inference_mode():
        for rows, model_input, labels in inputs.epoch(batches):
            with autocast(device, precision):
                output = token_loss.token_output(model, model_input)
            top = torch.from_numpy(teacher_top[rows]).to(device) if teacher_top is not None else None
            sums = token_loss.perplexity_sums(output, labels.to(device), top,
                                              chunk=chunk)
            ce, count, agree = ce + sums[0], count + sums[1], agree + sums[2]
    seconds = time.perf_counter() - started
    model.train(was_training)
    parts = world.gather((ce, count, agree, seconds))
    ce, count, agree = (sum(p[i] for p in parts) for i in range(3))
    seconds = max(p[3] for p in parts)
    mean = ce / max(count, 1)
    result = {"perplexity": math.exp(min(mean, 700.0)), "loss": mean,
              "agreement": agree / count if teacher_top is not None and count else None,
              "tokens": int(count), "eval_tokens_per_second": round(count / max(seconds, 1e-9), 1)}
    result["metric"] = result["perplexity"]
    result["rows"] = int(count)
    return result


__all__ = ["evaluate", "evaluate_lm", "teacher_top_ids"]
