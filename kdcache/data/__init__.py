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
    holdout_test: int | None = None  # this many more (evenly spaced over what --holdout left) are the `test` split
    seq_len: int | None = None  # --task lm: tokens per row (window)


def recorded_options(dataset: dict[str, Any], task: dict[str, Any]) -> DataOptions:
    """The loader options a split was read with, from what a cache recorded about it (its `dataset.preprocess` and
    the task's kind and label names), so re-reading gives the very same rows: the contract between the loaders,
    which write `preprocess`, and every reader of a cache (distill, verify)."""
    pre = dataset.get("preprocess") or {}
    options = DataOptions(limit=pre.get("limit"), subset=pre.get("subset"), holdout=pre.get("holdout"),
                          holdout_test=pre.get("holdout_test"))
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
    for name in ("subset", "holdout", "holdout_test"):
        value = getattr(opts, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise KDCacheError(f"{name} must be a positive integer, got {value!r}")
    carved = {"train"} | ({"validation"} if opts.holdout else set()) | ({"test"} if opts.holdout_test else set())
    if (opts.holdout or opts.holdout_test) and split in carved:
        whole = dataclasses.replace(opts, holdout=None, holdout_test=None)
        return held_out(load_split(task, data, "train", tokenizer=tokenizer, options=whole), opts.holdout, split,
                        test_size=opts.holdout_test)
    loaded = _load_split(task, data, split, tokenizer, opts)
    if opts.subset is None or loaded.preprocess.get("subset") == opts.subset:  # text picks its rows before tokenising
        return loaded
    return evenly_spaced_subset(loaded, opts.subset)


#: How --holdout picks the validation rows out of train (recorded in each split's preprocess).
HOLDOUT_RULE = "validation: evenly spaced linspace(0, n-1, holdout) of the train rows (after --subset); train: the rest"
#: How --holdout-test picks the test rows (recorded beside HOLDOUT_RULE when it is used).
HOLDOUT_TEST_RULE = ("test: evenly spaced linspace(0, m-1, holdout_test) of the m train rows --holdout left; "
                     "train: the rest")


def held_out(train: SplitData, size: int | None, split: str, *, test_size: int | None = None) -> SplitData:
    """A validation split (and with `test_size` a test split) carved out of the training rows, for datasets that
    ship none or ship one file (selecting checkpoints on the test split, or on the training rows, reports an
    optimistic score): `size` rows evenly spaced over train (every class of a class-sorted folder), then
    `test_size` evenly spaced over the rest; what is left stays `train`. Rows keep their source index and
    fingerprint, so the splits are disjoint by construction and a cache records which rows each holds."""
    import numpy as np
    import torch

    from kdcache.data.base import evenly_spaced_rows

    n = len(train)
    validation = evenly_spaced_rows(n, size) if size else np.empty(0, dtype=np.int64)
    rest = np.setdiff1d(np.arange(n), validation)
    test = rest[evenly_spaced_rows(len(rest), test_size)] if test_size and len(rest) else np.empty(0, dtype=np.int64)
    kept = np.setdiff1d(rest, test)
    if not len(kept):
        flags = " ".join(f"--{f} {v}" for f, v in (("holdout", size), ("holdout-test", test_size)) if v)
        raise KDCacheError(f"{train.source}: {flags} leaves no training rows (the train split has {n})")
    rows = {"validation": validation, "test": test}.get(split, kept)
    train.dataset = torch.utils.data.Subset(train.dataset, rows.tolist())
    train.split = split
    train.preprocess = {**train.preprocess, **({"holdout": size, "holdout_rule": HOLDOUT_RULE} if size else {}),
                        **({"holdout_test": test_size, "holdout_test_rule": HOLDOUT_TEST_RULE} if test_size else {})}
    return train


def check_distinct_splits(splits: list[SplitData], hint: str = "") -> None:
    """Two splits read from one file are the same rows (a run would select on its own training rows) unless
    --holdout/--holdout-test carved them apart: refused in one line that says how to carve them."""
    import os

    seen: dict[str, SplitData] = {}
    for split in splits:
        if split.modality == "image" or not os.path.isfile(split.source):  # image splits are folders of one source
            continue
        first = seen.setdefault(split.source, split)
        if first is not split and not (_carved(first) and _carved(split) and first.split != split.split):
            raise KDCacheError(
                f"{split.source}: splits {first.split!r} and {split.split!r} would be the same rows (both read this "
                "one file); carve them out of it with --holdout N (validation) and --holdout-test N (test)" + hint)


def _carved(split: SplitData) -> bool:
    """Whether --holdout or --holdout-test picked this split's rows out of the training file."""
    return "holdout_rule" in split.preprocess or "holdout_test_rule" in split.preprocess


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


__all__ = ["Batch", "DataOptions", "recorded_options", "SplitData", "TASKS", "GLUE_TASKS", "IMAGE_TASKS", "FEATURE_TASKS", "load_split", "modality_of",
           "check_distinct_splits", "held_out"]
