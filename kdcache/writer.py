"""Writes a cache: arrays in whole chunks, checksummed, with `complete: true` set only at the very end.

Rows arrive in order, batch by batch; the writer buffers them into chunk-sized blocks so every store write
is one whole chunk (Zarr's LocalStore writes each file to a temporary name and renames it). After the four
arrays' chunks of a block are on disk, the split's `rows_done` attribute moves past them: a crash at any moment
leaves `complete: false` and a `rows_done` whose rows are all on disk, so a rerun resumes from there
(`CacheWriter(..., resume=True)`). One writer at a time holds `WriteLock`. `BackgroundWriter` runs the storage
side on a thread so a GPU teacher never waits for the disk.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import queue
import shutil
import stat
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import zarr

from kdcache import format as fmt
from kdcache.errors import KDCacheError
from kdcache.fingerprint import labels_equal

_ARRAY_CONFIG = {"write_empty_chunks": True}  # an all-zero label chunk must still exist on disk


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_root_attrs(path: Path) -> dict[str, Any] | None:
    """The root attributes of a Zarr v3 group at `path`, or None if it is not one (cheap: one JSON file)."""
    meta = Path(path) / "zarr.json"
    try:
        return json.loads(meta.read_text()).get("attributes", {})
    except (OSError, ValueError):
        return None


#: A file kdcache writes into a new cache folder before anything else and removes when the cache is complete:
#: only a folder holding it (and nothing but temporary files) was started by kdcache and may be cleaned up.
WRITER_MARKER = ".kdcache-writer"


def _started_by_kdcache(path: Path) -> bool:
    """A folder that an interrupted kdcache writer created and left before its first file was in place."""
    if not (path / WRITER_MARKER).is_file():
        return False
    return all(p.is_dir() or p.name.endswith(".partial") or p.name == WRITER_MARKER for p in path.rglob("*"))


def check_destination(path: str | Path, overwrite: bool, resume: bool = False) -> bool:
    """Refuse an existing path unless asked, and never agree to replace something that is not a cache.

    Returns True when `path` holds an interrupted cache to resume (the default without --overwrite; the
    settings are compared later, by CacheWriter). The only thing it deletes is a folder kdcache itself started
    (its marker inside) whose writer died before writing its first file; an existing empty folder is used as it
    is. So a recipe can call it before its slow work, and a user learns about a taken --out path in a second.
    """
    path = Path(path)
    if overwrite and resume:
        raise KDCacheError("--overwrite and --resume contradict each other; pass one")
    attrs = read_root_attrs(path) if path.is_dir() else None
    is_cache = attrs is not None and attrs.get("format") == fmt.FORMAT_NAME
    if path.is_dir() and not is_cache and _started_by_kdcache(path):
        shutil.rmtree(path)  # killed before its first file was renamed into place: nothing of the user's is inside
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        if resume:
            raise KDCacheError(f"{path}: nothing to resume (no such cache)")
        return False
    if not overwrite:
        if is_cache and not attrs.get("complete"):
            return True
        if resume and is_cache:
            raise KDCacheError(f"{path}: the cache is already complete; nothing to resume")
        if not is_cache:
            raise KDCacheError(f"{path}: already exists and is not a kdcache cache; choose another --out")
        raise KDCacheError(f"{path}: already exists; pass --overwrite to replace it")
    if not is_cache:
        raise KDCacheError(f"{path}: refusing to overwrite: it exists and is not a kdcache cache")
    return False


class WriteLock:
    """An exclusive lock on a cache path for one writer, held with flock on `<resolved path>.lock`.

    The kernel drops a flock when its process dies, however it dies (SIGKILL included), so a crashed writer
    never leaves the cache locked; the file itself may stay behind and means nothing on its own. The lock is
    named from the path with every symbolic link resolved, so two spellings of one cache share one lock, and it
    is opened without following a symbolic link, so a link planted at its name cannot make kdcache write elsewhere.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        resolved = Path(os.path.realpath(self.path))
        self.file = resolved.with_name(resolved.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> "WriteLock":
        self.file.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.file, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise KDCacheError(f"{self.file}: the writer's lock file is a symbolic link; refusing to use it "
                                   "(remove it)") from None
            raise KDCacheError(f"{self.file}: cannot open the writer's lock ({exc.strerror})") from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
            os.close(fd)
            raise KDCacheError(f"{self.file}: the writer's lock is not a plain file of its own (a link or a "
                               "device); refusing to use it (remove it)")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise KDCacheError(f"{self.path}: another cache-teacher ({holder}) is writing this cache; wait for it "
                               "to finish or stop it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "WriteLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _prepare_destination(path: Path, overwrite: bool) -> None:
    """check_destination, then clear an old cache that --overwrite replaces."""
    if check_destination(path, overwrite):
        raise KDCacheError(f"{path}: holds an incomplete cache (an interrupted run); resume it or pass --overwrite")
    if path.is_dir() and any(path.iterdir()):  # check_destination let through only a kdcache cache to replace
        shutil.rmtree(path)


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new)) for d in _differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".")]


