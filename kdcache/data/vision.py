"""torchvision's datasets read from their files as distributed: MNIST and Fashion-MNIST (idx files, `.gz` or
not), SVHN (`*_32x32.mat`) and ImageNet (torchvision's extracted folder layout, `train/` and `val/` of WordNet-id
class folders, with its `meta.bin` when present).

`--data` is the folder that holds the files: the four idx files side by side, or torchvision's own root
(`MNIST/raw/`, `FashionMNIST/raw/`); the `.mat` files; the ImageNet root. Class names are torchvision's
(`torchvision.datasets.MNIST.classes`, ...). The files are read here rather than through torchvision's classes
where those would refuse them: `MNIST` reads only unpacked idx files, `SVHN` checks each file's MD5 (a
1.3 GB hash on every run), and both stop on a bad file with an assertion rather than the file's name. A test
holds the readings equal to torchvision's on the layouts torchvision reads (tests/data/test_vision.py).
Row i is the i-th image of the file; `--limit` reads only the first rows (the idx files are streamed).
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from kdcache.errors import KDCacheError, SplitMissing

#: task -> (torchvision's folder under the root, torchvision class attribute, train/test file prefixes)
_IDX = {
    "mnist": ("MNIST", "MNIST"),
    "fashion-mnist": ("FashionMNIST", "FashionMNIST"),
}
_IDX_PREFIX = {"train": "train", "test": "t10k"}
_SPLIT_ALIASES = {"validation": "test", "val": "test"}
_SVHN_SPLITS = ("train", "test", "extra")
IMAGENET_META = "meta.bin"
IMAGENET_ARCHIVES = {"train": "ILSVRC2012_img_train.tar", "val": "ILSVRC2012_img_val.tar"}


def _split_name(task: str, split: str, splits: tuple[str, ...], where: Path) -> str:
    used = _SPLIT_ALIASES.get(split, split)
    if used not in splits:
        raise KDCacheError(f"{where}: unknown {task} split {split!r} (splits: {', '.join(splits)}; validation is an "
                           "alias of test)")
    return used


# ---------------------------------------------------------------------------------------------- idx (MNIST)

def read_idx(path: Path, limit: int | None = None) -> np.ndarray:
    """The uint8 array of an idx file (`.gz` or not); with `limit`, only the first `limit` items are read."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4 or head[:2] != b"\x00\x00":
                raise KDCacheError(f"{path}: not an idx file (its first bytes are not an idx header)")
            if head[2] != 0x08:
                raise KDCacheError(f"{path}: idx items of type 0x{head[2]:02x}; MNIST-style images and labels are "
                                   "unsigned bytes (0x08)")
            ndim = head[3]
            if not 1 <= ndim <= 3:
                raise KDCacheError(f"{path}: idx file of {ndim} dimensions; expected 1 (labels) or 3 (images)")
            dims_raw = f.read(4 * ndim)
            if len(dims_raw) < 4 * ndim:
                raise KDCacheError(f"{path}: truncated idx header")
            dims = struct.unpack(f">{ndim}I", dims_raw)
            rows = dims[0] if limit is None else min(int(limit), dims[0])
            want = rows * math.prod(dims[1:])
            raw = f.read(want)
    except KDCacheError:
        raise
    except (OSError, EOFError, zlib.error) as exc:
        raise KDCacheError(f"{path}: cannot read ({type(exc).__name__}: {exc})".splitlines()[0]) from exc
    if len(raw) < want:
        raise KDCacheError(f"{path}: truncated: its header promises {dims[0]:,} items of shape {list(dims[1:])}, "
                           f"but the file ends after {len(raw):,} of {want:,} bytes")
    return np.frombuffer(bytearray(raw), dtype=np.uint8).reshape(rows, *dims[1:])  # writable, as torch wants


def _idx_present(task: str, data: Path, name: str) -> list[Path]:
    return [candidate for folder in (data, data / _IDX[task][0] / "raw", data / "raw")
            for candidate in (folder / name, folder / f"{name}.gz") if candidate.is_file()]


def _idx_file(task: str, data: Path, name: str) -> Path:
    """`name` or `name.gz` in the folder itself, or under torchvision's `<Dataset>/raw/`."""
    present = _idx_present(task, data, name)
    if present:
        return present[0]
    if not data.is_dir():
        raise KDCacheError(f"{data}: no such folder; {task} expects the folder holding its four idx files "
                           f"(e.g. {name}.gz) or torchvision's root ({_IDX[task][0]}/raw/)")
    raise KDCacheError(f"{data / name}(.gz): missing; {task} expects train-images-idx3-ubyte, "
                       f"train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (.gz or not) side by "
                       f"side in {data}, or under {_IDX[task][0]}/raw/")


