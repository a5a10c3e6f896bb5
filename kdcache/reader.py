"""Opens a cache read-only and refuses anything it cannot vouch for (incomplete, foreign, newer, inconsistent)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import zarr

from kdcache import format as fmt
from kdcache.errors import KDCacheError
from kdcache.writer import read_root_attrs


def read_cache_attrs(path: str | Path, *, allow_incomplete: bool = False) -> dict[str, Any]:
    """Root attributes of a cache after checking format name, version and completeness."""
    path = Path(path)
    if not path.exists():
        raise KDCacheError(f"{path}: no such cache")
    attrs = read_root_attrs(path)
    if attrs is None:
        raise KDCacheError(f"{path}: not a Zarr v3 group (no readable zarr.json)")
    if attrs.get("format") != fmt.FORMAT_NAME:
        raise KDCacheError(f"{path}: not a kdcache cache (format attribute is {attrs.get('format')!r})")
    version = attrs.get("format_version")
    if not isinstance(version, int):
        raise KDCacheError(f"{path}: format_version attribute is missing or not an integer")
    if version > fmt.FORMAT_VERSION:
        raise KDCacheError(
            f"{path}: cache format version {version} is newer than this kdcache reads ({fmt.FORMAT_VERSION}); upgrade kdcache"
        )
    if not allow_incomplete and attrs.get("complete") is not True:
        raise KDCacheError(f"{path}: cache is incomplete (its writer did not finish); rerun cache-teacher")
    return attrs


class TeacherCache:
    """One split of a cache, read-only: arrays are Zarr arrays, so slicing reads only the chunks it needs."""

    def __init__(self, path: str | Path, split: str = "train", *, allow_incomplete: bool = False) -> None:
        self.path = Path(path)
        self.attrs = read_cache_attrs(self.path, allow_incomplete=allow_incomplete)
        root = zarr.open_group(store=str(self.path), mode="r")
        if split not in root.group_keys():
            have = ", ".join(sorted(root.group_keys())) or "none"
            raise KDCacheError(f"{self.path}: no split {split!r} in this cache (splits: {have})")
        self.split = split
        self.group = root[split]
        self.split_attrs = dict(self.group.attrs)
        if not allow_incomplete and self.split_attrs.get("complete") is not True:
            raise KDCacheError(f"{self.path}: split {split!r} is incomplete; rerun cache-teacher")
        missing = [name for name in fmt.ARRAYS if name not in self.group.array_keys()]
        if missing:
            raise KDCacheError(f"{self.path}/{split}: missing array(s) {', '.join(missing)}")
        self.logits: zarr.Array = self.group["logits"]
        self.labels: zarr.Array = self.group["labels"]
        self.index: zarr.Array = self.group["index"]
        self.fingerprint: zarr.Array = self.group["fingerprint"]
        self._check_shapes()

    def _check_shapes(self) -> None:
        n = self.split_attrs.get("rows")
        dataset_n = (self.split_attrs.get("dataset") or {}).get("n", n)
        lengths = {name: getattr(self, name).shape[0] for name in fmt.ARRAYS}
        if len(set(lengths.values())) != 1 or n not in lengths.values() or dataset_n != n:
            shown = ", ".join(f"{k}={v}" for k, v in lengths.items())
            raise KDCacheError(
                f"{self.path}/{self.split}: row counts disagree (attributes say {n}, dataset.n {dataset_n}; arrays: {shown})"
            )
        width = self.attrs.get("teacher", {}).get("num_outputs")
        if width is not None and self.logits.shape[1] != width:
            raise KDCacheError(
                f"{self.path}/{self.split}: logits have {self.logits.shape[1]} columns but the teacher has {width} outputs"
            )

    def __len__(self) -> int:
        return self.logits.shape[0]

    @property
    def num_outputs(self) -> int:
        return int(self.logits.shape[1])

    @property
    def label_names(self) -> list[str] | None:
        return self.attrs.get("teacher", {}).get("label_names")

    @property
    def task_kind(self) -> str:
        return self.attrs.get("task", {}).get("kind", "classification")

    def __repr__(self) -> str:
        return f"TeacherCache({str(self.path)!r}, split={self.split!r}, rows={len(self)}, outputs={self.num_outputs})"


def open_cache(path: str | Path, split: str = "train", *, allow_incomplete: bool = False) -> TeacherCache:
    """Open one split of a complete cache for reading; the usual way for scripts to get at stored logits."""
    return TeacherCache(path, split, allow_incomplete=allow_incomplete)


def load_cache_tokenizer(path: str | Path) -> Any:
    """The teacher's tokenizer as stored in a text cache, so students read exactly the token ids the teacher saw."""
    import io
    import tempfile
    import zipfile

    import numpy as np

    path = Path(path)
    root = zarr.open_group(store=str(path), mode="r")
    if "tokenizer" not in root.array_keys():
        raise KDCacheError(f"{path}: this cache stores no tokenizer (not a text cache?)")
    blob = np.asarray(root["tokenizer"][:], dtype=np.uint8).tobytes()
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(io.BytesIO(blob)) as archive:
            archive.extractall(tmp)
        try:
            return AutoTokenizer.from_pretrained(tmp, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - transformers raises many types
            raise KDCacheError(f"{path}/tokenizer: cannot load the stored tokenizer ({exc})".splitlines()[0]) from exc