def _storage_error(path: Path, what: str, exc: OSError) -> KDCacheError:
    if exc.errno == errno.ENOSPC:
        problem = "disk full"
    else:
        problem = exc.strerror or str(exc)
    return KDCacheError(f"{path}: {problem} while writing {what}; the cache is left incomplete and will not be used")


class SplitWriter:
    """Appends rows of one split in order and writes them a whole chunk at a time."""

    def __init__(
        self,
        group: zarr.Group,
        path: Path,
        name: str,
        *,
        rows: int,
        num_outputs: int,
        kind: str,
        dtype: str,
        codec: str,
        chunk_rows: int,
        source: str | None = None,
        resume: bool = False,
        extras: dict[str, int] | None = None,
    ) -> None:
        """`extras` names further float arrays of the split and their widths (teacher checkpoints' logits,
        hidden-state projections): stored like `logits`, written row for row with it, in the same chunks."""
        self.path, self.name, self.rows, self.chunk_rows = path, name, rows, chunk_rows
        self.extras = dict(extras or {})
        self.names = (*fmt.ARRAYS, *self.extras)
        self.source = source  # the data file or folder the rows come from, named in error messages
        self.dtype = fmt.logits_dtype(dtype)
        self._filled = 0  # rows in the buffer
        self._flushed = 0  # rows already on disk
        self._skip = 0  # rows still to drop from the next writes (recomputed rows that are already on disk)
        self._digest = hashlib.sha256()
        self._chunk_digests: dict[str, list[str]] = {key: [] for key in self.names}  # the split's chunk manifest
        if resume and name in group.group_keys():
            if all(key in group[name].array_keys() for key in self.names):
                self._reopen(group[name], num_outputs)
                return
            shutil.rmtree(path / name)  # killed while creating its arrays: nothing of it was written yet
        self.group = group.create_group(name, attributes={"split": name, "rows": rows, "complete": False,
                                                          "rows_done": 0, "extra_arrays": self.extras})
        specs = {
            "logits": ((rows, num_outputs), self.dtype, fmt.LOGITS_FILL),
            "labels": ((rows,), np.dtype(fmt.LABEL_DTYPE[kind]), None),
            "index": ((rows,), np.dtype(fmt.INDEX_DTYPE), None),
            "fingerprint": ((rows,), np.dtype(fmt.FINGERPRINT_DTYPE), None),
            **{key: ((rows, width), self.dtype, fmt.LOGITS_FILL) for key, width in self.extras.items()},
        }
        self.arrays: dict[str, zarr.Array] = {}
        self._buffers: dict[str, np.ndarray] = {}
        for key, (shape, dtype_, fill) in specs.items():
            self.arrays[key] = self.group.create_array(
                key,
                shape=shape,
                chunks=(chunk_rows, *shape[1:]),
                dtype=dtype_,
                compressors=fmt.compressors(codec if key in self._float_names else fmt.DEFAULT_CODEC, dtype_.itemsize),
                fill_value=fill,
                config=_ARRAY_CONFIG,
            )
            self._buffers[key] = np.empty((chunk_rows, *shape[1:]), dtype=dtype_)

    def _reopen(self, group: zarr.Group, num_outputs: int) -> None:
        """Continue an interrupted split: its first `rows_done` rows are on disk, whole and checksummed."""
        self.group = group
        self.arrays = {key: group[key] for key in self.names}
        widths = {"logits": num_outputs, **self.extras}
        for key, width in widths.items():
            array = self.arrays[key]
            if array.shape != (self.rows, width) or array.chunks[0] != self.chunk_rows:
                raise KDCacheError(f"{self.path}/{self.name}: the interrupted split's {key!r} has shape {array.shape} in "
                                   f"chunks of {array.chunks[0]} rows, not {(self.rows, width)} in {self.chunk_rows}; "
                                   "pass --overwrite to start again")
        self._buffers = {key: np.empty((self.chunk_rows, *a.shape[1:]), dtype=a.dtype) for key, a in self.arrays.items()}
        self._flushed = int(group.attrs.get("rows_done", 0))
        if self._flushed and not self.complete:
            done = np.asarray(self.arrays["fingerprint"][: self._flushed])
            self._digest.update(np.ascontiguousarray(done, dtype="<u8").tobytes())
            # the manifest of the chunks already on disk (each read back through its CRC32C)
            for start in range(0, self._flushed, self.chunk_rows):
                for key, array in self.arrays.items():
                    self._chunk_digests[key].append(fmt.chunk_digest(np.asarray(array[start:start + self.chunk_rows])))

    @property
    def rows_done(self) -> int:
        """Rows safely on disk: a resumed run starts computing at (or a little before) this row."""
        return self._flushed

    @property
    def complete(self) -> bool:
        return self.group.attrs.get("complete") is True

    def skip(self, rows: int) -> None:
        """Drop the next `rows` rows written: a resume recomputes from a batch boundary before rows_done.

        The dropped rows are not wasted: their fingerprints must equal the stored ones, which proves the data
        read now continues the data the interrupted run read."""
        self._skip = rows
        self._skip_at = self._flushed - rows

    @property
    def rows_written(self) -> int:
        return self._flushed + self._filled

    @property
    def _float_names(self) -> tuple[str, ...]:
        return ("logits", *self.extras)

    def write(self, logits: np.ndarray, labels: np.ndarray, index: np.ndarray, fingerprint: np.ndarray,
              *extras: np.ndarray) -> None:
        """Append a batch of rows (logits as computed, float32; then one array per extra, in the order given at
        creation); checks them before anything reaches disk."""
        if len(extras) != len(self.extras):
            raise ValueError(f"split {self.name!r}: {len(extras)} extra arrays written, {len(self.extras)} declared")
        if self._skip:
            drop = min(self._skip, len(logits))
            stored = np.asarray(self.arrays["fingerprint"][self._skip_at : self._skip_at + drop])
            stored_labels = np.asarray(self.arrays["labels"][self._skip_at : self._skip_at + drop])
            fresh_labels = np.asarray(labels[:drop], dtype=stored_labels.dtype)
            same = (stored == np.asarray(fingerprint[:drop], dtype=np.uint64)) & labels_equal(stored_labels, fresh_labels)
            if not same.all():
                row = self._skip_at + int(np.flatnonzero(~same)[0])
                raise KDCacheError(f"{self._where()}split {self.name!r}, row {row}: the data (input or label) differs "
                                   f"from what the interrupted cache {self.path} was begun with; pass --overwrite to "
                                   "start again")
            self._skip -= drop
            self._skip_at += drop
            logits, labels, index, fingerprint, *extras = (a[drop:] for a in (logits, labels, index, fingerprint,
                                                                              *extras))
            if not len(logits):
                return
        floats = {key: self._stored(key, values, index) for key, values in zip(self._float_names, (logits, *extras))}
        if self.rows_written + len(logits) > self.rows:
            raise KDCacheError(f"split {self.name!r}: more rows than the {self.rows} announced")
        columns = {**floats, "labels": labels, "index": index, "fingerprint": fingerprint}
        stored = floats["logits"]
        done = 0
        while done < len(stored):
            take = min(self.chunk_rows - self._filled, len(stored) - done)
            for key, values in columns.items():
                self._buffers[key][self._filled : self._filled + take] = values[done : done + take]
            self._filled += take
            done += take
            if self._filled == self.chunk_rows:
                self._flush()

    def _stored(self, key: str, values: np.ndarray, index: np.ndarray) -> np.ndarray:
        """`values` in the storage dtype, refused (with the row named) when not finite or beyond float16's range."""
        values = np.asarray(values, dtype=np.float32)
        what = "teacher output" if key == "logits" else f"teacher output {key!r}"
        bad = ~np.isfinite(values).all(axis=1)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise KDCacheError(
                f"{self._where()}split {self.name!r}, row {self.rows_written + row} (source index {int(index[row])}): "
                f"{what} contains NaN or Inf{self._left()}"
            )
        with np.errstate(over="ignore"):  # overflow is detected just below, with a better message
            stored = values.astype(self.dtype)
        if not np.isfinite(stored).all():
            row = int(np.flatnonzero(~np.isfinite(stored).all(axis=1))[0])
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
        return f"; {self.path} is left incomplete and will not be used"

    def _flush(self) -> None:
        if not self._filled:
            return
        start, stop = self._flushed, self._flushed + self._filled
        try:
            for key, array in self.arrays.items():
                array[start:stop] = self._buffers[key][: self._filled]
                self._chunk_digests[key].append(fmt.chunk_digest(self._buffers[key][: self._filled]))
            self.group.attrs["rows_done"] = stop  # after the data: a crash before it just rewrites this block
        except OSError as exc:
            raise _storage_error(self.path, f"split {self.name!r} rows {start}:{stop}", exc) from exc
        self._digest.update(np.ascontiguousarray(self._buffers["fingerprint"][: self._filled], dtype="<u8").tobytes())
        self._flushed, self._filled = stop, 0

    def close(self, dataset: dict[str, Any]) -> str:
        """Write the last partial chunk and the split's attributes; returns the dataset digest."""
        self._flush()
        if self._flushed != self.rows:
            raise KDCacheError(f"split {self.name!r}: wrote {self._flushed} rows but the dataset has {self.rows}")
        digest = self._digest.hexdigest()
        try:
            self.group.attrs.update({"dataset": {**dataset, "digest": digest},
                                     "chunk_digests": {"algorithm": fmt.CHUNK_DIGEST_ALGORITHM,
                                                       "arrays": self._chunk_digests},
                                     "complete": True})
        except OSError as exc:
            raise _storage_error(self.path, f"split {self.name!r} attributes", exc) from exc
        return digest


