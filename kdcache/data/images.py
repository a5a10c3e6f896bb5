"""Image data sources: CIFAR-10/100 python pickles, image-folder trees (a folder or a zip read in place), and
MNIST, Fashion-MNIST, SVHN and ImageNet as torchvision distributes them (kdcache/data/vision.py).

Row i of a split is the i-th image of the pickle batches in file order, or the i-th image file in sorted
(class folder, path within the class folder) order. Images are decoded only when an item is read, so
loading a 50,000-image split costs one directory (or zip) listing. Each item carries the uint8 HWC pixels'
fingerprint, taken after the optional resize, i.e. over exactly the pixels the model sees before scaling.
"""

from __future__ import annotations

import io
import os
import pickle
import stat
import threading
import zipfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdcache.data.base import Batch, SplitData
from kdcache.errors import KDCacheError, SplitMissing
from kdcache.fingerprint import fingerprint_pixels

from kdcache.names import IMAGE_TASKS
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
#: The largest image file read (a zip member's size is checked in its header and again while it is read): a
#: 1.6 MB zip must not become gigabytes in memory. Real photographs, ImageNet's largest included, are far smaller.
MAX_IMAGE_FILE_BYTES = 64 * 1024**2

#: name -> (mean, std) per RGB channel, applied after scaling pixels to [0, 1]; None means no normalisation.
NORMALIZE_PRESETS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]] | None] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "none": None,
}
DEFAULT_NORMALIZE = {"cifar10": "cifar10", "cifar100": "cifar100", "imagefolder": "imagenet", "imagenet": "imagenet",
                     "mnist": "mnist", "fashion-mnist": "fashion-mnist", "svhn": "svhn"}
#: ImageNet's images differ in size: the shorter side goes to this many pixels, then a centred square crop.
IMAGENET_DEFAULT_SIZE = 224

# CIFAR as distributed (python pickles): folder name, split -> batch files, meta file, label keys.
_CIFAR = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "splits": {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
        "meta": "batches.meta",
        "names_key": b"label_names",
        "labels_key": b"labels",
        "num_classes": 10,
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "splits": {"train": ["train"], "test": ["test"]},
        "meta": "meta",
        "names_key": b"fine_label_names",
        "labels_key": b"fine_labels",
        "num_classes": 100,
    },
}
_CIFAR_ALIASES = {"validation": "test", "val": "test"}
# A requested validation split resolves to the first of these folders that exists.
_VALIDATION_FOLDERS = ("val", "validation", "test")
_SPLIT_FOLDER_NAMES = ("train", "test", "val", "validation")
_IGNORED_DIRS = ("__MACOSX",)


# ---------------------------------------------------------------------------------------------- pixels

