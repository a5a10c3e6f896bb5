"""Where a cache's bytes live: the only module that touches a cache's files or objects.

A cache is named by a local path or an fsspec URL (`s3://bucket/name.kdcache`, `gs://`, `memory://`, `file://`).
`CacheStore` turns that name into a Zarr store (Zarr's `LocalStore` for a folder, its `FsspecStore` for a URL)
and answers everything else the cache layer asks of storage: does anything exist there, which files lie under a
prefix (one listing, never one request per chunk), small JSON reads, the marker a new cache starts with, the
cleanup of a writer's temporary files, and the writer's lock. Above this module a folder and an S3 prefix are
the same.

Remote endpoints and credentials come the way the ecosystem gives them: fsspec's configuration (environment
variables `FSSPEC_S3_ENDPOINT_URL`, `FSSPEC_S3_KEY`, `FSSPEC_S3_SECRET`, ... or fsspec's config files), the
provider's own variables (`AWS_ACCESS_KEY_ID`, `AWS_ENDPOINT_URL`, ...), and `storage_options` (the CLI's
repeatable `--storage-option KEY=VALUE`), which take precedence.

The writer's lock: on a local disk an `flock` that dies with its process (`LocalLock`); on an object store a
lease object beside the cache (`<cache>.lock`) holding its owner and an expiry, renewed while the writer runs
and taken over by a new writer only once it has expired (`Lease`), and a writer's metadata writes fenced by it
(`_FencedFsspecStore`). Metadata files are read bounded, plain files only (`MAX_METADATA_BYTES`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import math
import os
import re
import shutil
import socket
import stat
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from zarr.core.buffer import default_buffer_prototype
from zarr.storage import FsspecStore, LocalStore

from kdcache.errors import KDCacheError

#: A file a new cache folder (or prefix) receives before anything else, removed once `zarr.json` is in place:
#: a location holding it and nothing but temporary files was started by kdcache and may be cleaned up.
WRITER_MARKER = ".kdcache-writer"
#: How long a lease on an object store stays valid without renewal; a killed writer's cache can be taken over
#: after this long. The writer renews it every third of this (environment variable KDCACHE_LEASE_SECONDS).
DEFAULT_LEASE_SECONDS = 60.0
#: The longest lease a writer takes (KDCACHE_LEASE_SECONDS); a lease record expiring later than this from now was not
#: written by kdcache and counts as damaged.
MAX_LEASE_SECONDS = 24 * 3600.0
#: No metadata file of a cache (`zarr.json`) is read past this many bytes: a split's chunk manifest, its largest,
#: holds about 40 bytes per chunk and array (a million chunk digests fit). A larger file, or one that is no plain
#: file (a FIFO, a link to /dev/zero), is refused before it is read, so it can neither hang nor exhaust memory.
MAX_METADATA_BYTES = 64 * 1024**2
_MAX_LEASE_BYTES = 64 * 1024
_METADATA_NAMES = ("zarr.json", ".zarray", ".zgroup", ".zattrs", ".zmetadata")
_BUCKET_PROTOCOLS = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "oss", "r2")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_SCHEME_WITHOUT_SLASHES = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+):(?!//)")


def parse_storage_options(items: list[str] | None) -> dict[str, Any]:
    """`KEY=VALUE` strings (the CLI's --storage-option) as fsspec storage options: values parsed as JSON when
    they are JSON (true, 3, {"a": 1}), else kept as strings; dotted keys nest (client_kwargs.region_name=x)."""
    options: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise KDCacheError(f"--storage-option {item!r}: expected KEY=VALUE, e.g. endpoint_url=http://127.0.0.1:9000")
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        target = options
        *parents, leaf = key.strip().split(".")
        for part in parents:
            target = target.setdefault(part, {})
        target[leaf] = value
    return options


class CacheStore:
    """One cache location: a local folder or a prefix in an fsspec filesystem."""

    def __init__(self, location: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> None:
        self.location = str(location)
        self.options = dict(storage_options or {})
        match = _SCHEME.match(self.location)
        if match is None:
            bad = _SCHEME_WITHOUT_SLASHES.match(self.location)
            if bad and _is_protocol(bad.group(1)) and not Path(self.location).exists():
                raise KDCacheError(f"{self.location}: not a path, and not a URL either (a URL is "
                                   f"{bad.group(1)}://...)")
            if self.location.startswith("//"):
                raise KDCacheError(f"{self.location}: not a path, and a URL needs a scheme (s3://, gs://, ...)")
        self.protocol = match.group(1).lower() if match else "file"
        self.is_local = self.protocol == "file"
        if self.is_local:
            local = self.location[len("file://"):] if match else self.location
            self.path = Path(local).expanduser()
            self.root = str(self.path)
        else:  # the path as the filesystem spells it (s3: "bucket/key", memory: "/key")
            self.root = _strip_protocol(self.protocol, self.location).rstrip("/")
            if self.protocol in _BUCKET_PROTOCOLS and not self.root.strip("/"):
                raise KDCacheError(f"{self.location}: names no bucket (e.g. {self.protocol}://bucket/name.kdcache)")
        self._fs: Any = None

    # --- names ---------------------------------------------------------------------------------------------------

    def __str__(self) -> str:
        return self.location

    def display(self, key: str = "") -> str:
        """How messages name a file of the cache: a path, or a URL."""
        if not key:
            return str(self.path) if self.is_local else self.location
        return str(self.path / key) if self.is_local else f"{self.location.rstrip('/')}/{key}"

    @property
    def fs(self) -> Any:
        """The fsspec filesystem behind a URL (synchronous), created on first use; one line if it cannot be."""
        if self._fs is None:
            self._fs = _filesystem(self.protocol, self.options, self.location)
        return self._fs

    # --- Zarr ----------------------------------------------------------------------------------------------------

    def zarr_store(self, *, read_only: bool, lock: "LocalLock | Lease | None" = None) -> Any:
        """The Zarr store of the cache: every array and attribute goes through it. Its metadata reads are bounded
        (MAX_METADATA_BYTES, plain files only); given the writer's `lock`, its metadata writes are fenced (see
        `_FencedFsspecStore`)."""
        if self.is_local:
            self.check_metadata_files()
            return _GuardedLocalStore(str(self.path), read_only=read_only)
        with remote_errors(self.location):
            _apply_fsspec_env()
            zstore = _FencedFsspecStore.from_url(self.location, storage_options=self.options, read_only=read_only)
        zstore.fence, zstore.location = lock, self.location
        return zstore

    def check_metadata_files(self) -> None:
        """Refuse a local cache's metadata file that is no plain file or too large before Zarr reads any: Zarr reads
        a group's members concurrently, and an error raised in one of its reads leaves the others pending (noise
        on stderr). Costs a walk of the root, split and array folders, never of the chunk folders."""
        if not self.path.is_dir():
            return
        for folder, dirs, files in os.walk(self.path):
            depth = len(Path(folder).relative_to(self.path).parts)
            dirs[:] = [d for d in dirs if depth < 2 and d != "c" and not d.startswith(".")]
            for name in files:
                if name in _METADATA_NAMES:
                    read_local_metadata(Path(folder) / name, check_only=True)

    def check(self) -> None:
        """For a URL, one request proving the endpoint answers, the credentials are accepted and the bucket exists,
        so a typo is one line before any work rather than an error deep inside Zarr."""
        if self.is_local or self.protocol not in _BUCKET_PROTOCOLS:
            return
        bucket = self.root.split("/", 1)[0]
        with remote_errors(self.location):
            try:
                self.fs.info(bucket)
            except FileNotFoundError:
                raise KDCacheError(f"{self.location}: no such bucket {bucket!r}") from None

    # --- queries -------------------------------------------------------------------------------------------------

    def exists(self) -> bool:
        """Whether anything lies at the location (a folder, a file, or any object under the prefix)."""
        if self.is_local:
            return self.path.exists()
        return bool(self.list_files(limit=1))

    def is_file(self) -> bool:
        """A local file where a cache folder is expected (object stores have no such thing)."""
        return self.is_local and self.path.is_file()

    def is_empty(self) -> bool:
        """Nothing at the location, or an empty folder (which a new cache may be written into)."""
        if self.is_local:
            return not self.path.exists() or (self.path.is_dir() and not any(self.path.iterdir()))
        return not self.exists()

    def list_files(self, prefix: str = "", *, limit: int | None = None) -> dict[str, int]:
        """Relative keys of the files under `prefix` (a folder of the cache, '' for all) and their sizes, from one
        listing (paged by the store, never a request per file)."""
        if self.is_local:
            base = self.path / prefix if prefix else self.path
            out: dict[str, int] = {}
            if not base.is_dir():
                return out
            for folder, _, files in os.walk(base):
                for name in files:
                    full = Path(folder) / name
                    with contextlib.suppress(OSError):
                        out[full.relative_to(self.path).as_posix()] = full.stat().st_size
                    if limit is not None and len(out) >= limit:
                        return out
            return out
        root = f"{self.root}/{prefix}".rstrip("/")
        with remote_errors(self.location):
            try:
                found = self.fs.find(root, detail=True, maxdepth=None)
            except FileNotFoundError:
                return {}
        return {k[len(self.root) + 1:]: int(v.get("size") or 0) for k, v in found.items() if v.get("type") != "directory"}

    def has_file(self, key: str) -> bool:
        """Whether one file exists; cheap on a local disk only, so remote readers rely on the listing made at open."""
        if self.is_local:
            return (self.path / key).is_file()
        return True

    def read_json(self, key: str) -> Any | None:
        """A small JSON file of the cache (`zarr.json`), or None when it is absent or does not parse; read within
        MAX_METADATA_BYTES, and refused (one line) when it is larger or no plain file."""
        try:
            if self.is_local:
                data = read_local_metadata(self.path / key)
            else:
                with remote_errors(self.location):
                    found = self.fetch(f"{self.root}/{key}", self.display(key))
                data = None if found is None else found[0]
            return None if data is None else json.loads(data)
        except (OSError, ValueError):
            return None

    def fetch(self, path: str, where: str, limit: int | None = None) -> tuple[bytes, str | None] | None:
        """An object's bytes (at most `limit`, MAX_METADATA_BYTES by default) and, on S3, its ETag, both from one
        response, so bytes and ETag always belong to the same version; None when there is no such object."""
        if getattr(self.fs, "async_impl", False):
            from fsspec.asyn import sync

            return sync(self.fs.loop, fetch_remote, self.fs, path, where, limit)
        limit = MAX_METADATA_BYTES if limit is None else limit
        try:
            data = self.fs.cat_file(path, start=0, end=limit + 1)
        except FileNotFoundError:
            return None
        _check_size(where, len(data), limit)
        return data, None

    def write_json(self, key: str, value: Any) -> None:
        """A small JSON file of the cache, whole or not at all (a renamed temporary file on a local disk, one PUT on
        an object store): the progress records of a capture by several processes."""
        data = json.dumps(value, sort_keys=True).encode()
        if self.is_local:
            target = self.path / key
            target.parent.mkdir(parents=True, exist_ok=True)
            temporary = target.with_name(f"{target.name}.{os.getpid()}.partial")
            temporary.write_bytes(data)
            os.replace(temporary, target)
            return
        with remote_errors(self.location):
            self.fs.pipe_file(f"{self.root}/{key}", data)

    def size(self) -> int:
        """Bytes stored for the cache."""
        return sum(self.list_files().values())

    # --- a writer's housekeeping ---------------------------------------------------------------------------------

    def started_by_kdcache(self) -> bool:
        """The location holds kdcache's marker and nothing but temporary files: a writer was killed before its
        first file was in place, and nothing of the user's is there."""
        files = self.list_files()
        return WRITER_MARKER in files and all(k == WRITER_MARKER or k.endswith(".partial") for k in files)

    def write_marker(self) -> None:
        """The first write of a new cache, before `zarr.json` (see WRITER_MARKER)."""
        data = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}) + "\n"
        if self.is_local:
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / WRITER_MARKER).write_text(data)
        else:
            with remote_errors(self.location):
                self.fs.pipe_file(f"{self.root}/{WRITER_MARKER}", data.encode())

    def remove_marker(self) -> None:
        self.delete(WRITER_MARKER)

    def delete(self, key: str) -> None:
        if self.is_local:
            (self.path / key).unlink(missing_ok=True)
            return
        with remote_errors(self.location), contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(f"{self.root}/{key}")

    def delete_all(self) -> None:
        """Remove the whole cache (a replaced cache, or a start kdcache itself left behind)."""
        if self.is_local:
            if self.path.is_dir():
                shutil.rmtree(self.path)
            return
        with remote_errors(self.location), contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.root, recursive=True)

    def delete_prefix(self, prefix: str) -> None:
        """Remove one folder of the cache (a split or array whose creation a crash cut short)."""
        if self.is_local:
            shutil.rmtree(self.path / prefix, ignore_errors=True)
            return
        with remote_errors(self.location), contextlib.suppress(FileNotFoundError):
            self.fs.rm(f"{self.root}/{prefix}", recursive=True)

    def remove_partials(self) -> None:
        """Temporary files of local writes a crash cut short (object stores write whole objects or nothing)."""
        if self.is_local:
            for partial in self.path.rglob("*.partial"):
                partial.unlink(missing_ok=True)

    def prepare(self) -> None:
        """Whatever must exist before a Zarr store is created there (a local folder's parents)."""
        if self.is_local:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def lock(self) -> "LocalLock | Lease":
        """The writer's lock of this cache: an flock on a local disk, a lease object on an object store."""
        return LocalLock(self.path) if self.is_local else Lease(self)