class CacheWriter:
    """Creates a cache at `path` and marks it complete only after every split is closed."""

    def __init__(self, path: str | Path, attrs: dict[str, Any], *, overwrite: bool = False, resume: bool = False,
                 settings: dict[str, Any] | None = None) -> None:
        """`settings` is what must not change across a resume (teacher hash, data, storage); stored in the attrs."""
        self.path = Path(path)
        self.resumed = resume and check_destination(self.path, overwrite=False)
        self.splits: list[str] = []
        if self.resumed:
            self._reopen(settings or {})
            return
        _prepare_destination(self.path, overwrite)
        header = {"format": fmt.FORMAT_NAME, "format_version": fmt.FORMAT_VERSION, "complete": False}
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / WRITER_MARKER).write_text(json.dumps({"pid": os.getpid(), "started": utc_now()}) + "\n")
            self.root = zarr.create_group(store=str(self.path), overwrite=False,  # refuses an existing zarr.json
                                          attributes={**header, **attrs, "write_settings": settings or {}, "splits": []})
            (self.path / WRITER_MARKER).unlink()  # zarr.json is in place: from now on the folder is a (resumable) cache
        except OSError as exc:
            raise _storage_error(self.path, "the cache header", exc) from exc

    def _reopen(self, settings: dict[str, Any]) -> None:
        """Open an interrupted cache for resuming, only if it was begun with the very same settings."""
        old = json.loads(json.dumps((read_root_attrs(self.path) or {}).get("write_settings")))
        new = json.loads(json.dumps(settings))
        if old != new:
            differ = ", ".join(_differences(old, new)[:4]) if isinstance(old, dict) else "all (no settings recorded)"
            raise KDCacheError(f"{self.path}: holds an interrupted cache written with other settings (differs in "
                               f"{differ}); rerun with the same teacher, data and storage flags, or pass --overwrite")
        for partial in self.path.rglob("*.partial"):  # temporary files of writes the crash cut short
            partial.unlink(missing_ok=True)
        (self.path / WRITER_MARKER).unlink(missing_ok=True)  # killed just after zarr.json was written
        self.root = zarr.open_group(store=str(self.path), mode="r+")

    def add_split(self, name: str, **kwargs: Any) -> SplitWriter:
        """Create the arrays of one split (see SplitWriter for the keyword arguments)."""
        if name in self.splits:
            raise KDCacheError(f"{self.path}: split {name!r} given twice")
        self.splits.append(name)
        try:
            return SplitWriter(self.root, self.path, name, resume=self.resumed, **kwargs)
        except OSError as exc:
            raise _storage_error(self.path, f"split {name!r}", exc) from exc

    def add_blob(self, name: str, data: bytes, attrs: dict[str, Any]) -> None:
        """Store a small opaque file (e.g. the teacher's tokenizer as a zip) as a checksummed uint8 array."""
        if self.resumed and name in self.root.array_keys():
            if (self.path / name / "c" / "0").is_file():
                return  # written whole (one chunk, renamed into place) before the interrupted run went on
            shutil.rmtree(self.path / name)  # killed between its metadata and its chunk: write it again
        payload = np.frombuffer(data, dtype=np.uint8)
        try:
            self.root.create_array(
                name,
                data=payload,
                chunks=(max(1, len(payload)),),
                compressors=fmt.compressors("zstd3", 1),
                attributes={**attrs, "sha256": hashlib.sha256(data).hexdigest()},  # binds the blob to its place
                config=_ARRAY_CONFIG,
            )
        except OSError as exc:
            raise _storage_error(self.path, name, exc) from exc

    def finalize(self, attrs: dict[str, Any] | None = None) -> None:
        """Set `complete: true`, the last write of a cache: before it, no reader will use the cache."""
        try:
            self.root.attrs.update({**(attrs or {}), "splits": self.splits, "completed": utc_now(), "complete": True})
        except OSError as exc:
            raise _storage_error(self.path, "the final attributes", exc) from exc


class BackgroundWriter:
    """Runs `sink(*arrays)` on a thread, converting tensors to numpy there, so compute never waits on disk.

    Tensors may still live on the GPU: the `.cpu()` copy (and its synchronisation) happens on the writer
    thread. An error on the thread is re-raised in the caller at the next `put` or at `close`.
    """

    _STOP = object()

    def __init__(self, sink: Callable[..., None], max_pending: int = 8) -> None:
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
                self._sink(*(_to_numpy(a) for a in item))
            except BaseException as exc:  # noqa: BLE001 - handed to the producer thread
                self._error = exc

    def put(self, *arrays: Any) -> None:
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
        else:  # stop the thread quietly; the original exception propagates
            self._queue.put(self._STOP)
            self._thread.join()


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return np.asarray(value)