def _resize_hwc(hwc: np.ndarray, image_size: int) -> np.ndarray:
    """Shorter side to image_size (bilinear, antialiased), then a centred image_size square: deterministic."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    chw = torch.from_numpy(np.ascontiguousarray(hwc)).permute(2, 0, 1)
    if min(chw.shape[-2:]) != image_size:
        chw = F.resize(chw, [image_size], interpolation=InterpolationMode.BILINEAR, antialias=True)
    chw = F.center_crop(chw, [image_size, image_size])
    return chw.permute(1, 2, 0).contiguous().numpy()


def _item(hwc: np.ndarray, label: int, index: int, image_size: int | None) -> dict[str, Any]:
    if image_size is not None:
        hwc = _resize_hwc(hwc, image_size)
    hwc = np.ascontiguousarray(hwc, dtype=np.uint8)
    return {
        "inputs": torch.from_numpy(hwc).permute(2, 0, 1).contiguous(),
        "label": int(label),
        "index": int(index),
        "fingerprint": fingerprint_pixels(hwc),
    }


def _collate(items: list[dict[str, Any]]) -> Batch:
    return Batch(
        inputs=torch.stack([it["inputs"] for it in items]),
        labels=torch.tensor([it["label"] for it in items], dtype=torch.int64),
        index=torch.tensor([it["index"] for it in items], dtype=torch.int64),
        fingerprint=np.array([it["fingerprint"] for it in items], dtype=np.uint64),
    )


class _Prepare:
    """uint8 NCHW on `device` -> float32 in [0, 1] -> (x - mean) / std; a class so it pickles for workers."""

    def __init__(self, mean: tuple[float, ...] | None, std: tuple[float, ...] | None) -> None:
        self.mean, self.std = mean, std

    def __call__(self, batch: Batch, device: torch.device) -> torch.Tensor:
        x = batch.inputs.to(device, non_blocking=True).float().div_(255.0)
        if self.mean is not None:
            mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
            std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
            x = x.sub_(mean).div_(std)
        return x


# ---------------------------------------------------------------------------------------------- CIFAR

class _PlaneImages(torch.utils.data.Dataset):
    """Rows kept as blocks of (n, C, H, W) planes, one per source file (never concatenated: no second copy of
    the split at load); an item is the row as HWC (optionally resized)."""

    def __init__(self, planes: np.ndarray | list[np.ndarray], labels: np.ndarray, image_size: int | None) -> None:
        self.blocks = [planes] if isinstance(planes, np.ndarray) else list(planes)
        self.starts = np.cumsum([0] + [len(b) for b in self.blocks])
        self.labels, self.image_size = labels, image_size
        if self.starts[-1] != len(labels):
            raise ValueError(f"{self.starts[-1]} images but {len(labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < len(self.labels):
            raise IndexError(i)
        b = int(np.searchsorted(self.starts, i, side="right")) - 1
        return _item(self.blocks[b][i - self.starts[b]].transpose(1, 2, 0), self.labels[i], i, self.image_size)


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """What protocol-2 pickles written by Python 3 use to rebuild a bytes object (`_codecs.encode`), and nothing else."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Forbidden(f"_codecs.encode({type(text).__name__}, {encoding!r}) is not a bytes literal")
    return text.encode("latin1")


