"""The embedded default dataset: scikit-learn's bundled UCI digits (1,797 8x8 images), offline and instant.

kdcache defines its split: a fixed permutation (seed 0) of the bundled rows, the first 1,437 for `train`
and the last 360 for `validation`. `index` is the row's position in the bundled array, so it is stable
whatever the split; the fingerprint hashes the 8x8 uint8 pixels (values 0..16).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kdcache.data.base import Batch, SplitData
from kdcache.errors import KDCacheError
from kdcache.fingerprint import fingerprint_pixels

DIGITS_SPLITS = {"train": slice(0, 1437), "validation": slice(1437, None)}


class _Rows(torch.utils.data.Dataset):
    def __init__(self, pixels: np.ndarray, labels: np.ndarray, index: np.ndarray) -> None:
        self.pixels, self.labels, self.index = pixels, labels, index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, Any]:
        pixels = self.pixels[i]
        return {"inputs": pixels, "label": int(self.labels[i]), "index": int(self.index[i]),
                "fingerprint": fingerprint_pixels(pixels)}


def _collate(items: list[dict[str, Any]]) -> Batch:
    return Batch(
        inputs=torch.from_numpy(np.stack([it["inputs"] for it in items])),
        labels=torch.tensor([it["label"] for it in items], dtype=torch.int64),
        index=torch.tensor([it["index"] for it in items], dtype=torch.int64),
        fingerprint=np.array([it["fingerprint"] for it in items], dtype=np.uint64),
    )


def _prepare(batch: Batch, device: torch.device) -> torch.Tensor:
    # Flattened to 64 features scaled to [0, 1]: what an MLP teacher or student takes.
    return batch.inputs.to(device, non_blocking=True).reshape(len(batch.index), -1).float() / 16.0


def load_digits_split(split: str, *, limit: int | None = None) -> SplitData:
    """A split of the bundled digits, for the demo and for tests that need a real dataset in milliseconds."""
    from sklearn.datasets import load_digits

    if split not in DIGITS_SPLITS:
        raise KDCacheError(f"digits: unknown split {split!r} (splits: {', '.join(DIGITS_SPLITS)})")
    bunch = load_digits()
    order = np.random.RandomState(0).permutation(len(bunch.target))[DIGITS_SPLITS[split]]
    if limit is not None:
        order = order[:limit]
    pixels = bunch.images.astype(np.uint8)[order]
    return SplitData(
        task="digits",
        split=split,
        source="sklearn.datasets.load_digits",
        modality="features",
        kind="classification",
        label_names=[str(d) for d in range(10)],
        dataset=_Rows(pixels, bunch.target[order], order.astype(np.int64)),
        collate=_collate,
        prepare=_prepare,
        preprocess={"features": "8x8 pixels flattened to 64, divided by 16", "split_rule": "permutation(seed=0)[:1437|1437:]",
                    "limit": limit},  # recorded, so distill re-reads the very rows that were cached
    )
