"""Data sources for the cache: one entry point, `load_split`, over text, image and bundled datasets."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdcache.data.base import Batch, SplitData
from kdcache.errors import KDCacheError

GLUE_TASKS = ("sst2", "cola", "mrpc", "rte", "stsb", "qnli", "qqp", "mnli")
IMAGE_TASKS = ("cifar10", "cifar100", "imagefolder")
TASKS = (*GLUE_TASKS, "text", *IMAGE_TASKS, "digits")


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


def modality_of(task: str) -> str:
    if task in GLUE_TASKS or task == "text":
        return "text"
    if task in IMAGE_TASKS:
        return "image"
    if task == "digits":
        return "features"
    raise KDCacheError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")


def load_split(task: str, data: str | Path | None, split: str, *, tokenizer: Any = None,
               options: DataOptions | None = None) -> SplitData:
    """Read one split of a dataset as fingerprinted rows in source order; tokenizer is needed for text."""
    opts = options or DataOptions()
    modality = modality_of(task)
    if modality == "features":
        from kdcache.data.features import load_digits_split

        return load_digits_split(split, limit=opts.limit)
    if data is None:
        raise KDCacheError(f"task {task!r} needs --data (the dataset's file or folder)")
    if modality == "text":
        if tokenizer is None:
            raise KDCacheError(f"task {task!r} needs a tokenizer: the teacher folder has none; pass --tokenizer DIR")
        from kdcache.data.text import load_text_split

        return load_text_split(
            task, data, split, tokenizer, max_length=opts.max_length, text_column=opts.text_column,
            text_pair_column=opts.text_pair_column, label_column=opts.label_column, label_names=opts.label_names,
            regression=opts.regression, limit=opts.limit,
        )
    from kdcache.data.images import load_image_split

    return load_image_split(task, data, split, normalize=opts.normalize, image_size=opts.image_size, limit=opts.limit)


__all__ = ["Batch", "DataOptions", "SplitData", "TASKS", "GLUE_TASKS", "IMAGE_TASKS", "load_split", "modality_of"]