class _Forbidden(pickle.UnpicklingError):
    """A pickle that names a callable a CIFAR batch never holds."""


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR python batches (dicts of bytes, lists, ints and numpy arrays) and nothing else: a pickle
    that names any other callable (os.system, builtins.eval, ...) is refused before that callable is ever looked up."""

    _NUMPY = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
              ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
              ("numpy._core.multiarray", "scalar")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._NUMPY:
            return super().find_class(module, name)
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        raise _Forbidden(f"it names {module}.{name}, which a CIFAR batch never holds")


def _read_pickle(path: Path, expected: str = "") -> dict:
    if not path.is_file():
        raise KDCacheError(f"{path}: missing{'; expected ' + expected if expected else ''}")
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(f, encoding="bytes").load()
    except _Forbidden as exc:
        raise KDCacheError(f"{path}: refused: not a plain CIFAR python batch ({exc}); kdcache unpickles only numpy "
                           "arrays, lists, dicts, bytes and numbers") from None
    except Exception as exc:  # noqa: BLE001 - unpickling raises anything from EOFError to ValueError
        raise KDCacheError(f"{path}: not a readable CIFAR python pickle ({type(exc).__name__}: {exc})".splitlines()[0]) from exc
    if not isinstance(obj, dict):
        raise KDCacheError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return obj


#: Pickle opcodes that hold raw bytes in the file, and the size of their length field: the pixels of the CIFAR
#: batches as distributed (Python 2's BINSTRING) and of protocol 3+ pickles can be mapped where they lie.
_RAW_OPCODES = {"BINSTRING": 4, "BINBYTES": 4, "BINBYTES8": 8, "BYTEARRAY8": 8}


def _map_pickled_pixels(path: Path, pixels: np.ndarray) -> np.ndarray | None:
    """`pixels` as a read-only memory map of the pickle file itself, or None where the file stores them otherwise
    (Python 3's protocol 2 writes bytes as text): the split is then never held in memory, only the pages of the
    rows read. The mapped bytes are compared with the unpickled ones (by reads, not through the map) first."""
    import pickletools

    size = pixels.nbytes
    try:
        with open(path, "rb") as f:
            offset = None
            for op, arg, pos in pickletools.genops(f):
                if op.name in _RAW_OPCODES and isinstance(arg, (bytes, bytearray, str)) and len(arg) == size:
                    offset = pos + 1 + _RAW_OPCODES[op.name]
                    break
            if offset is None:
                return None
            flat = pixels.reshape(-1)
            f.seek(offset)
            for start in range(0, size, 1 << 22):
                block = f.read(min(1 << 22, size - start))
                if np.frombuffer(block, dtype=np.uint8).tobytes() != flat[start:start + len(block)].tobytes():
                    return None
        return np.memmap(path, dtype=np.uint8, mode="r", offset=offset, shape=pixels.shape)
    except (OSError, ValueError, pickle.UnpicklingError):
        return None


def _cifar_folder(task: str, data: Path) -> Path:
    spec = _CIFAR[task]
    if (data / spec["folder"]).is_dir():
        return data / spec["folder"]
    if data.is_dir() and (data / spec["meta"]).is_file():
        return data
    first = spec["splits"]["train"][0]
    expected = f"{spec['folder']}/ ({', '.join(spec['splits']['train'] + spec['splits']['test'])}, {spec['meta']})"
    if not data.exists():
        raise KDCacheError(f"{data}: no such folder; {task} expects the python-pickle folder {expected} or its parent")
    if not data.is_dir():
        raise KDCacheError(f"{data}: not a folder; {task} expects the python-pickle folder {expected} (extract the archive)")
    if (data / first).is_file():
        raise KDCacheError(f"{data / spec['meta']}: missing; {task} needs it for the class names")
    raise KDCacheError(f"{data}: no {task} batches here; expected the python-pickle folder {expected} or its parent")


def _load_cifar(task: str, data: Path, split: str, limit: int | None, image_size: int | None):
    spec = _CIFAR[task]
    folder = _cifar_folder(task, data)
    split_used = _CIFAR_ALIASES.get(split, split)
    if split_used not in spec["splits"]:
        raise KDCacheError(f"{folder}: unknown {task} split {split!r} (splits: train, test; validation is an alias of test)")
    expected = f"{task} python batches: {', '.join(spec['splits']['train'] + spec['splits']['test'])}, {spec['meta']}"
    meta = _read_pickle(folder / spec["meta"], expected)
    if spec["names_key"] not in meta:
        raise KDCacheError(f"{folder / spec['meta']}: no {spec['names_key'].decode()!r} entry")
    names = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in meta[spec["names_key"]]]
    planes, labels = [], []
    rows = 0
    for name in spec["splits"][split_used]:
        if limit is not None and rows >= limit:
            break
        path = folder / name
        batch = _read_pickle(path, expected)
        if b"data" not in batch or spec["labels_key"] not in batch:
            raise KDCacheError(f"{path}: missing the b'data' or {spec['labels_key']!r} entry (keys: {sorted(map(repr, batch))})")
        pixels = np.asarray(batch[b"data"])
        batch_labels = np.asarray(batch[spec["labels_key"]], dtype=np.int64)
        if pixels.ndim != 2 or pixels.shape[1] != 3072 or pixels.dtype != np.uint8:
            raise KDCacheError(f"{path}: b'data' is {pixels.dtype} {tuple(pixels.shape)}; expected uint8 (rows, 3072): "
                               "32x32 R, G and B planes per row")
        if batch_labels.shape != (len(pixels),):
            raise KDCacheError(f"{path}: {len(pixels)} image rows but {batch_labels.size} labels")
        if batch_labels.size and (batch_labels.min() < 0 or batch_labels.max() >= len(names)):
            raise KDCacheError(f"{path}: labels outside 0..{len(names) - 1}")
        keep = len(pixels) if limit is None else min(len(pixels), limit - rows)
        mapped = _map_pickled_pixels(path, pixels)  # the file's own bytes, read only when a row is
        kept = pixels if mapped is None else mapped
        kept = kept if keep == len(kept) else kept[:keep].copy()  # a view would keep the whole batch alive
        planes.append(kept.reshape(-1, 3, 32, 32))
        labels.append(batch_labels[:keep])
        rows += keep
        del batch, pixels
    labels_all = np.concatenate(labels)
    if len(labels_all) == 0:
        raise KDCacheError(f"{folder}: split {split_used!r} has no rows")
    info = {"layout": "pickle", "split_files": spec["splits"][split_used], "input_size": [32, 32]}
    if task == "cifar100":
        info["label_set"] = "fine"
    return str(folder.resolve()), names, _PlaneImages(planes, labels_all, image_size), split_used, info


# ---------------------------------------------------------------------------------------------- image folders

def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _hidden(part: str) -> bool:
    return part.startswith(".") or part in _IGNORED_DIRS


# (path, mtime_ns, size) -> (pid, handle): opening a 60,000-member zip parses its whole central directory,
# so each process opens a given zip once and every dataset over it shares that handle. A handle opened
# before a fork is never used by the child (its file offset would be shared with the parent).
_ZIP_HANDLES: dict[tuple[str, int, int], tuple[int, zipfile.ZipFile]] = {}
_ZIP_LOCK = threading.Lock()


def _zip_key(path: str | Path) -> tuple[str, int, int]:
    st = os.stat(path)
    return (str(path), st.st_mtime_ns, st.st_size)


def _open_zip(key: tuple[str, int, int]) -> zipfile.ZipFile:
    pid = os.getpid()
    with _ZIP_LOCK:
        held = _ZIP_HANDLES.get(key)
        if held is None or held[0] != pid:
            try:
                held = (pid, zipfile.ZipFile(key[0]))
            except (zipfile.BadZipFile, OSError) as exc:
                raise KDCacheError(f"{key[0]}: not a readable zip file ({exc})".splitlines()[0]) from exc
            _ZIP_HANDLES[key] = held
        return held[1]


@lru_cache(maxsize=8)
def _zip_tree(key: tuple[str, int, int]) -> tuple[str, dict[str, list[tuple[str, str]]]]:
    """One listing per zip (keyed by its stat): (root prefix, split -> [(class, member name)] of image files)."""
    names = [n for n in _open_zip(key).namelist() if not n.endswith("/")]
    names = [n for n in names if not any(_hidden(p) for p in n.split("/")[:-1])]
    tops = {n.split("/", 1)[0] for n in names if "/" in n}
    prefix = ""
    if not tops & set(_SPLIT_FOLDER_NAMES) and len(tops) == 1:
        prefix = next(iter(tops)) + "/"  # the tree sits under one top-level folder
    tree: dict[str, list[tuple[str, str]]] = {}
    for name in names:
        if not name.startswith(prefix):
            continue
        parts = name[len(prefix):].split("/")
        if len(parts) < 2:
            continue
        entries = tree.setdefault(parts[0], [])
        if len(parts) >= 3 and _is_image(parts[-1]) and not _hidden(parts[-1]):
            entries.append((parts[1], name))
    return prefix, tree


def _folder_split(split_dir: Path) -> list[tuple[str, str]]:
    """[(class, path relative to split_dir)] for the image files under class subfolders, any depth."""
    found = []
    for class_dir in os.scandir(split_dir):
        if not class_dir.is_dir() or _hidden(class_dir.name):
            continue
        for root, dirs, files in os.walk(class_dir.path):
            dirs[:] = [d for d in dirs if not _hidden(d)]
            for f in files:
                if _is_image(f) and not _hidden(f):
                    found.append((class_dir.name, os.path.relpath(os.path.join(root, f), split_dir).replace(os.sep, "/")))
    return found


def _has_image(class_dir: Path) -> bool:
    """Whether a class folder holds at least one image (stops at the first): empty folders are not classes."""
    for root, dirs, files in os.walk(class_dir):
        dirs[:] = [d for d in dirs if not _hidden(d)]
        if any(_is_image(f) and not _hidden(f) for f in files):
            return True
    return False


def _resolve_split_folder(split: str, available: list[str], where: str) -> str:
    if split in available:
        return split
    if split in ("validation", "val"):
        for candidate in _VALIDATION_FOLDERS:
            if candidate in available:
                return candidate
    listing = ", ".join(sorted(available)) or "none"
    hint = " (validation resolves to val, validation or test)" if split in ("validation", "val") else ""
    raise SplitMissing(f"{where}: no split folder {split!r}{hint}; split folders found: {listing}")


def _decode(raw: bytes, where: str) -> np.ndarray:
    """RGB uint8 HWC pixels. 16-bit grayscale (PNG's I;16, or I from older Pillow) is scaled to 8 bits
    (round(v * 255 / 65535)), not clipped at 255 as Pillow's convert("RGB") would; other high-depth modes
    (32-bit integer or float samples) are refused rather than guessed."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(raw)) as img:
            img.load()
            if img.mode.startswith("I;16") or (img.mode == "I" and img.format == "PNG"):
                wide = np.asarray(img, dtype=np.uint32)
                if wide.max(initial=0) > 65535:
                    raise ValueError(f"mode {img.mode} holds values above 65535")
                gray = ((wide * 255 + 32767) // 65535).astype(np.uint8)
                return np.repeat(gray[..., None], 3, axis=2)
            if img.mode in ("I", "F"):
                raise KDCacheError(f"{where}: {img.mode} image ({'32-bit integer' if img.mode == 'I' else 'float'} "
                                   "samples), which has no agreed 8-bit reading; convert it to 8-bit RGB or grayscale")
            rgb = img.convert("RGB")
    except KDCacheError:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, DecompressionBombError
        raise KDCacheError(f"{where}: cannot decode image ({type(exc).__name__}: {exc})".splitlines()[0]) from exc
    return np.array(rgb, dtype=np.uint8)


class _FileImages(torch.utils.data.Dataset):
    """Image files in a folder or a zip, decoded on access; a zip is opened lazily once per process."""

    def __init__(self, root: Path, zip_key: tuple[str, int, int] | None, members: list[str], labels: np.ndarray,
                 image_size: int | None, reference: tuple[str, tuple[int, int]] | None = None) -> None:
        # The dataset holds only the zip's key; the handle is looked up per process (see _open_zip).
        self.root, self.zip_key, self.members, self.labels = root, zip_key, members, labels
        self.zip_path = Path(zip_key[0]) if zip_key is not None else None
        self.image_size = image_size
        self.reference = reference  # (file, (width, height)) every image must match when image_size is None

    def __len__(self) -> int:
        return len(self.members)

    def where(self, i: int) -> str:
        """How an error names row i's file: a path, or 'member in archive.zip'."""
        if self.zip_path is not None:
            return f"{self.members[i]} in {self.zip_path}"
        return str(self.root / self.members[i])

    def read_bytes(self, i: int) -> bytes:
        """The file's bytes, never more than MAX_IMAGE_FILE_BYTES: a size beyond it is refused before reading."""
        limit = MAX_IMAGE_FILE_BYTES
        try:
            if self.zip_key is not None:
                archive = _open_zip(self.zip_key)
                info = archive.getinfo(self.members[i])
                if info.file_size > limit:
                    raise KDCacheError(f"{self.where(i)}: expands to {info.file_size:,} bytes, beyond the "
                                       f"{limit:,}-byte limit for one image file (a damaged or hostile zip)")
                with archive.open(info) as member:
                    raw = member.read(limit + 1)  # headers can lie: stop at the limit whatever they say
            else:
                with open(self.root / self.members[i], "rb") as f:  # stat the open file: no race, no link trick
                    info = os.fstat(f.fileno())
                    if not stat.S_ISREG(info.st_mode):
                        raise KDCacheError(f"{self.where(i)}: not a regular file (a device or a pipe); refusing "
                                           "to read it as an image")
                    if info.st_size > limit:
                        raise KDCacheError(f"{self.where(i)}: {info.st_size:,} bytes, beyond the {limit:,}-byte "
                                           "limit for one image file")
                    raw = f.read(limit + 1)
        except (OSError, KeyError, zipfile.BadZipFile, EOFError) as exc:
            raise KDCacheError(f"{self.where(i)}: cannot read ({exc})".splitlines()[0]) from exc
        if len(raw) > limit:
            raise KDCacheError(f"{self.where(i)}: expands beyond the {limit:,}-byte limit for one image file "
                               "(a damaged or hostile zip)")
        return raw

    def size_of(self, i: int) -> tuple[int, int]:
        """(width, height) from the file header alone, without decoding the pixels."""
        from PIL import Image

        try:
            with Image.open(io.BytesIO(self.read_bytes(i))) as img:
                return img.size
        except KDCacheError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise KDCacheError(f"{self.where(i)}: cannot decode image ({type(exc).__name__}: {exc})".splitlines()[0]) from exc

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < len(self.members):
            raise IndexError(i)
        hwc = _decode(self.read_bytes(i), self.where(i))
        if self.image_size is None and self.reference is not None:
            ref_file, (w, h) = self.reference
            if hwc.shape[:2] != (h, w):
                raise KDCacheError(
                    f"{self.where(i)}: image is {hwc.shape[1]}x{hwc.shape[0]} but {ref_file} is {w}x{h} (WxH); "
                    "images of a split must share one size, or pass image_size to resize and centre-crop"
                )
        return _item(hwc, self.labels[i], i, self.image_size)


def _load_imagefolder(data: Path, split: str, limit: int | None, image_size: int | None):
    if not data.exists():
        raise KDCacheError(f"{data}: no such file or folder; imagefolder expects a folder (or .zip) holding "
                           "<split>/<class>/<image> (splits: train, and test or val)")
    if data.is_file():
        if data.suffix.lower() != ".zip":
            raise KDCacheError(f"{data}: not a folder or .zip; imagefolder expects <split>/<class>/<image> in one")
        zip_key = _zip_key(data.resolve())
        prefix, tree = _zip_tree(zip_key)
        where = f"{data}" + (f" (under {prefix})" if prefix else "")
        split_dir = _resolve_split_folder(split, sorted(tree), where)
        entries = list(tree[split_dir])
        train_entries = tree.get("train")
        layout, zip_path, root = "zip", zip_key, data.resolve()
        strip = len(prefix) + len(split_dir) + 1
        entries = [(cls, member[strip:]) for cls, member in entries]
    else:
        available = [e.name for e in os.scandir(data) if e.is_dir() and not _hidden(e.name)]
        where = str(data)
        split_dir = _resolve_split_folder(split, available, where)
        entries = _folder_split(data / split_dir)
        train_entries = None
        if split_dir != "train" and "train" in available:
            train_entries = [(e.name, "") for e in os.scandir(data / "train")
                             if e.is_dir() and not _hidden(e.name) and _has_image(Path(e.path))]
        layout, zip_path, root = "folder", None, (data / split_dir).resolve()
    split_where = f"{split_dir}/ in {data}" if layout == "zip" else str(data / split_dir)
    if not entries:
        raise KDCacheError(f"{split_where}: no images ({', '.join(e.lstrip('.') for e in IMAGE_EXTENSIONS)}) "
                           "under class subfolders (expected <class>/<image>)")
    split_classes = sorted({cls for cls, _ in entries})
    if split_dir != "train" and train_entries:
        names = sorted({cls for cls, _ in train_entries})
        extra = [c for c in split_classes if c not in set(names)]
        if extra:
            raise KDCacheError(f"{split_where}: class folder(s) {', '.join(extra[:5])} not among the train split's "
                               f"{len(names)} classes, so class ids cannot agree across splits")
        class_source = "train"
    else:
        names = split_classes
        class_source = split_dir
    to_id = {c: k for k, c in enumerate(names)}
    entries.sort(key=lambda e: (e[0], e[1]))
    if limit is not None:
        entries = entries[:limit]
    labels = np.array([to_id[c] for c, _ in entries], dtype=np.int64)
    if layout == "zip":
        members = [f"{prefix}{split_dir}/{rel}" for _, rel in entries]
    else:
        members = [rel for _, rel in entries]
    dataset = _FileImages(root, zip_path, members, labels, image_size)
    info: dict[str, Any] = {"layout": layout, "split_folder": split_dir, "class_names_from": class_source}
    if layout == "zip":
        info["zip_prefix"] = prefix
    if image_size is None:
        w, h = dataset.size_of(0)
        dataset.reference = (dataset.where(0), (w, h))
        info["input_size"] = [h, w]
    source = str(data.resolve())
    return source, names, dataset, split_dir, info


def _load_planes(task: str, data: Path, split: str, limit: int | None, image_size: int | None):
    """MNIST, Fashion-MNIST or SVHN: the whole split's pixels as planes (47 MB to 1.6 GB), rows decoded on access."""
    from kdcache.data.vision import load_idx, load_svhn

    if task == "svhn":
        planes, labels, names, used, info = load_svhn(data, split, limit)
    else:
        planes, labels, names, used, info = load_idx(task, data, split, limit)
    if not len(labels):
        raise KDCacheError(f"{info['files'][0]}: no images")
    return str(data.resolve()), names, _PlaneImages(planes, labels, image_size), used, info


# ---------------------------------------------------------------------------------------------- entry point

def load_image_split(task: str, data: str | Path, split: str, *, normalize: str | None = None,
                     image_size: int | None = None, limit: int | None = None) -> SplitData:
    """One split of an image dataset (CIFAR pickles, an image-folder tree or zip, torchvision's MNIST, Fashion-MNIST,
    SVHN and ImageNet files), its rows decoded when read."""
    if task not in IMAGE_TASKS:
        raise KDCacheError(f"unknown image task {task!r}; choose one of {', '.join(IMAGE_TASKS)}")
    preset = DEFAULT_NORMALIZE[task] if normalize is None else str(normalize).lower()
    if preset not in NORMALIZE_PRESETS:
        raise KDCacheError(f"unknown normalisation preset {normalize!r}; choose one of {', '.join(NORMALIZE_PRESETS)}")
    if image_size is not None and (isinstance(image_size, bool) or int(image_size) != image_size or image_size < 1):
        raise KDCacheError(f"image_size must be a positive integer, got {image_size!r}")
    if limit is not None and (isinstance(limit, bool) or int(limit) != limit or limit < 1):
        raise KDCacheError(f"limit must be a positive integer, got {limit!r}")
    image_size = None if image_size is None else int(image_size)
    data = Path(data).expanduser()
    if task == "imagenet" and image_size is None:
        image_size = IMAGENET_DEFAULT_SIZE
    if task == "imagefolder":
        source, names, dataset, split_used, info = _load_imagefolder(data, split, limit, image_size)
    elif task == "imagenet":
        from kdcache.data.vision import imagenet_root

        root, meta = imagenet_root(data, split)
        source, names, dataset, split_used, info = _load_imagefolder(root, "val" if split in ("validation", "test")
                                                                     else split, limit, image_size)
        info = {**info, **meta}
    elif task in ("cifar10", "cifar100"):
        source, names, dataset, split_used, info = _load_cifar(task, data, split, limit, image_size)
    else:
        source, names, dataset, split_used, info = _load_planes(task, data, split, limit, image_size)
    stats = NORMALIZE_PRESETS[preset]
    mean, std = (stats if stats is not None else (None, None))
    channels = int(dataset[0]["inputs"].shape[0]) if len(dataset) else None
    if mean is not None and channels is not None and len(mean) != channels:
        raise KDCacheError(f"{source}: normalisation {preset!r} has {len(mean)} channel(s) but {task}'s images have "
                           f"{channels}; choose another --normalize (or none)")
    if image_size is not None:
        info["input_size"] = [image_size, image_size]
    preprocess = {
        **info,
        "split": split,
        "split_used": split_used,
        "split_alias": f"{split} -> {split_used}" if split_used != split else None,
        "image_size": image_size,
        "resize": (f"shorter side to {image_size} (bilinear, antialias), centre crop {image_size}x{image_size}"
                   if image_size is not None else None),
        "pixels": ("grayscale" if channels == 1 else "RGB") + " uint8, NCHW; fingerprint over HWC uint8 after resize",
        "scale": "1/255",
        "normalize": preset,
        "mean": list(mean) if mean is not None else None,
        "std": list(std) if std is not None else None,
        "limit": limit,
    }
    return SplitData(
        task=task,
        split=split,
        source=source,
        modality="image",
        kind="classification",
        label_names=names,
        dataset=dataset,
        collate=_collate,
        prepare=_Prepare(mean, std),
        preprocess=preprocess,
    )


__all__ = ["IMAGE_EXTENSIONS", "IMAGE_TASKS", "NORMALIZE_PRESETS", "load_image_split"]