def load_idx(task: str, data: Path, split: str, limit: int | None) -> tuple[np.ndarray, np.ndarray, list[str], str, dict]:
    """(planes N1HW, labels, class names, split used, what was read) of MNIST or Fashion-MNIST."""
    import torchvision.datasets as tvd

    used = _split_name(task, split, ("train", "test"), data)
    prefix = _IDX_PREFIX[used]
    try:
        images_path = _idx_file(task, data, f"{prefix}-images-idx3-ubyte")
    except KDCacheError as exc:  # no images file: the split is not there (an images file alone is damage)
        missing = data.is_dir() and not any(_idx_present(task, data, f"{prefix}-labels-idx1-ubyte"))
        raise (SplitMissing(str(exc)) if missing else exc) from None
    labels_path = _idx_file(task, data, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(images_path, limit), read_idx(labels_path, limit)
    if images.ndim != 3 or labels.ndim != 1:
        raise KDCacheError(f"{images_path if images.ndim != 3 else labels_path}: expected images of 3 dimensions and "
                           f"labels of 1, got {images.ndim} and {labels.ndim}")
    if len(images) != len(labels):
        raise KDCacheError(f"{labels_path}: {len(labels):,} labels for {len(images):,} images in {images_path.name}")
    names = list(getattr(tvd, _IDX[task][1]).classes)
    if labels.size and int(labels.max()) >= len(names):
        raise KDCacheError(f"{labels_path}: label {int(labels.max())} outside {task}'s {len(names)} classes")
    info = {"layout": "idx", "files": [str(images_path.resolve()), str(labels_path.resolve())]}
    return images[:, None], labels.astype(np.int64), names, used, info


# ---------------------------------------------------------------------------------------------- SVHN

def load_svhn(data: Path, split: str, limit: int | None) -> tuple[np.ndarray, np.ndarray, list[str], str, dict]:
    """(planes NCHW, labels with 10 read as 0 as torchvision does, class names, split used, what was read)."""
    import scipy.io

    used = _split_name("svhn", split, _SVHN_SPLITS, data)
    path = data / f"{used}_32x32.mat"
    if not path.is_file():
        if not data.is_dir():
            raise KDCacheError(f"{data}: no such folder; svhn expects the folder holding train_32x32.mat, "
                               "test_32x32.mat (and extra_32x32.mat)")
        raise SplitMissing(f"{path}: missing; svhn expects train_32x32.mat, test_32x32.mat (and extra_32x32.mat) "
                           f"in {data}, as torchvision's root holds them")
    try:
        mat = scipy.io.loadmat(str(path), variable_names=["X", "y"])
    except Exception as exc:  # noqa: BLE001 - scipy raises ValueError, MatReadError, OSError, ...
        raise KDCacheError(f"{path}: not a readable MATLAB file ({type(exc).__name__}: {exc})".splitlines()[0]) from exc
    if "X" not in mat or "y" not in mat:
        raise KDCacheError(f"{path}: missing the X or y variable (found: {', '.join(sorted(mat)) or 'none'})")
    x, y = np.asarray(mat["X"]), np.asarray(mat["y"]).reshape(-1)
    if x.ndim != 4 or x.shape[2] != 3 or x.dtype != np.uint8:
        raise KDCacheError(f"{path}: X is {x.dtype} of shape {list(x.shape)}; expected uint8 (32, 32, 3, N)")
    if x.shape[3] != len(y):
        raise KDCacheError(f"{path}: {len(y):,} labels for {x.shape[3]:,} images")
    if y.size and (y.min() < 0 or y.max() > 10):
        raise KDCacheError(f"{path}: labels outside 0-10 (SVHN writes the digit 0 as 10)")
    if limit is not None:
        x, y = x[..., :limit], y[:limit]
    planes = np.ascontiguousarray(np.transpose(x, (3, 2, 0, 1)))  # (H, W, C, N) -> (N, C, H, W)
    labels = np.where(y == 10, 0, y).astype(np.int64)
    info = {"layout": "mat", "files": [str(path.resolve())], "label_rule": "10 -> 0 (as torchvision.datasets.SVHN)"}
    return planes, labels, [str(d) for d in range(10)], used, info


# ---------------------------------------------------------------------------------------------- ImageNet

def imagenet_root(data: Path, split: str) -> tuple[Path, dict[str, Any]]:
    """The ImageNet root checked for the split's folder (refusing an unextracted archive with how to extract it),
    and the class descriptions of its meta.bin, when it has one."""
    if not data.is_dir():
        raise KDCacheError(f"{data}: no such folder; imagenet expects torchvision's ImageNet root (train/ and val/ "
                           "of WordNet-id class folders, and meta.bin)")
    used = "val" if split in ("validation", "val", "test") else split
    if used not in IMAGENET_ARCHIVES:
        raise KDCacheError(f"{data}: unknown imagenet split {split!r} (splits: train, val; validation is val)")
    if not (data / used).is_dir():
        archive = IMAGENET_ARCHIVES[used]
        hint = (f"{archive} is here but not extracted: run torchvision.datasets.ImageNet({str(data)!r}, "
                f"split={used!r}) once to extract it" if (data / archive).is_file() else
                f"expected torchvision's extracted layout {used}/<wnid>/<image>.JPEG")
        if not (data / archive).is_file():
            raise SplitMissing(f"{data / used}: missing; {hint}")
        raise KDCacheError(f"{data / used}: missing; {hint}")
    info: dict[str, Any] = {"layout": "imagenet"}
    if (data / IMAGENET_META).is_file():
        from torchvision.datasets.imagenet import load_meta_file

        try:
            wnid_to_classes = load_meta_file(str(data))[0]
        except Exception as exc:  # noqa: BLE001 - torch.load raises many types on a damaged file
            raise KDCacheError(f"{data / IMAGENET_META}: unreadable ({type(exc).__name__}: {exc})".splitlines()[0]) from exc
        info["class_descriptions"] = {str(k): str(v[0]) if isinstance(v, (tuple, list)) and v else str(v)
                                     for k, v in dict(wnid_to_classes).items()}
    return data, info


__all__ = ["IMAGENET_META", "imagenet_root", "load_idx", "load_svhn", "read_idx"]
