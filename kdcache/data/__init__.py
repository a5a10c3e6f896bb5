"""Data sources for the cache: one entry point, `load_split`, over text, image, .npz feature tables and bundled datasets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdcache.data.base import Batch, SplitData
from kdcache.errors import KDCacheError

from kdcache.names import FEATURE_TASKS, GLUE_TASKS, IMAGE_TASKS, TASKS, task_modality


@dataclass
class DataOptions:
    """Per-modality options, so one call site serves every task (the CLI fills it from flags)."""

    max_length: int = 128
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None
    label_names: list[str] | None = None
    regression: bool = False
    normalize: str | None = None
    image_size: int | None = None
    limit: int | None = None
    subset: int | None = None  # keep this many rows, evenly spaced over the split (class-balanced enough for sorted folders)
    holdout: int | None = None  # this many train rows (evenly spaced) are the `validation` split, the rest `train`
    seq_len: int | None = None  # --task lm: tokens per row (window)


def recorded_options(dataset: dict[str, Any], task: dict[str, Any]) -> DataOptions:
    """The loader options a split was read with, from what a cache recorded about it (its `dataset.preprocess` and
    the task's kind and label names), so re-reading gives the very same rows: the contract between the loaders,
    which write `preprocess`, and every reader of a cache (distill, verify)."""
    pre = dataset.get("preprocess") or {}
    options = DataOptions(limit=pre.get("limit"), subset=pre.get("subset"), holdout=pre.get("holdout"))
    if dataset.get("task") == "lm":
        options.seq_len, options.text_column = pre.get("seq_len"), pre.get("text_column")
    elif dataset.get("modality") == "text":
        options.max_length = int(pre.get("max_length", 128))
        if dataset.get("task") == "text":
            options.text_column, options.text_pair_column = pre.get("text_column"), pre.get("text_pair_column")
            options.label_column = pre.get("label_column")
            options.regression = task.get("kind") == "regression"
            options.label_names = None if options.regression else task.get("label_names")
    elif dataset.get("modality") == "image":
        options.normalize, options.image_size = pre.get("normalize"), pre.get("image_size")
    return options


def modality_of(task: str) -> str:
    """The modality of a task kdcache knows, or one line naming the tasks it knows."""
    modality = task_modality(task)
    if modality is None:
        raise KDCacheError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    return modality


def load_split(task: str, data: str | Path | None, split: str, *, tokenizer: Any = None,
               options: DataOptions | None = None) -> SplitData:
    """Read one split of a dataset as fingerprinted rows in source order; tokenizer is needed for text."""
    opts = options or DataOptions()
    for name in ("subset", "holdout"):
        value = getattr(opts, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise KDCacheError(f"{name} must be a positive integer, got {value!r}")
    if opts.holdout is not None and split in ("train", "validation"):
        return held_out(load_split(task, data, "train", tokenizer=tokenizer,
                                   options=dataclasses.replace(opts, holdout=None)), opts.holdout, split)
    loaded = _load_split(task, data, split, tokenizer, opts)
    if opts.subset is None or loaded.preprocess.get("subset") == opts.subset:  # text picks its rows before tokenising
        return loaded
    return evenly_spaced_subset(loaded, opts.subset)


#: How --holdout picks the validation rows out of train (recorded in each split's preprocess).
HOLDOUT_RULE = "validation: evenly spaced linspace(0, n-1, holdout) of the train rows (after --subset); train: the rest"


def held_out(train: SplitData, size: int, split: str) -> SplitData:
    """A validation split carved out of the training rows (CIFAR and ImageNet-style datasets ship none, and
    selecting checkpoints on the test split reports an optimistic test score): `size` rows evenly spaced over
    train (every class of a class-sorted folder), the rest stay `train`. Rows keep their source index and
    fingerprint, so the two splits are disjoint by construction and a cache records which rows each holds."""
    import numpy as np
    import torch

    from kdcache.data.base import evenly_spaced_rows

    n = len(train)
    if size >= n:
        raise KDCacheError(f"{train.source}: --holdout {size} leaves no training rows (the train split has {n})")
    chosen = evenly_spaced_rows(n, size)
    rows = chosen if split == "validation" else np.setdiff1d(np.arange(n), chosen)
    train.dataset = torch.utils.data.Subset(train.dataset, rows.tolist())
    train.split = split
    train.preprocess = {**train.preprocess, "holdout": size, "holdout_rule": HOLDOUT_RULE}
    return train


def evenly_spaced_subset(split: SplitData, size: int) -> SplitData:
    """Keep `size` rows spread evenly over the split, in order: a small sample that still covers every class
    of a class-sorted folder (the first N rows would not). Rows keep their source index and fingerprint."""
    import torch

    from kdcache.data.base import SUBSET_RULE, evenly_spaced_rows

    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise KDCacheError(f"subset must be a positive integer, got {size!r}")
    rows = evenly_spaced_rows(len(split), size)
    split.dataset = torch.utils.data.Subset(split.dataset, rows.tolist())
    split.preprocess = {**split.preprocess, "subset": size, "subset_rule": SUBSET_RULE}
    return split


def _load_split(task: str, data: str | Path | None, split: str, tokenizer: Any, opts: DataOptions) -> SplitData:
    modality = modality_of(task)
    if modality == "features" and task == "digits":
        from kdcache.data.features import load_digits_split

        return load_digits_split(split, limit=opts.limit)
    if data is None:
        raise KDCacheError(f"task {task!r} needs --data (the dataset's file or folder)")
    if modality == "features":
        from kdcache.data.tabular import load_tabular_split

        return load_tabular_split(data, split, limit=opts.limit)
    if modality == "text":
        if tokenizer is None:
            raise KDCacheError(f"task {task!r} needs a tokenizer: the teacher folder has none; pass --tokenizer DIR")
        if task == "lm":
            from kdcache.data.lm import load_lm_split

            return load_lm_split(data, split, tokenizer, seq_len=opts.seq_len, text_column=opts.text_column)
        if tokenizer is None:
            raise KDCacheError(f"task {task!r} needs a tokenizer: the teacher folder has none; pass --tokenizer DIR")
        from kdcache.data.text import load_text_split

        return load_text_split(
            task, data, split, tokenizer, max_length=opts.max_length, text_column=opts.text_column,
            text_pair_column=opts.text_pair_column, label_column=opts.label_column, label_names=opts.label_names,
            regression=opts.regression, limit=opts.limit, subset=opts.subset,
        )
    from kdcache.data.images import load_image_split

    return load_image_split(task, data, split, normalize=opts.normalize, image_size=opts.image_size, limit=opts.limit)


__all__ = ["Batch", "DataOptions", "recorded_options", "SplitData", "TASKS", "GLUE_TASKS", "IMAGE_TASKS", "FEATURE_TASKS", "load_split", "modality_of"]
