"""The data against the teacher that will label it: one label set across splits, of the teacher's width."""

from __future__ import annotations

import torch

from kdcache.data.base import LABEL_IDS, SplitData
from kdcache.errors import KDCacheError


def _fit_label_ids(teacher_spec: str, split: SplitData, width: int) -> None:
    """Integer labels name their class set only up to the largest id seen; the teacher's width completes it.

    A file whose labels are 0 and 1 may well belong to a 3-output teacher (class 2 just never occurs in it),
    but a label of 7 can never be scored by a 2-output teacher: that is a label outside the teacher's outputs.
    """
    if split.preprocess.get("label_names_from") != LABEL_IDS or not split.label_names:
        return
    if split.num_labels > width:
        raise KDCacheError(
            f"{split.source}: label {split.num_labels - 1} is outside the {width} outputs of teacher {teacher_spec} "
            f"(class ids 0..{width - 1})"
        )
    split.label_names = [str(k) for k in range(width)]


def check_splits_against_teacher(teacher_spec: str, splits: list[SplitData], width: int) -> None:
    """The teacher's output width must match the label set, and every split must share one label set."""
    for split in splits:
        if len(split) == 0:
            raise KDCacheError(f"{split.source}: split {split.split!r} has no rows")
        _fit_label_ids(teacher_spec, split, width)
    # An unlabeled classification split (label_names None: every label is -1) has no label set to compare.
    labeled = [s for s in splits if s.kind == "regression" or s.label_names is not None]
    first = labeled[0] if labeled else splits[0]
    for split in splits:
        if split.kind != first.kind or (split in labeled and split.label_names != first.label_names):
            raise KDCacheError(f"{split.source}: split {split.split!r} has other labels than split {first.split!r}")
    if first.kind == "regression" and width != 1:
        raise KDCacheError(f"teacher {teacher_spec} has {width} outputs but task {first.task} is a regression (needs 1)")
    if first.kind == "classification" and first.label_names is not None and width != first.num_labels:
        raise KDCacheError(
            f"teacher {teacher_spec} has {width} outputs but {first.source} has {first.num_labels} labels "
            f"({', '.join(first.label_names or [])})"
        )


def check_batch_labels(split: SplitData, labels: torch.Tensor, index: torch.Tensor, width: int) -> None:
    if split.kind != "classification":
        return
    bad = (labels >= width) | (labels < -1)
    if bad.any():
        row = int(torch.nonzero(bad)[0])
        raise KDCacheError(
            f"{split.source}: row {int(index[row])} has label {int(labels[row])}, outside the teacher's {width} outputs"
        )


__all__ = ["check_batch_labels", "check_splits_against_teacher"]
