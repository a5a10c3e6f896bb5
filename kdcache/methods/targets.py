"""The teacher's target for one batch as a typed value, from the cache's `TargetSpec` to the loss.

A cache stores one kind of target (`kdcache.cache.targets.TargetSpec`): dense logits, a top-k row with the exact
log-sum-exp of every output at each recorded temperature, or RS-KD samples. The batches serve the kind's arrays by
name; `served_target` turns them into one of the values below, and a method's loss dispatches on its type. A new
kind is a spec (cache/targets.py), a value here, its losses (methods/sparse_losses.py) and the methods that accept
it: four files.

Rows are (R, ...) with R = batch (x positions, for token-level caches, flattened by the caller).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

import torch

from kdcache.errors import KDCacheError

#: The arrays each kind serves, in the order the batches hand them over.
KIND_ARRAYS = {"dense": ("logits",), "topk": ("topk_values", "topk_indices", "logsumexp"),
               "sampled": ("sampled_ids", "sampled_counts", "sampled_logprobs")}
#: What each kind is, in a refusal's words.
KIND_WORDS = {"dense": "dense logits", "topk": "top-k logits with their log-sum-exp",
              "sampled": "sampled ids (RS-KD)"}


@dataclass
class DenseTarget:
    """logits: (R, C) float32, the teacher's raw logits (or a checkpoint's, or a projection's)."""

    logits: torch.Tensor


@dataclass
class TopKTarget:
    """values: (R, K) float32 raw logits, descending; indices: (R, K) int64 ids; logsumexp: (R, L) float32 over all C
    outputs of z/T at each of `temperatures` (T = 1 first), or (R,) when only T = 1 is recorded."""

    values: torch.Tensor
    indices: torch.Tensor
    logsumexp: torch.Tensor
    temperatures: tuple[float, ...]


@dataclass
class SampledTarget:
    """ids: (R, W) int64; counts: (R, W) int64 summing to N per row (0 in unused slots); logprobs: (R, W) float32
    teacher log-softmax at T = 1; drawn from softmax(z / sample_temperature)."""

    ids: torch.Tensor
    counts: torch.Tensor
    logprobs: torch.Tensor
    sample_temperature: float


Target = Union[DenseTarget, TopKTarget, SampledTarget]


def target_kind(cache: Any) -> str:
    """The kind of target a split stores ("dense" for caches written before the kinds existed)."""
    spec = getattr(cache, "target", None)
    return getattr(spec, "kind", None) or "dense"


def target_arrays(cache: Any, dense_array: str = "logits") -> tuple[str, ...]:
    """The arrays a method reads for the split's target; a dense target may come from another float array (a
    teacher checkpoint's logits, a projection)."""
    kind = target_kind(cache)
    return (dense_array,) if kind == "dense" else KIND_ARRAYS[kind]


def check_kind(kind: str, accepted: tuple[str, ...], method: str, where: str) -> None:
    """A method asked of a cache whose kind of target it cannot use: one line naming both, before any data is read."""
    if kind not in accepted:
        can = ", ".join(KIND_WORDS[k] for k in accepted)
        raise KDCacheError(f"{where}: stores {KIND_WORDS.get(kind, kind)}, but --method {method} needs {can}; "
                           "cache the teacher again with the kind it needs (cache-teacher without --topk / "
                           "--sample-tokens stores dense logits)")


def served_target(cache: Any, served: Any, dense_array: str = "logits") -> Target:
    """The typed value of one batch's served arrays (a tensor when one array is served, else a dict by name)."""
    kind = target_kind(cache)
    if kind == "dense":
        return DenseTarget(served[dense_array] if isinstance(served, dict) else served)
    spec = cache.target
    if kind == "topk":
        return TopKTarget(served["topk_values"].float(), served["topk_indices"].long(), served["logsumexp"].float(),
                          tuple(float(t) for t in (spec.temperatures or [1.0])))
    return SampledTarget(served["sampled_ids"].long(), served["sampled_counts"].long(),
                         served["sampled_logprobs"].float(), float(spec.sample_temperature or 1.0))


def teacher_scores(cache: Any, dense_array: str = "logits", start: int = 0, stop: int | None = None) -> Any:
    """The teacher's scores of a split (rows start:stop) as an (rows, C) float32 array whose argmax is the teacher's
    prediction, for its own metrics beside the student's: the logits; a top-k row's kept logits (the others below
    them); a sampled row's log-probabilities at its sampled ids (the argmax is then the most probable id drawn)."""
    import numpy as np

    kind = target_kind(cache)
    if kind == "dense":
        return cache.read(dense_array, start, stop).astype(np.float32)
    ids_name, values_name = ("topk_indices", "topk_values") if kind == "topk" else ("sampled_ids", "sampled_logprobs")
    ids, values = (cache.read(ids_name, start, stop).astype(np.int64),
                   cache.read(values_name, start, stop).astype(np.float32))
    if kind == "sampled":
        values = np.where(cache.read("sampled_counts", start, stop) > 0, values, np.finfo(np.float32).min)
    scores = np.full((len(ids), int(cache.target.outputs)), np.finfo(np.float32).min, dtype=np.float32)
    np.maximum.at(scores, (np.arange(len(ids))[:, None], ids), values)  # a sampled row's unused slots lose
    return scores


__all__ = ["DenseTarget", "KIND_ARRAYS", "SampledTarget", "Target", "TopKTarget", "check_kind", "served_target",
           "target_arrays", "target_kind", "teacher_scores"]
