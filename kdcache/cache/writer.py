"""Writes a cache: named arrays in whole chunks, checksummed, with `complete: true` set only at the very end.

One write protocol serves one process and several (`cache-teacher` under torchrun). Rows arrive in order, batch
by batch, as a dict of named arrays checked against the split's schema; a `SplitWriter` buffers them into whole
chunks, so every store write is one whole chunk (a renamed file on a local disk, one object PUT on an object
store), and records each finished chunk by itself after its data (`schema.progress_key`: its rows and digests),
never touching a shared attribute. A crash at any moment leaves `complete: false` and records that each name a
stored chunk, so a rerun (`CacheWriter(..., resume=True)`, `SplitWriter.pending_chunks`) writes only the chunks
nobody recorded, with one process or several. Once every chunk is recorded, `SplitWriter.close` assembles the
split's manifest, chain and dataset digest from the records in chunk order, the same whichever writers stored
which chunks, writes them with `complete` in one metadata write, and removes the records. The process holding the
store's lock (`CacheStore.lock`) creates the arrays and writes every attribute; `BackgroundWriter` runs the
storage side on a thread so a GPU teacher never waits.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import queue
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np
import zarr

from kdcache.cache import codecs, schema
from kdcache.cache.schema import PROGRESS_FOLDER, ArraySpec, ChunkManifest, DatasetInfo, RootHeader, SplitHeader
from kdcache.cache.store import CacheStore, as_store, remote_errors
from kdcache.errors import KDCacheError
from kdcache.fingerprint import labels_equal
from kdcache.runtime import utc_now

_ARRAY_CONFIG = {"write_empty_chunks": True}  # an all-zero label chunk must still be stored


def check_destination(store: CacheStore, overwrite: bool, resume: bool = False) -> bool:
    """Refuse an existing location unless asked, and never agree to replace something that is not a cache.

    Returns True when the location holds an interrupted cache to resume (the default without --overwrite; the
    settings are compared later, by CacheWriter). The only thing it deletes is a location kdcache itself started
    (its marker inside) whose writer died before writing its first file; an existing empty folder is used as it
    is. So a recipe can call it before its slow work, and a user learns about a taken --out in a second.
    """
    if overwrite and resume:
        raise KDCacheError("--overwrite and --resume contradict each other; pass one")
    store.check()
    attrs = store.read_json("zarr.json")
    attrs = attrs.get("attributes", {}) if isinstance(attrs, dict) else None
    is_cache = attrs is not None and attrs.get("format") == schema.FORMAT_NAME
    if not is_cache and not store.is_file() and store.started_by_kdcache():
        store.delete_all()  # killed before its first file was in place: nothing of the user's is there
    if store.is_empty():
        if resume:
            raise KDCacheError(f"{store}: nothing to resume (no such cache)")
        return False
    if not overwrite:
        if is_cache and not attrs.get("complete"):
            return True
        if resume and is_cache:
            raise KDCacheError(f"{store}: the cache is already complete; nothing to resume")
        if not is_cache:
            raise KDCacheError(f"{store}: already exists and is not a kdcache cache; choose another --out")
        raise KDCacheError(f"{store}: already exists; pass --overwrite to replace it")
    if not is_cache:
        raise KDCacheError(f"{store}: refusing to overwrite: it exists and is not a kdcache cache")
    return False


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new)) for d in _differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".")]


def storage_error(store: CacheStore, what: str, exc: BaseException) -> KDCacheError:
    """One line for a failed write: disk full, read-only, or the object store's refusal."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        problem = "disk full"
    elif isinstance(exc, OSError) and exc.strerror:
        problem = exc.strerror.lower()
    else:
        problem = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return KDCacheError(f"{store}: {problem} while writing {what}; the cache is left incomplete and will not be used")


