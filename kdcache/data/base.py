"""What every data source hands the cache writer: indexed, fingerprinted examples and a collate function.

Row i of a split is the i-th example of its source file (or the i-th image in sorted path order); the
writer stores `index` and `fingerprint` beside each row so a reader can prove which input a logit row
belongs to. Loaders do no model work beyond tokenisation; `prepare` turns a batch into model input on a device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch

from kdcache.errors import KDCacheError, SplitMissing

Modality = Literal["text", "image", "features"]
TaskKind = Literal["classification", "regression", "lm"]

#: Label stored for rows whose split has no labels (e.g. GLUE test files).
MISSING_CLASS = -1

#: `preprocess["label_names_from"]` when class names were made from integer labels (0..largest id seen):
#: the real class set may be larger, so the recipe completes it from the teacher's output width.
LABEL_IDS = "integer labels"


@dataclass
class Batch:
    """A collated minibatch; `inputs` is a dict of tensors (text) or one tensor (images: uint8 NCHW)."""

    inputs: dict[str, torch.Tensor] | torch.Tensor
    labels: torch.Tensor  # int64 (MISSING_CLASS where unknown) or float32 (NaN where unknown)
    index: torch.Tensor  # int64, row position in the source split
    fingerprint: np.ndarray  # uint64, one per row

    def pin_memory(self) -> "Batch":
        """Called by DataLoader(pin_memory=True): page-locked tensors make the copies to the GPU asynchronous."""
        inputs = ({k: v.pin_memory() for k, v in self.inputs.items()} if isinstance(self.inputs, dict)
                  else self.inputs.pin_memory())
        return Batch(inputs, self.labels.pin_memory(), self.index.pin_memory(), self.fingerprint)


@dataclass
class SplitData:
    """One split of one dataset, ready for batched teacher inference."""

    task: str
    split: str
    source: str  # the file or folder actually read (absolute path)
    modality: Modality
    kind: TaskKind
    label_names: list[str] | None  # None for regression
    dataset: torch.utils.data.Dataset  # item i -> dict(inputs=..., label=..., index=i, fingerprint=int)
    collate: Callable[[list[dict[str, Any]]], Batch]
    prepare: Callable[[Batch, torch.device], Any]  # Batch -> what the model is called with
    preprocess: dict[str, Any] = field(default_factory=dict)  # JSON-able: tokenizer, max_length, normalisation

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def num_labels(self) -> int:
        return 1 if self.kind == "regression" else len(self.label_names or [])


#: How `--subset` picks its rows, recorded in `preprocess["subset_rule"]`.
SUBSET_RULE = "evenly spaced: linspace(0, n-1, subset)"


def evenly_spaced_rows(n: int, size: int) -> np.ndarray:
    """The `size` row positions spread evenly over n rows (all of them when size >= n), in order."""
    return np.unique(np.linspace(0, n - 1, min(size, n)).round().astype(np.int64))


def row_labels(dataset: torch.utils.data.Dataset) -> np.ndarray:
    """Every row's label without decoding any row: every kdcache source keeps its labels apart from its inputs
    (a Subset keeps the labels of its rows)."""
    if isinstance(dataset, torch.utils.data.Subset):
        return np.asarray(row_labels(dataset.dataset))[np.asarray(dataset.indices, dtype=np.int64)]
    labels = getattr(dataset, "labels", None)
    if labels is None:
        return np.asarray([dataset[i]["label"] for i in range(len(dataset))])
    return np.asarray(labels)


def split_file(data: Path, split: str, stems: Sequence[str], formats: Sequence[str], *,
               missing: str | None = None) -> Path:
    """The one file of `split` in the folder `data` (`<stem>.<format>` for each of the split's names), so that every
    task finds a split's file, and refuses none or several, the same way; `missing`: a task's own line for none."""
    wanted = [f"{stem}.{ext}" for stem in stems for ext in formats]
    found = [data / name for name in wanted if (data / name).is_file()]
    if not found:
        raise SplitMissing(missing or f"{data}: no file for split {split!r}; looked for {', '.join(wanted)}")
    if len(found) > 1:
        raise KDCacheError(f"{data}: several files for split {split!r} ({', '.join(p.name for p in found)}); keep one")
    return found[0]
