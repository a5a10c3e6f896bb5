"""Numeric feature vectors from NumPy `.npz` files: task `tabular`, any (N, D) table of floats with labels.

`--data` is a folder holding `train.npz`, `validation.npz` (and optionally `test.npz`), one file per split,
or a single `.npz` file, which then serves whichever split is asked for. Each file holds two arrays:

- `x`: (N, D) real numbers, the model input; kept and fed to the model as float32;
- `y`: (N,) labels: integer class ids -> classification (-1 = no label), floats -> regression (one output;
  NaN = no label);
- optionally `label_names`: (C,) strings, the class names in id order (classification only).

Row i of a split is row i of its file; the fingerprint hashes row i of `x` as float32 (exactly what the
model receives), so changing any one value of a row changes that row's fingerprint. Files are read with
`allow_pickle=False`. Bad input (missing file or array, wrong shapes, non-finite features, infinite or
out-of-range labels) is refused with one line naming the file.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdcache.data.base import LABEL_IDS, MISSING_CLASS, Batch, SplitData, split_file
from kdcache.errors import KDCacheError
from kdcache.fingerprint import fingerprint_features

TABULAR_SPLITS = ("train", "validation", "test")
_VALIDATION_ALIASES = ("dev", "val", "valid")


class _Rows(torch.utils.data.Dataset):
    def __init__(self, x: np.ndarray, labels: np.ndarray, index: np.ndarray) -> None:
        self.x, self.labels, self.index = x, labels, index
        self.fingerprints = np.array([fingerprint_features(row) for row in x], dtype=np.uint64)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, Any]:
        label = self.labels[i]
        return {"inputs": self.x[i], "label": label.item(), "index": int(self.index[i]),
                "fingerprint": int(self.fingerprints[i])}


class _Collate:
    def __init__(self, regression: bool) -> None:
        self.regression = regression

    def __call__(self, items: list[dict[str, Any]]) -> Batch:
        return Batch(
            inputs=torch.from_numpy(np.stack([it["inputs"] for it in items])),
            labels=torch.tensor([it["label"] for it in items],
                                dtype=torch.float32 if self.regression else torch.int64),
            index=torch.tensor([it["index"] for it in items], dtype=torch.int64),
            fingerprint=np.array([it["fingerprint"] for it in items], dtype=np.uint64),
        )


def _prepare(batch: Batch, device: torch.device) -> torch.Tensor:
    return batch.inputs.to(device, non_blocking=True).reshape(len(batch.index), -1).float()


def _split_file(data: Path, split: str) -> Path:
    if data.is_file():
        if data.suffix.lower() != ".npz":
            raise KDCacheError(f"{data}: unsupported file type {data.suffix!r}; task 'tabular' reads .npz files")
        return data
    if not data.is_dir():
        raise KDCacheError(f"{data}: no such file or folder; task 'tabular' expects a .npz file or a folder "
                           "holding train.npz, validation.npz (and test.npz)")
    return split_file(data, split, (split, *(_VALIDATION_ALIASES if split == "validation" else ())), ("npz",),
                      missing=f"{data / (split + '.npz')}: missing; task 'tabular' split {split!r} reads {split}.npz "
                              "from --data")


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if not zipfile.is_zipfile(path):  # np.load would try a .npy header, then pickle
        raise KDCacheError(f"{path}: not a readable .npz archive (not a zip file); save it with numpy.savez")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except (zipfile.BadZipFile, EOFError) as exc:
        raise KDCacheError(f"{path}: not a readable .npz archive ({exc})".splitlines()[0]) from exc
    except ValueError as exc:  # object arrays need pickle, which is never loaded
        message = f"{path}: unreadable array ({exc}); store x and y as numeric arrays"
        raise KDCacheError(message.splitlines()[0]) from exc
    except OSError as exc:
        raise KDCacheError(f"{path}: cannot read ({exc.strerror or exc})") from exc


def _features(arrays: dict[str, np.ndarray], path: Path) -> np.ndarray:
    if "x" not in arrays:
        raise KDCacheError(f"{path}: no array 'x' (arrays: {', '.join(arrays) or 'none'}); "
                           "task 'tabular' needs x (N, D) and y (N,)")
    x = arrays["x"]
    if x.dtype.kind not in "fiu":
        raise KDCacheError(f"{path}: x has dtype {x.dtype}; expected real numbers")
    if x.ndim != 2:
        raise KDCacheError(f"{path}: x has shape {x.shape}; expected (N, D): one row of D features per example")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise KDCacheError(f"{path}: x has shape {x.shape}: no rows or no features")
    with np.errstate(over="ignore", invalid="ignore"):  # values beyond float32 become inf, refused below
        x32 = x.astype(np.float32)
    bad = ~np.isfinite(x32)
    if bad.any():
        row, col = (int(v) for v in np.argwhere(bad)[0])
        raise KDCacheError(f"{path}: x[{row}, {col}] is {float(x[row, col])} (as float32: "
                           f"{float(x32[row, col])}); features must be finite "
                           f"({int(bad.any(axis=1).sum())} rows affected)")
    return np.ascontiguousarray(x32)


def _labels(arrays: dict[str, np.ndarray], path: Path, n: int) -> tuple[np.ndarray, str, list[str] | None, str | None]:
    """(labels, kind, label_names, label_names_from)."""
    if "y" not in arrays:
        raise KDCacheError(f"{path}: no array 'y' (arrays: {', '.join(arrays)}); task 'tabular' needs x (N, D) "
                           "and y (N,)")
    y = arrays["y"]
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise KDCacheError(f"{path}: y has shape {y.shape}; expected (N,): one label per row")
    if len(y) != n:
        raise KDCacheError(f"{path}: x has {n} rows but y has {len(y)}; they must match row for row")
    names_given = "label_names" in arrays
    if y.dtype.kind == "f":
        if names_given:
            raise KDCacheError(f"{path}: float y means regression, which takes no label_names "
                               "(store integer class ids for classification)")
        with np.errstate(over="ignore", invalid="ignore"):
            labels = y.astype(np.float32)
        bad = np.isinf(labels)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise KDCacheError(f"{path}: y[{row}] is {float(y[row])} (as float32: {float(labels[row])}); "
                               "regression labels must be finite (NaN = no label)")
        return labels, "regression", None, None
    if y.dtype.kind not in "iu":
        raise KDCacheError(f"{path}: y has dtype {y.dtype}; expected integer class ids or float regression targets")
    labels = y.astype(np.int64)
    bad = labels < MISSING_CLASS
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise KDCacheError(f"{path}: y[{row}] is {int(labels[row])}; class ids are 0, 1, ... (-1 = no label)")
    largest = int(labels.max())
    if names_given:
        names_array = arrays["label_names"]
        if names_array.ndim != 1 or names_array.dtype.kind not in "UST":
            raise KDCacheError(f"{path}: label_names must be a 1-D array of strings, got {names_array.dtype} "
                               f"{names_array.shape}")
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in names_array.tolist()]
        if largest >= len(names):
            row = int(np.flatnonzero(labels == largest)[0])
            raise KDCacheError(f"{path}: y[{row}] is {largest}, outside label_names ({len(names)} classes)")
        return labels, "classification", names, "label_names"
    if largest < 0:  # no labelled row: the class set comes from the teacher or another split
        return labels, "classification", None, None
    return labels, "classification", [str(k) for k in range(largest + 1)], LABEL_IDS


def load_tabular_split(data: str | Path, split: str, *, limit: int | None = None) -> SplitData:
    """One split of an .npz table: rows in file order, fingerprinted as float32 feature vectors."""
    data = Path(data).expanduser()
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise KDCacheError(f"{data}: limit must be a positive integer, got {limit!r}")
    path = _split_file(data, split)
    arrays = _read_npz(path)
    x = _features(arrays, path)
    labels, kind, names, names_from = _labels(arrays, path, len(x))
    rows_in_file, features = x.shape
    keep = rows_in_file if limit is None else min(limit, rows_in_file)
    return SplitData(
        task="tabular",
        split=split,
        source=os.path.abspath(path),
        modality="features",
        kind=kind,
        label_names=names,
        dataset=_Rows(x[:keep], labels[:keep], np.arange(keep, dtype=np.int64)),
        collate=_Collate(kind == "regression"),
        prepare=_prepare,
        preprocess={"file": path.name, "format": "npz", "shape": [rows_in_file, features],
                    "x_dtype": str(arrays["x"].dtype), "features": f"x rows as float32 ({features} features)",
                    "label_names_from": names_from, "limit": limit},
    )


__all__ = ["TABULAR_SPLITS", "load_tabular_split"]