class SplitWriter:
    """Writes whole chunks of one split, each recorded by itself once stored; one writer or several (torchrun)."""

    def __init__(self, group: zarr.Group, store: CacheStore, name: str, specs: dict[str, ArraySpec], *, rows: int,
                 codec: str, chunk_rows: int, source: str | None = None, resume: bool = False,
                 lock: Any = None) -> None:
        """`specs` are the split's arrays (`schema.split_arrays`): the target's arrays (dense `logits`, or a sparse
        target's), the per-row columns and the optional float arrays (teacher checkpoints' logits, hidden-state
        projections), written row for row, in the same chunks. `group` is the cache's root group. Rows are written
        from row 0, or from where `seek` puts the writer; another process's split is opened with `SplitWriter.join`."""
        self._start(store, name, specs, rows=rows, chunk_rows=chunk_rows, source=source, lock=lock)
        if resume and name in group.group_keys():
            if all(key in group[name].array_keys() for key in specs):
                # a split begun by a kdcache that recorded no chain (no root `chunk_manifests`) has none to check
                self._reopen(group[name], require_chain=bool(group.attrs.get("chunk_manifests")))
                return
            store.delete_prefix(name)  # killed while creating its arrays: nothing of it was written yet
        header = SplitHeader(split=name, rows=rows, extra_arrays=self.extras)
        self.group = group.create_group(name, attributes=header.to_attrs())
        self.arrays: dict[str, zarr.Array] = {}
        for key, spec in specs.items():
            codec_name = spec.codec_name(codec)
            self.arrays[key] = self.group.create_array(
                key, shape=spec.shape(rows), chunks=(chunk_rows, *spec.shape(rows)[1:]), dtype=spec.dtype,
                compressors=codecs.compressors(codec_name, spec.dtype.itemsize), fill_value=spec.fill,
                config=_ARRAY_CONFIG)
        self._buffers = {key: np.empty((chunk_rows, *spec.shape(rows)[1:]), dtype=spec.dtype)
                         for key, spec in specs.items()}

    @classmethod
    def join(cls, group: zarr.Group, store: CacheStore, name: str, specs: dict[str, ArraySpec], *, rows: int,
             chunk_rows: int, source: str | None = None) -> "SplitWriter":
        """Open the split another process of the same capture created (it is never created or checked here), to
        write some of its chunks."""
        self = cls.__new__(cls)
        self._start(store, name, specs, rows=rows, chunk_rows=chunk_rows, source=source, lock=None)
        self.group = group[name]
        self.arrays = {key: self.group[key] for key in specs}
        self._buffers = {key: np.empty((chunk_rows, *a.shape[1:]), dtype=a.dtype) for key, a in self.arrays.items()}
        return self

    def _start(self, store: CacheStore, name: str, specs: dict[str, ArraySpec], *, rows: int, chunk_rows: int,
               source: str | None, lock: Any) -> None:
        """The state of a writer before its split is created or opened."""
        self.store, self.name, self.rows, self.chunk_rows = store, name, rows, chunk_rows
        self.specs, self.lock = specs, lock
        self._end = rows  # the writer stops at this row (the end of its run of chunks)
        self._compare_skipped = True  # whether the rows skipped at a seek are stored and must be compared
        self._compare_after = False  # whether rows computed past _end are stored and must be compared
        self.extras = {k: s.width for k, s in specs.items() if k not in (*schema.TARGET_ARRAYS, *schema.ROW_ARRAYS,
                                                                         *schema.TOKEN_ARRAYS)
                       and not k.startswith(schema.VIEW_PREFIX)}
        self.source = source  # the data file or folder the rows come from, named in error messages
        self._filled = 0  # rows in the buffer
        self._flushed = 0  # the next row to store
        self._skip = 0  # rows still to drop from the next writes (recomputed rows that are already stored)
        self.recorded: list[int] = []  # the chunks this writer stored and recorded

    def _reopen(self, group: zarr.Group, require_chain: bool) -> None:
        """Open an interrupted split. One that a release before the chunk records left (its first `rows_done` rows
        stored, chained in `chunk_chain`) has its stored chunks checked against that chain and recorded, so every
        resume continues in the one form."""
        self.group = group
        self.arrays = {key: group[key] for key in self.specs}
        for key, spec in self.specs.items():
            array = self.arrays[key]
            if array.shape != spec.shape(self.rows) or array.chunks[0] != self.chunk_rows:
                raise KDCacheError(f"{self.store.display(self.name)}: the interrupted split's {key!r} has shape "
                                   f"{array.shape} in chunks of {array.chunks[0]} rows, not {spec.shape(self.rows)} "
                                   f"in {self.chunk_rows}; pass --overwrite to start again")
        self._buffers = {key: np.empty((self.chunk_rows, *a.shape[1:]), dtype=a.dtype) for key, a in self.arrays.items()}
        done = int(group.attrs.get("rows_done", 0))
        if not done or self.complete:
            return
        chain, blocks = "", []
        for start in range(0, done, self.chunk_rows):  # each chunk read back through its CRC32C
            blocks.append([schema.chunk_digest(np.asarray(a[start:start + self.chunk_rows]))
                           for a in self.arrays.values()])
            chain = schema.chain_digest(chain, blocks[-1])
        recorded = group.attrs.get("chunk_chain")
        if (recorded is not None or require_chain) and chain != recorded:
            raise KDCacheError(f"{self.store.display(self.name)}: the chunks stored before the interruption are not "
                               "the ones that were written (a chunk file was swapped or replaced); pass --overwrite "
                               "to start again")
        for k, block in enumerate(blocks):
            self._record(k, k * self.chunk_rows, min(done, (k + 1) * self.chunk_rows), block)

    @property
    def complete(self) -> bool:
        return self.group.attrs.get("complete") is True

    @property
    def chunk_count(self) -> int:
        return -(-self.rows // self.chunk_rows)

    def seek(self, start: int, end: int, compute_from: int, *, compare_before: bool, compare_after: bool) -> None:
        """Write rows `start:end` (whole chunks; `end` may be the split's last row) from a teacher that starts
        computing at `compute_from` (a batch boundary at or before `start`) and may compute past `end` to finish
        its last batch. The extra rows are dropped; those already stored (`compare_before`, `compare_after`) are
        compared with the stored ones first, which proves the data read now continues the data stored."""
        if self._filled or start % self.chunk_rows or not compute_from <= start <= end:
            raise ValueError(f"split {self.name!r}: cannot seek to rows {start}:{end} from {compute_from}")
        self._flushed, self._end, self._compare_after = start, end, compare_after
        self._skip, self._skip_at, self._compare_skipped = start - compute_from, compute_from, compare_before

    def _record(self, chunk: int, start: int, stop: int, digests: list[str]) -> None:
        """Record one finished chunk: after its data, so a record always means the chunk is stored."""
        self.store.write_json(schema.progress_key(self.name, chunk),
                              {"split": self.name, "chunk": chunk, "rows": [start, stop], "arrays": list(self.arrays),
                               "digests": digests})
        self.recorded.append(chunk)

    def _records(self) -> dict[int, list[str]]:
        """The recorded chunks of this split and their digests (one per array, in storage order); records that do not
        describe a chunk of this split as it is stored now are ignored (the chunk is written again)."""
        found: dict[int, list[str]] = {}
        for key in self.store.list_files(f"{PROGRESS_FOLDER}/{self.name}"):
            stem = key.rsplit("/", 1)[-1]
            if not stem.endswith(".json") or not stem[:-5].isdigit():
                continue  # a temporary file of a record a kill cut short
            chunk = int(stem[:-5])
            record = self.store.read_json(key)
            expected = [chunk * self.chunk_rows, min(self.rows, (chunk + 1) * self.chunk_rows)]
            if (isinstance(record, dict) and chunk < self.chunk_count and record.get("rows") == expected
                    and record.get("arrays") == list(self.arrays) and isinstance(record.get("digests"), list)
                    and len(record["digests"]) == len(self.arrays)):
                found[chunk] = [str(d) for d in record["digests"]]
        return found

    def pending_chunks(self) -> list[int]:
        """The chunks no writer has recorded yet, in order, after reading every recorded chunk back (through its
        CRC32C) and comparing it with its recorded digests: a chunk swapped or replaced meanwhile is refused."""
        if self.complete:
            return []
        records = self._records()
        for chunk, digests in sorted(records.items()):
            start, stop = chunk * self.chunk_rows, min(self.rows, (chunk + 1) * self.chunk_rows)
            stored = [schema.chunk_digest(np.asarray(a[start:stop])) for a in self.arrays.values()]
            if stored != digests:
                raise KDCacheError(f"{self.store.display(self.name)}: the chunks stored before the interruption are "
                                   "not the ones that were written (a chunk file was swapped or replaced); pass "
                                   "--overwrite to start again")
        return [k for k in range(self.chunk_count) if k not in records]

    @property
    def rows_written(self) -> int:
        return self._flushed + self._filled

    def write(self, arrays: dict[str, np.ndarray]) -> None:
        """Append a batch of rows: one array per spec of the split (float targets as computed, float32); all are
        checked before anything reaches storage."""
        if set(arrays) != set(self.specs):
            raise ValueError(f"split {self.name!r}: arrays {sorted(arrays)} written, {sorted(self.specs)} declared")
        arrays = {k: np.asarray(v) for k, v in arrays.items()}
        if self._skip:
            arrays = self._drop_recomputed(arrays)
            if not len(arrays["index"]):
                return
        if self.rows_written + len(arrays["index"]) > self._end:
            if self._end == self.rows:
                raise KDCacheError(f"split {self.name!r}: more rows than the {self.rows} announced")
            keep = self._end - self.rows_written  # the rest of a run's last batch, computed for its padding
            if self._compare_after:
                self._compare_stored(self._end, {k: v[keep:] for k, v in arrays.items()})
            arrays = {k: v[:keep] for k, v in arrays.items()}
            if not len(arrays["index"]):
                return
        index = arrays["index"]
        columns = {k: (self._stored(k, v, index) if self.specs[k].is_target else v) for k, v in arrays.items()}
        count = len(index)
        done = 0
        while done < count:
            take = min(self.chunk_rows - self._filled, count - done)
            for key, values in columns.items():
                self._buffers[key][self._filled : self._filled + take] = values[done : done + take]
            self._filled += take
            done += take
            if self._filled == self.chunk_rows or self.rows_written == self._end:
                self._flush()

    def _drop_recomputed(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Compare the recomputed rows at a resume with the stored ones, then drop them."""
        drop = min(self._skip, len(arrays["index"]))
        if self._compare_skipped:
            self._compare_stored(self._skip_at, {k: v[:drop] for k, v in arrays.items()})
        self._skip -= drop
        self._skip_at += drop
        return {k: v[drop:] for k, v in arrays.items()}

    def _compare_stored(self, at: int, arrays: dict[str, np.ndarray]) -> None:
        """Recomputed rows from row `at` on must equal the stored ones (fingerprints and labels)."""
        count = len(arrays["index"])
        stored_fp = np.asarray(self.arrays["fingerprint"][at : at + count])
        stored_labels = np.asarray(self.arrays["labels"][at : at + count])
        fresh_labels = arrays["labels"].astype(stored_labels.dtype)
        same = (stored_fp == arrays["fingerprint"].astype(np.uint64)) & labels_equal(stored_labels, fresh_labels)
        if not same.all():
            row = at + int(np.flatnonzero(~same)[0])
            raise KDCacheError(f"{self._where()}split {self.name!r}, row {row}: the data (input or label) differs "
                               f"from what the interrupted cache {self.store} was begun with; pass --overwrite to "
                               "start again")

    def _stored(self, key: str, values: np.ndarray, index: np.ndarray) -> np.ndarray:
        """`values` in the storage dtype, refused (with the row named) when not finite or beyond float16's range;
        integer outputs (a sparse target's ids and counts) are refused when they do not fit their dtype."""
        dtype = self.specs[key].dtype
        if dtype.kind != "f":
            values = np.asarray(values)
            limits = np.iinfo(dtype)
            if len(values) and (values.min() < limits.min or values.max() > limits.max):
                raise KDCacheError(f"{self._where()}split {self.name!r}: teacher output {key!r} holds values outside "
                                   f"{dtype}{self._left()}")
            return values.astype(dtype)
        values = np.asarray(values, dtype=np.float32)
        what = "teacher output" if key == "logits" else f"teacher output {key!r}"
        bad = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise KDCacheError(
                f"{self._where()}split {self.name!r}, row {self.rows_written + row} (source index {int(index[row])}): "
                f"{what} contains NaN or Inf{self._left()}"
            )
        with np.errstate(over="ignore"):  # overflow is detected just below, with a better message
            stored = values.astype(dtype)
        if not np.isfinite(stored).all():
            row = int(np.flatnonzero(~np.isfinite(stored.reshape(len(stored), -1)).all(axis=1))[0])
            value = "logit" if key == "logits" else f"value of {key!r}"
            raise KDCacheError(
                f"{self._where()}split {self.name!r}, row {self.rows_written + row} (source index {int(index[row])}): "
                f"teacher {value} {np.abs(values[row]).max():.4g} exceeds the float16 range; rerun with --dtype float32"
                f"{self._left()}"
            )
        return stored

    def _where(self) -> str:
        return f"{self.source}: " if self.source else ""

    def _left(self) -> str:
        return f"; {self.store} is left incomplete and will not be used"

    def _flush(self) -> None:
        """Store the buffered rows (one whole chunk, or a run's last rows) and record the chunk."""
        if not self._filled:
            return
        if self.lock is not None:
            self.lock.check()  # a writer whose lease was taken over must not write on
        start, stop = self._flushed, self._flushed + self._filled
        try:
            with remote_errors(self.store.location):
                block = []
                for key, array in self.arrays.items():
                    array[start:stop] = self._buffers[key][: self._filled]
                    block.append(schema.chunk_digest(self._buffers[key][: self._filled]))
                if self.lock is not None:
                    self.lock.check()  # again right before the record, which says the chunk is stored
                self._record(start // self.chunk_rows, start, stop, block)
        except KDCacheError:
            raise
        except Exception as exc:  # noqa: BLE001 - OSError on a disk, the store's own errors remotely
            raise storage_error(self.store, f"split {self.name!r} rows {start}:{stop}", exc) from exc
        self._flushed, self._filled = stop, 0

    def close(self, dataset: DatasetInfo | dict[str, Any], attributes: dict[str, Any] | None = None) -> str:
        """Once every writer has finished: the split's manifest, chain and dataset digest from the chunk records, in
        chunk order (`rows_done`, `chunk_chain`, `dataset`, `chunk_digests`, `attributes` such as the measured
        `target_quality`, and `complete` in one metadata write, fenced like every metadata write), then the records
        removed. Whichever writers stored which chunks, the split's bytes are the same. Returns the dataset digest."""
        if isinstance(dataset, dict):
            dataset = DatasetInfo.from_attrs(dataset, self.store.display(self.name))
        self._flush()
        records = self._records()
        missing = [k for k in range(self.chunk_count) if k not in records]
        if missing:
            meta = self.store.read_json(f"{self.name}/zarr.json") or {}
            if (meta.get("attributes") or {}).get("complete") is True:  # finished meanwhile by whoever took over
                for chunk in self.recorded:  # this writer's late records mean nothing to a finished split
                    self.store.delete(schema.progress_key(self.name, chunk))
                raise KDCacheError(f"{self.store.display(self.name)}: another writer finished this split while this "
                                   "one was stalled or frozen (its lease was taken over); this run stopped without "
                                   "writing further")
            raise KDCacheError(f"{self.store.display(self.name)}: chunks {', '.join(map(str, missing[:5]))} of split "
                               f"{self.name!r} were not recorded by any writer{self._left()}")
        manifest: dict[str, list[str]] = {key: [] for key in self.arrays}
        chain = ""
        for chunk in range(self.chunk_count):  # one block per chunk
            for key, digest in zip(self.arrays, records[chunk]):
                manifest[key].append(digest)
            chain = schema.chain_digest(chain, records[chunk])
        try:
            with remote_errors(self.store.location):
                fingerprints = np.asarray(self.arrays["fingerprint"][:])
                dataset.digest = hashlib.sha256(np.ascontiguousarray(fingerprints, dtype="<u8").tobytes()).hexdigest()
                self.group.update_attributes({**(attributes or {}), "rows_done": self.rows, "chunk_chain": chain,
                                              "dataset": dataset.to_attrs(),
                                              "chunk_digests": ChunkManifest(arrays=manifest).to_attrs(),
                                              "complete": True})
                self.store.delete_prefix(f"{PROGRESS_FOLDER}/{self.name}")
        except KDCacheError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise storage_error(self.store, f"split {self.name!r} attributes", exc) from exc
        return dataset.digest


#: Records of a split's preprocessing that describe the source file rather than the rows written (a text file's
#: row count is unknown when --limit stops reading early): not compared when an interrupted cache resumes.
_INFORMATIONAL = ("rows_in_file",)


def _comparable(settings: Any) -> Any:
    """Write settings without the informational preprocessing records."""
    if not isinstance(settings, dict) or not isinstance(settings.get("data"), dict):
        return settings
    data = {}
    for split, described in settings["data"].items():
        if isinstance(described, dict) and isinstance(described.get("preprocess"), dict):
            pre = {k: v for k, v in described["preprocess"].items() if k not in _INFORMATIONAL}
            described = {**described, "preprocess": pre}
        data[split] = described
    return {**settings, "data": data}


class CacheWriter:
    """Creates a cache and marks it complete only after every split is closed."""

    def __init__(self, location: str | Path | CacheStore, header: RootHeader | dict[str, Any], *,
                 overwrite: bool = False, resume: bool = False, lock: Any = None) -> None:
        """`header` is the root header (a dict of root attributes will do for scripts); its `write_settings` are
        what must not change across a resume (teacher hash, data, storage). `lock` is the store's writer lock, held
        by the caller (CacheStore.lock)."""
        store = as_store(location)
        if isinstance(header, dict):
            header = RootHeader.from_attrs({"format": schema.FORMAT_NAME, "format_version": schema.FORMAT_VERSION,
                                            **header}, str(store))
        self.store, self.lock = store, lock
        self.resumed = resume and check_destination(store, overwrite=False)
        self.splits: list[str] = []
        if self.resumed:
            self._reopen(header.write_settings)
            return
        if check_destination(store, overwrite):
            raise KDCacheError(f"{store}: holds an incomplete cache (an interrupted run); resume it or pass --overwrite")
        if not store.is_empty():  # check_destination let through only a kdcache cache to replace
            store.delete_all()
        header.complete, header.splits, header.chunk_manifests = False, [], True
        header.format_version = header.target_spec().format_version  # dense stays 1: every reader opens it
        try:
            store.prepare()
            store.write_marker()
            self.root = zarr.create_group(store=store.zarr_store(read_only=False, lock=lock), overwrite=False,
                                          zarr_format=3, attributes=header.to_attrs())  # refuses an existing zarr.json
            store.remove_marker()  # zarr.json is in place: from now on the location is a (resumable) cache
        except KDCacheError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise storage_error(store, "the cache header", exc) from exc

    def _reopen(self, settings: dict[str, Any]) -> None:
        """Open an interrupted cache for resuming, only if it was begun with the very same settings."""
        meta = self.store.read_json("zarr.json") or {}
        old = _comparable(json.loads(json.dumps((meta.get("attributes") or {}).get("write_settings"))))
        new = _comparable(json.loads(json.dumps(settings)))
        if old != new:
            differ = ", ".join(_differences(old, new)[:4]) if isinstance(old, dict) else "all (no settings recorded)"
            raise KDCacheError(f"{self.store}: holds an interrupted cache written with other settings (differs in "
                               f"{differ}); rerun with the same teacher, data and storage flags, or pass --overwrite")
        self.store.remove_partials()  # temporary files of writes the crash cut short
        self.store.remove_marker()  # killed just after zarr.json was written
        self.root = zarr.open_group(store=self.store.zarr_store(read_only=False, lock=self.lock), mode="r+",
                                    zarr_format=3)

    def add_split(self, name: str, specs: dict[str, ArraySpec] | None = None, *, num_outputs: int | None = None,
                  kind: str = "classification", dtype: str = "float16", extras: dict[str, int] | None = None,
                  **kwargs: Any) -> SplitWriter:
        """Create the arrays of one split: `specs` (schema.split_arrays), or the widths and kinds to make them from;
        see SplitWriter for the other keyword arguments."""
        if specs is None:
            specs = schema.split_arrays(int(num_outputs), kind, dtype, extras or {})
        if name in self.splits:
            raise KDCacheError(f"{self.store}: split {name!r} given twice")
        self.splits.append(name)
        try:
            split = SplitWriter(self.root, self.store, name, specs, resume=self.resumed, lock=self.lock,
                                **kwargs)
            if split.complete:  # killed between the split's last write and its records' removal
                self.store.delete_prefix(f"{PROGRESS_FOLDER}/{name}")
            return split
        except KDCacheError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise storage_error(self.store, f"split {name!r}", exc) from exc

    def add_blob(self, name: str, data: bytes, attrs: dict[str, Any]) -> None:
        """Store a small opaque file (the teacher's tokenizer as a zip) as a checksummed uint8 array, with its
        sha256 recorded beside it (binding the blob to its place)."""
        if self.resumed and name in self.root.array_keys():
            if self.store.list_files(f"{name}/c"):
                return  # stored whole (one chunk) before the interrupted run went on
            self.store.delete_prefix(name)  # killed between its metadata and its chunk: write it again
        payload = np.frombuffer(data, dtype=np.uint8)
        try:
            self.root.create_array(name, data=payload, chunks=(max(1, len(payload)),),
                                   compressors=codecs.compressors("zstd3", 1),
                                   attributes={**attrs, "sha256": hashlib.sha256(data).hexdigest()},
                                   config=_ARRAY_CONFIG)
        except Exception as exc:  # noqa: BLE001
            raise storage_error(self.store, name, exc) from exc

    def finalize(self, attrs: dict[str, Any] | None = None) -> None:
        """Set `complete: true`, the last write of a cache: before it, no reader will use the cache."""
        if self.lock is not None:
            self.lock.check()
        try:
            with remote_errors(self.store.location):
                self.store.delete_prefix(PROGRESS_FOLDER)  # empty by now: each split removed its own records
                self.root.update_attributes({**(attrs or {}), "splits": self.splits, "completed": utc_now(),
                                        "complete": True})
        except KDCacheError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise storage_error(self.store, "the final attributes", exc) from exc


def join_capture(store: CacheStore, created: str | None) -> zarr.Group:
    """Open, for writing chunks, the cache another process of the same capture created (`created`: its root
    attribute, telling that very cache from any other at the same name), after proving this process sees it and
    may write there. Raises one line naming the location otherwise (a local --out that is not on storage every
    process shares, a path this process may not write)."""
    meta = store.read_json("zarr.json")
    attrs = meta.get("attributes", {}) if isinstance(meta, dict) else {}
    if attrs.get("format") != schema.FORMAT_NAME or attrs.get("created") != created or attrs.get("complete"):
        raise KDCacheError(f"{store.display()}: this process does not see the cache the first process is writing "
                           "there; every process must reach --out (a folder on storage all of them share, or a URL)")
    probe = f".kdcache-probe-{os.getpid()}.json"
    try:
        store.write_json(probe, {"pid": os.getpid()})
        store.delete(probe)
    except KDCacheError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise storage_error(store, "a progress record", exc) from exc
    with remote_errors(store.location):
        return zarr.open_group(store=store.zarr_store(read_only=False), mode="r+", zarr_format=3)


class BackgroundWriter:
    """Runs `sink(arrays)` on a thread, converting tensors to numpy there, so compute never waits on storage.

    Tensors may still live on the GPU: the `.cpu()` copy (and its synchronisation) happens on the writer
    thread. An error on the thread is re-raised in the caller at the next `put` or at `close`.
    """

    _STOP = object()

    def __init__(self, sink: Callable[[dict[str, np.ndarray]], None], max_pending: int = 8) -> None:
        self._sink = sink
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kdcache-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is self._STOP:
                return
            if self._error is not None:
                continue  # keep draining so the producer never blocks on a dead writer
            try:
                self._sink({k: _to_numpy(v) for k, v in item.items()})
            except BaseException as exc:  # noqa: BLE001 - handed to the producer thread
                self._error = exc

    def put(self, arrays: dict[str, Any]) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(arrays)

    def close(self) -> None:
        """Wait for every pending write; re-raise the first error."""
        self._queue.put(self._STOP)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def __enter__(self) -> "BackgroundWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # stop the thread quietly (pending writes still land); the original exception propagates
            self._queue.put(self._STOP)
            self._thread.join()


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return np.asarray(value)


__all__ = ["BackgroundWriter", "CacheWriter", "SplitWriter", "check_destination", "join_capture",
           "storage_error"]