def as_store(location: "str | os.PathLike | CacheStore", storage_options: dict[str, Any] | None = None) -> CacheStore:
    """A path, a URL or a store, as a store."""
    return location if isinstance(location, CacheStore) else CacheStore(location, storage_options)


# --- locks --------------------------------------------------------------------------------------------------------

class LocalLock:
    """An exclusive lock on a local cache path, held with flock on `<resolved path>.lock`.

    The kernel drops a flock when its process dies, however it dies (SIGKILL included), so a crashed writer never
    leaves the cache locked; the file may stay behind and means nothing on its own. It is named from the path with
    every symbolic link resolved, so two spellings of one cache share one lock, and opened without following a
    symbolic link (and checked to be a plain file of its own), so a link planted at its name cannot make kdcache
    write elsewhere.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        resolved = Path(os.path.realpath(self.path))
        self.file = resolved.with_name(resolved.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> "LocalLock":
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

    def check(self) -> None:
        """A local lock cannot be lost while its process lives."""

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "LocalLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


class Lease:
    """A writer's lease on a cache in an object store: the object `<cache>.lock` holds the owner (a random id, the
    machine and the pid) and an expiry time.

    Taken with conditional writes, so two writers can never both hold it: a new lease is created only if no lease
    object exists (If-None-Match), and an expired one (or, on this very machine, one whose process is gone) is
    replaced only if it is still the object that was read (If-Match on its ETag); every renewal is conditional on
    the lease this writer last wrote. A thread renews it every third of its lifetime. The writer checks before
    each write (`check`) that its last renewal is younger than the lifetime less a margin, and that no renewal
    found the lease taken: a writer that stalled, lost its connection or was frozen stops rather than write
    beside a new owner; and since that check can race with a freeze, the writer's metadata writes are fenced too
    (`_FencedFsspecStore`). The record and its ETag are read from one response; a damaged record (`_lease_damage`)
    is refused with one line, never taken over, as nothing in it tells whether a live writer holds the cache.
    Filesystems without conditional writes (e.g. `memory://`) get write-then-read-back, which is enough for one
    process.
    """

    SAFETY = 0.8  # a lease older than this share of its lifetime, unrenewed, counts as lost by its own writer

    def __init__(self, store: CacheStore, seconds: float | None = None) -> None:
        self.store = store
        raw = seconds if seconds is not None else os.environ.get("KDCACHE_LEASE_SECONDS", DEFAULT_LEASE_SECONDS)
        try:
            self.seconds = float(raw)
        except (TypeError, ValueError):
            self.seconds = float("nan")
        if not 0 < self.seconds <= MAX_LEASE_SECONDS:
            raise KDCacheError(f"KDCACHE_LEASE_SECONDS={raw!r}: the writer's lease lifetime must be a number of "
                               f"seconds above 0 and at most {MAX_LEASE_SECONDS:.0f}")
        if store.protocol in _BUCKET_PROTOCOLS and "/" not in store.root.strip("/"):
            raise KDCacheError(f"{store.location}: a cache needs a name under the bucket "
                               "(e.g. s3://bucket/name.kdcache)")
        self.key = f"{store.root}.lock"
        self.owner = {"id": uuid.uuid4().hex, "host": socket.gethostname(), "machine": machine_id(),
                      "pid": os.getpid()}
        self.conditional = store.protocol in ("s3", "s3a")
        self._etag: str | None = None
        self._renewed = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None

    @property
    def display(self) -> str:
        """The lease object's URL, as messages name it."""
        return f"{self.store.location.rstrip('/')}.lock"

    def _read(self) -> tuple[dict[str, Any] | None, str | None]:
        """The lease record and its ETag, both from one response (a record is never paired with another version's
        ETag); (None, None) when there is no lease. A damaged record is one line (`_damage`)."""
        found = self.store.fetch(self.key, self.display, _MAX_LEASE_BYTES)
        if found is None:
            return None, None
        data, etag = found
        try:
            record = json.loads(data)
        except ValueError:
            record = data
        problem = _lease_damage(record)
        if problem:
            raise KDCacheError(f"{self.display}: the writer's lease object is damaged ({problem}), so whether a "
                               "cache-teacher still writes this cache cannot be told; if none does, delete that "
                               "object (e.g. aws s3 rm URL) and rerun")
        return record, etag
    def _write(self, *, create: bool = False, match: str | None = None) -> None:
        """Write this writer's record: only if absent (`create`), or only over the object with ETag `match`."""
        data = json.dumps({**self.owner, "expires": time.time() + self.seconds}).encode()
        fs = self.store.fs
        if self.conditional:
            kwargs = {"mode": "create"} if create else {"IfMatch": match} if match else {}
            response = fs.pipe_file(self.key, data, **kwargs)
            self._etag = (response or {}).get("ETag")
        elif create:
            fs.pipe_file(self.key, data, mode="create")
        else:
            fs.pipe_file(self.key, data)
        self._renewed = time.monotonic()

    def _held_by_other(self, record: dict[str, Any] | None) -> bool:
        """A live lease of another writer: unexpired, and (when taken on this machine) its process alive."""
        if not record or record.get("id") == self.owner["id"] or record["expires"] <= time.time():
            return False
        if record.get("machine") == self.owner["machine"] and isinstance(record.get("pid"), int):
            try:
                os.kill(record["pid"], 0)
            except ProcessLookupError:
                return False  # its writer on this machine is gone (killed): no need to wait for the expiry
            except PermissionError:
                pass
        return True

    def acquire(self) -> "Lease":
        self.store.check()  # never create a bucket (some servers do on a first write) for the lease object
        with remote_errors(self.store.location):
            record, etag = self._read()
            if self._held_by_other(record):
                raise KDCacheError(self._taken_message(record))
            try:
                self._write(create=record is None, match=etag)
            except OSError as exc:
                if not (isinstance(exc, FileExistsError) or _precondition_failed(exc)):
                    raise
                raise KDCacheError(self._taken_message(self._read()[0], raced=True)) from None
            if not self.conditional:  # no atomic write to rely on: read back what landed
                time.sleep(0.2)
                record, _ = self._read()
                if (record or {}).get("id") != self.owner["id"]:
                    raise KDCacheError(self._taken_message(record, raced=True))
        self._thread = threading.Thread(target=self._renew, name="kdcache-lease", daemon=True)
        self._thread.start()
        return self

    def _taken_message(self, record: dict[str, Any] | None, raced: bool = False) -> str:
        holder = f"{(record or {}).get('host')} pid {(record or {}).get('pid')}"
        left = max(0.0, (record or {}).get("expires", 0) - time.time())
        when = "took the lease on this cache at the same moment" if raced else \
            f"holds the lease on this cache for {left:.0f} s more"
        return (f"{self.store.location}: another cache-teacher ({holder}) {when}; wait for it to finish, or for its "
                "lease to expire if it was killed")

    def _renew(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                if self.conditional:
                    self._write(match=self._etag)  # fails if anyone else wrote the lease since our last write
                else:
                    record, _ = self._read()
                    if record is not None and record.get("id") != self.owner["id"]:
                        raise OSError("the lease was taken by another writer")
                    self._write()
            except PermissionError:
                continue  # transient refusals are retried; the lifetime is the real limit
            except Exception as exc:  # noqa: BLE001 - a failed precondition: the lease is someone else's now
                if _precondition_failed(exc) or "taken" in str(exc):
                    try:
                        record, _ = self._read()
                    except Exception:  # noqa: BLE001 - gone or damaged: the holder is unknown
                        record = None
                    self.lost = (f"{self.store.location}: the writer's lease was taken by "
                                 f"{(record or {}).get('host')} pid {(record or {}).get('pid')}")
                    return
                continue

    def check(self) -> None:
        """Raise when this writer may no longer hold the lease: a writer must never write on after another may
        have taken the cache (its renewals failed for most of the lease's lifetime, or it found it taken)."""
        age = time.monotonic() - self._renewed
        if self.lost is None and age > self.SAFETY * self.seconds:
            self.lost = (f"{self.store.location}: the writer's lease was last renewed {age:.0f} s ago (it lives "
                         f"{self.seconds:.0f} s), so another writer may hold it")
        if self.lost:
            raise KDCacheError(self.lost + "; this run stopped without writing further")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with contextlib.suppress(Exception):
            record, _ = self._read()
            if record is not None and record.get("id") == self.owner["id"]:
                self.store.fs.rm_file(self.key)

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _lease_damage(record: Any) -> str | None:
    """What is wrong with a lease record kdcache cannot have written, or None: it must be a JSON object whose
    `expires` is a finite time no further ahead than the longest lease (MAX_LEASE_SECONDS)."""
    if not isinstance(record, dict):
        return "not JSON" if isinstance(record, bytes) else f"not a JSON object but {json.dumps(record)[:40]}"
    expires = record.get("expires")
    if isinstance(expires, bool) or not isinstance(expires, (int, float)) or not math.isfinite(expires):
        return f"expires is {json.dumps(expires)[:40]}, not a time"
    if expires > time.time() + MAX_LEASE_SECONDS + 3600:
        return f"expires {expires:.4g} is more than {MAX_LEASE_SECONDS:.0f} s away"
    return None


def _precondition_failed(exc: BaseException) -> bool:
    """A conditional write refused (S3's 412 PreconditionFailed, as botocore and s3fs word it)."""
    text = str(exc).lower()
    return "pre-condition" in text or "precondition" in text


def machine_id() -> str:
    """Which machine and process namespace a pid belongs to: the host's machine id (not its name, which containers
    and cloned machines share) and the pid namespace, so a pid is only ever looked up where it means something."""
    ident = ""
    for candidate in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        with contextlib.suppress(OSError):
            ident = Path(candidate).read_text().strip()
            break
    with contextlib.suppress(OSError):
        ident += f":pidns{os.stat('/proc/self/ns/pid').st_ino}"
    return ident or f"host:{socket.gethostname()}"


# --- metadata: bounded reads, fenced writes ------------------------------------------------------------------------

def is_metadata(key: str) -> bool:
    """Whether a store key names a metadata file (`zarr.json`, or Zarr v2's) rather than a chunk."""
    return key.rsplit("/", 1)[-1] in _METADATA_NAMES


def _check_size(where: object, size: int, limit: int) -> None:
    if size > limit:
        raise KDCacheError(f"{where}: {size:,} bytes or more, more than the {limit:,} bytes a metadata file may hold; "
                           "the cache is damaged or hostile (recreate it)")


def read_local_metadata(path: Path, limit: int | None = None, *, check_only: bool = False) -> bytes | None:
    """A local metadata file's bytes, None when absent (or a folder, as Zarr sees it). Opened without blocking and
    checked with fstat before any read: a FIFO, a device (a link to /dev/zero) or a file over `limit`
    (MAX_METADATA_BYTES) is one line, never a hang or a read until memory runs out. `check_only`: no read."""
    limit = MAX_METADATA_BYTES if limit is None else limit
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            return None
        if not stat.S_ISREG(info.st_mode):
            raise KDCacheError(f"{path}: not a plain file (a FIFO, a device or a socket, or a link to one), where the "
                               "cache's metadata belongs; the cache is damaged or hostile (recreate it)")
        _check_size(path, info.st_size, limit)
        if check_only:
            return None
        parts, total = [], 0
        while total <= limit:
            part = os.read(fd, min(limit + 1 - total, 1 << 20))
            if not part:
                break
            parts.append(part)
            total += len(part)
        _check_size(path, total, limit)  # it grew while read
        return b"".join(parts)
    finally:
        os.close(fd)


async def fetch_remote(fs: Any, path: str, where: str, limit: int | None = None) -> tuple[bytes, str | None] | None:
    """`CacheStore.fetch` on an async filesystem: on S3 one GET whose response gives the size (checked before the
    body is read), the bytes and the ETag together; elsewhere a read of at most `limit` + 1 bytes."""
    limit = MAX_METADATA_BYTES if limit is None else limit
    if not hasattr(fs, "_call_s3"):
        try:
            data = await fs._cat_file(path, start=0, end=limit + 1)
        except FileNotFoundError:
            return None
        _check_size(where, len(data), limit)
        return data, None
    bucket, key, version = fs.split_path(path)
    try:
        response = await fs._call_s3("get_object", Bucket=bucket, Key=key,
                                     **({"VersionId": version} if version else {}))
    except FileNotFoundError:
        return None
    body = response["Body"]
    try:
        _check_size(where, int(response.get("ContentLength") or 0), limit)
        parts, total = [], 0
        while total <= limit:
            part = await body.read(limit + 1 - total)
            if not part:
                break
            parts.append(part)
            total += len(part)
    finally:
        body.close()
    _check_size(where, total, limit)
    return b"".join(parts), response.get("ETag")


class _GuardedLocalStore(LocalStore):
    """Zarr's LocalStore, its metadata reads bounded (`read_local_metadata`)."""

    async def get(self, key: str, prototype: Any = None, byte_range: Any = None) -> Any:
        if byte_range is not None or not is_metadata(key):
            return await super().get(key, prototype, byte_range)
        if not self._is_open:
            await self._open()
        data = await asyncio.to_thread(read_local_metadata, self.root / key)
        return None if data is None else (prototype or default_buffer_prototype()).buffer.from_bytes(data)


class _FencedFsspecStore(FsspecStore):
    """Zarr's FsspecStore, its metadata reads bounded (`fetch_remote`) and, given the writer's lock (`fence`), its
    metadata writes fenced: right before each one the lease is checked (`Lease.check`), and on S3 the write is
    conditional on the version this writer last read or wrote of that object (If-Match on its ETag; If-None-Match
    for one it never saw). A writer frozen past its lease, whose own check raced with the takeover, can then never
    replace metadata a newer writer wrote: its write is refused and it stops."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fence: Any = None  # the writer's lock (a Lease fences; a LocalLock or None does not)
        self.location = ""  # the cache's URL, as messages name it
        self._etags: dict[str, str | None] = {}  # metadata key -> ETag of the version this writer last read or wrote

    def with_read_only(self, read_only: bool = False) -> "_FencedFsspecStore":
        other = super().with_read_only(read_only)
        other.fence, other.location = self.fence, self.location
        return other

    def _where(self, key: str) -> str:
        return f"{self.location.rstrip('/')}/{key}"

    def _path(self, key: str) -> str:
        root = self.path.rstrip("/")  # as Zarr's FsspecStore names its objects
        return f"{root}/{key}" if root else key

    async def get(self, key: str, prototype: Any = None, byte_range: Any = None) -> Any:
        if byte_range is not None or not is_metadata(key):
            return await super().get(key, prototype, byte_range)
        if not self._is_open:
            await self._open()
        found = await fetch_remote(self.fs, self._path(key), self._where(key))
        if found is None:
            self._etags.pop(key, None)
            return None
        self._etags[key] = found[1]
        return (prototype or default_buffer_prototype()).buffer.from_bytes(found[0])

    async def set(self, key: str, value: Any, byte_range: Any = None) -> None:
        if self.fence is None or not is_metadata(key):
            return await super().set(key, value, byte_range)
        self.fence.check()  # (1) the lease, right before every metadata write
        if not getattr(self.fence, "conditional", False):
            return await super().set(key, value, byte_range)
        self._check_writable()
        seen = self._etags.get(key)
        try:  # (2) and only over the version this writer knows
            response = await self.fs._pipe_file(self._path(key), value.to_bytes(),
                                                **({"IfMatch": seen} if seen else {"mode": "create"}))
        except Exception as exc:  # noqa: BLE001 - s3fs words a refused precondition in several ways
            if not (isinstance(exc, FileExistsError) or _precondition_failed(exc)):
                raise
            raise KDCacheError(f"{self._where(key)}: another writer changed this cache's metadata since this writer "
                               "last read it (its lease was taken over while it was stalled or frozen); this run "
                               "stopped without writing further") from None
        self._etags[key] = (response or {}).get("ETag")

    async def delete(self, key: str) -> None:
        self._etags.pop(key, None)
        await super().delete(key)

    async def delete_dir(self, prefix: str) -> None:
        for key in [k for k in self._etags if k.startswith(prefix.rstrip("/") + "/")]:
            del self._etags[key]
        await super().delete_dir(prefix)


# --- fsspec --------------------------------------------------------------------------------------------------------

def _apply_fsspec_env() -> None:
    """Read FSSPEC_<PROTOCOL>_<KEY> variables now, not only when fsspec was first imported."""
    import fsspec.config

    fsspec.config.set_conf_env(fsspec.config.conf)


def _is_protocol(name: str) -> bool:
    """Whether `name` is a protocol fsspec knows (so `s3:bucket/c` is a URL missing its //, and `sst2:bert` a path)."""
    import fsspec

    return name.lower() in fsspec.available_protocols()


def _strip_protocol(protocol: str, location: str) -> str:
    import fsspec

    try:
        return fsspec.get_filesystem_class(protocol)._strip_protocol(location)
    except (ValueError, ImportError):
        return location.split("://", 1)[1]  # the protocol's own error comes when the filesystem is made


def _filesystem(protocol: str, options: dict[str, Any], location: str) -> Any:
    import fsspec

    _apply_fsspec_env()
    with remote_errors(location):
        try:
            cls = fsspec.get_filesystem_class(protocol)
        except ValueError:
            raise KDCacheError(f"{location}: unknown storage protocol {protocol!r} (fsspec knows none of that name)") \
                from None
        except ImportError as exc:
            raise KDCacheError(f"{location}: the {protocol}:// protocol needs a package that is not installed "
                               f"({_first_line(exc)})") from None
        return cls(**{**cls._get_kwargs_from_urls(location), **options})  # a URL's host, port, user


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextlib.contextmanager
def remote_errors(location: str) -> Iterator[None]:
    """An object store's failures as one line naming the URL and the cause a user can act on."""
    try:
        yield
    except KDCacheError:
        raise
    except PermissionError as exc:
        raise KDCacheError(f"{location}: access denied: the storage refused the credentials "
                           f"({_first_line(exc)})") from None
    except ImportError as exc:
        raise KDCacheError(f"{location}: a package this storage needs is not installed ({_first_line(exc)})") from None
    except Exception as exc:  # noqa: BLE001 - botocore, aiohttp and fsspec raise many types
        text = f"{type(exc).__name__}: {_first_line(exc)}"
        if type(exc).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
            raise KDCacheError(f"{location}: no credentials for the storage ({_first_line(exc)}); set "
                               "FSSPEC_S3_KEY and FSSPEC_S3_SECRET (or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY), "
                               "or pass --storage-option key=... --storage-option secret=...") from None
        if any(word in text for word in ("Could not connect", "ConnectionError", "ConnectTimeout", "Connect call failed",
                                         "EndpointConnectionError", "Cannot connect", "Name or service not known")):
            raise KDCacheError(f"{location}: cannot reach the storage endpoint ({_first_line(exc)})") from None
        if "NoSuchBucket" in text or "bucket does not exist" in text.lower():
            raise KDCacheError(f"{location}: no such bucket ({_first_line(exc)})") from None
        if any(word in text for word in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "Forbidden")):
            raise KDCacheError(f"{location}: access denied: the storage refused the credentials "
                               f"({_first_line(exc)})") from None
        raise


__all__ = ["CacheStore", "as_store", "DEFAULT_LEASE_SECONDS", "Lease", "LocalLock", "MAX_METADATA_BYTES", "WRITER_MARKER",
           "parse_storage_options", "remote_errors"]
