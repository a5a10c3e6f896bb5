"""Opens a cache read-only and refuses anything it cannot vouch for (incomplete, foreign, newer, inconsistent, damaged).

`open_cache(location, split)` gives one split (`TeacherCache`); `Cache(location)` the whole cache. A location is
a local path or an fsspec URL (`kdcache.cache.store`). Integrity on read: opening a complete split lists the
chunk files of its arrays (a missing chunk would otherwise read silently as the fill value: NaN logits, zero
labels), and `TeacherCache.read` checks every chunk it reads against its CRC32C and against the digest the
split's chunk manifest records for its place; a failure is one line naming the split, array, chunk and file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from kdcache.cache import codecs, schema
from kdcache.cache.schema import RootHeader, SplitHeader
from kdcache.cache.store import CacheStore, as_store, remote_errors
from kdcache.errors import KDCacheError
from kdcache.names import RUN_FORMAT

#: What to do about a damaged chunk: the cache cannot be repaired in place, only written again.
RECREATE_HINT = "recreate the cache with kdcache cache-teacher --overwrite"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _shown(value: Any) -> str:
    """An array attribute in a message: a codec chain by its codecs' names and settings, anything else as it is."""
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return "[" + ", ".join(f"{c.get('name')}{c.get('configuration') or ''}" for c in value) + "]"
    return str(value)


def _damage(exc: BaseException) -> str:
    """Why a chunk could not be read, in words a user can act on."""
    text = _first_line(exc)
    if "checksum" in text.lower():
        return "CRC32C checksum mismatch: the chunk file is damaged or truncated"
    if isinstance(exc, OSError):
        return f"cannot read the chunk file ({exc.strerror or text})"
    return f"the chunk cannot be decoded ({type(exc).__name__}: {text})"


def _what_instead(store: CacheStore) -> str:
    """What a folder given as a cache holds instead, in words that point to the right thing."""
    config = store.path / "config.json" if store.is_local else None
    if config is not None and config.is_file():
        try:
            values = json.loads(config.read_text())
        except (OSError, ValueError):
            values = None
        if isinstance(values, dict) and values.get("format") == RUN_FORMAT:
            return "it is a run folder of kdcache train/distill; a cache is the --out of kdcache cache-teacher"
        if isinstance(values, dict) and {"model_type", "architectures"} & set(values):
            return "it is a Hugging Face model folder; make a cache of it with kdcache cache-teacher --teacher"
    if store.is_local and (store.path / "kdcache-model.json").is_file():  # (kdcache/models MODEL_DIR_FILE)
        return "it is a kdcache model folder; make a cache of it with kdcache cache-teacher --teacher"
    return "no zarr.json; a cache is the --out folder of kdcache cache-teacher"


def read_header(store: CacheStore, *, allow_incomplete: bool = False) -> tuple[RootHeader, dict[str, Any]]:
    """The root header (and the raw attributes) after checking format name, version and completeness."""
    store.check()
    meta = store.read_json("zarr.json")
    if meta is None:
        if not store.exists():
            raise KDCacheError(f"{store}: no such cache")
        raise KDCacheError(f"{store}: not a kdcache cache ({_what_instead(store)})")
    attrs = meta.get("attributes", {}) if isinstance(meta, dict) else {}
    header = RootHeader.from_attrs(attrs, str(store), file=store.display("zarr.json"))
    if not allow_incomplete and header.complete is not True:
        raise KDCacheError(f"{store}: cache is incomplete (its writer did not finish); rerun cache-teacher")
    return header, attrs


def open_root(store: CacheStore) -> zarr.Group:
    """The cache's root group, opened read-only (a reader can never modify a cache); unreadable metadata is one line."""
    try:
        with remote_errors(store.location):
            return zarr.open_group(store=store.zarr_store(read_only=True), mode="r", zarr_format=3)
    except KDCacheError:
        raise
    except Exception as exc:  # noqa: BLE001 - zarr raises many types for damaged metadata
        raise metadata_error(store, exc) from exc


def metadata_error(store: CacheStore, exc: BaseException) -> KDCacheError:
    """A one-line error for damaged Zarr metadata, naming the first zarr.json that does not parse."""
    from zarr.core.metadata.v3 import ArrayV3Metadata

    for key in sorted(k for k in store.list_files() if k.endswith("zarr.json")):
        meta = store.read_json(key)
        if meta is None:
            return KDCacheError(f"{store.display(key)}: unreadable Zarr metadata; {RECREATE_HINT}")
        if isinstance(meta, dict) and meta.get("node_type") == "array":
            try:  # parses as JSON, but Zarr refuses it: a dtype edited to one its fill value does not fit
                ArrayV3Metadata.from_dict(meta)
            except Exception as inner:  # noqa: BLE001 - zarr raises many types for damaged metadata
                return KDCacheError(f"{store.display(key)}: unreadable Zarr metadata ({_first_line(inner)}); "
                                    f"{RECREATE_HINT}")
    return KDCacheError(f"{store}: unreadable Zarr metadata ({_first_line(exc)})")


def _chunk_number(array: zarr.Array, key: str) -> int | None:
    """The chunk number (along N) a file key names, or None when the key is no chunk of `array`; -1 for a chunk
    beyond the single column of chunks a kdcache array has."""
    sep = getattr(array.metadata.chunk_key_encoding, "separator", "/")
    parts = key.split(sep)
    if array.metadata.encode_chunk_key((0,) * array.ndim).startswith("c"):
        if parts[0] != "c":
            return None
        parts = parts[1:]
    if len(parts) != array.ndim or not all(p.isdigit() for p in parts):
        return None
    return -1 if any(int(p) != 0 for p in parts[1:]) else int(parts[0])


def chunk_listing(array: zarr.Array, store: CacheStore, prefix: str) -> tuple[dict[int, str], list[str]]:
    """The chunk files of `array` (stored under `prefix`) in one listing: {chunk number: key} within its shape, and
    the keys of chunk-named files outside it. Costs what the files present cost, never what the shape claims."""
    present: dict[int, str] = {}
    outside: list[str] = []
    nchunks = array.cdata_shape[0] if array.ndim else 1
    for key in store.list_files(prefix):
        rel = key[len(prefix) + 1:]
        number = None if rel == "zarr.json" else _chunk_number(array, rel)
        if number is None:
            continue  # a writer's leftover temporary file, a desktop's .DS_Store: no chunk
        if 0 <= number < nchunks:
            present[number] = key
        else:
            outside.append(key)
    return present, outside


def chunk_file_problems(array: zarr.Array, store: CacheStore, prefix: str, where: str) -> list[str]:
    """Missing chunk files (Zarr would read them as the fill value) and chunk files outside the array's shape (its
    shape was edited by hand), as one-line messages; one listing per array, so opening stays cheap."""
    present, outside = chunk_listing(array, store, prefix)
    nchunks = array.cdata_shape[0] if array.ndim else 1
    problems: list[str] = []
    missing = nchunks - len(present)
    for c in range(nchunks):  # stops after the first few: an absurd shape costs nothing more
        if len(problems) == 3:
            problems.append(f"{where}: {missing - 3} more chunk file(s) missing of {nchunks}")
            break
        if c not in present:
            rows = f"rows {c * array.chunks[0]}:{min((c + 1) * array.chunks[0], array.shape[0])}"
            key = f"{prefix}/{array.metadata.encode_chunk_key((c,) + (0,) * (array.ndim - 1))}"
            problems.append(f"{where}, chunk {c} ({rows}): chunk file missing ({store.display(key)})")
        if len(problems) == missing:
            break
    for key in sorted(outside):
        problems.append(f"{where}: chunk file {store.display(key)} lies outside the array's {array.shape[0]} rows "
                        "(its shape was edited, or files were copied in)")
    return problems


def read_checked(array: zarr.Array, store: CacheStore, prefix: str, where: str, start: int = 0,
                 stop: int | None = None, digests: list[str] | None = None, *, finite: bool = True) -> np.ndarray:
    """Rows start:stop of `array` (stored under `prefix`), every chunk checked against its CRC32C, its file's
    presence and, given the split's chunk manifest (`digests`, one per chunk), the digest of its place.

    A failure is a KDCacheError naming the chunk and its file (found by re-reading chunk by chunk), never Zarr's
    bare codec error, never a silent fill value, never a chunk that belongs elsewhere. With a manifest, whole
    chunks are read (a chunk's digest covers all its rows) and the rows asked for are cut from them. A float array
    holding NaN or Inf (`finite`) is refused too: the writer never stores one, so a student never trains on it.
    """
    n, rows = array.shape[0], array.chunks[0]
    start, stop, _ = slice(start, stop).indices(n)
    chunks = range(start // rows, -(-stop // rows)) if stop > start else range(0)

    def key(c: int) -> str:
        return f"{prefix}/{array.metadata.encode_chunk_key((c,) + (0,) * (array.ndim - 1))}"

    for c in chunks:
        if not store.has_file(key(c)):
            raise KDCacheError(f"{where}, chunk {c} (rows {c * rows}:{min((c + 1) * rows, n)}): chunk file missing "
                               f"({store.display(key(c))}); {RECREATE_HINT}")
    first, last = (chunks.start * rows, min(chunks.stop * rows, n)) if digests is not None and chunks else (start, stop)
    try:
        block = np.asarray(array[first:last])
    except Exception as exc:  # noqa: BLE001 - codec pipelines raise ValueError, RuntimeError, OSError...
        for c in chunks:
            a, b = c * rows, min((c + 1) * rows, n)
            try:
                array[a:b]
            except Exception as inner:  # noqa: BLE001
                raise KDCacheError(f"{where}, chunk {c} (rows {a}:{b}): {_damage(inner)} "
                                   f"(file {store.display(key(c))}); {RECREATE_HINT}") from exc
        raise KDCacheError(f"{where}, rows {start}:{stop}: read failed ({_first_line(exc)})") from exc
    if finite and block.dtype.kind == "f" and not np.isfinite(block).all():  # never written: a teacher's NaN stops the writer
        bad = int(np.flatnonzero(~np.isfinite(block.reshape(len(block), -1)).all(axis=1))[0]) + first
        raise KDCacheError(f"{where}, row {bad}: NaN or infinite values, which kdcache never writes (the cache was "
                           f"edited or damaged; kdcache verify lists the rows); {RECREATE_HINT}")
    if digests is None:
        return block
    for c in chunks:
        a, b = c * rows, min((c + 1) * rows, n)
        if schema.chunk_digest(block[a - first:b - first]) != digests[c]:
            raise KDCacheError(f"{where}, chunk {c} (rows {a}:{b}): the chunk does not belong at this place (its "
                               "content differs from the split's chunk manifest: the chunk file was swapped, "
                               f"duplicated or replaced) (file {store.display(key(c))}); {RECREATE_HINT}")
    return block[start - first:stop - first]


class TeacherCache:
    """One split of a cache, read-only: arrays are Zarr arrays, so slicing reads only the chunks it needs.

    Read through `read(name, start, stop)` for rows that are checked: a damaged, missing or misplaced chunk
    becomes one clear error. Opening a complete split also checks that every chunk file exists (`check_chunks`).
    """

    def __init__(self, location: str | Path | CacheStore, split: str = "train", *, allow_incomplete: bool = False,
                 check_chunks: bool | None = None, storage_options: dict[str, Any] | None = None) -> None:
        self.store = as_store(location, storage_options)
        self.path = self.store.display()  # how messages name the cache
        self.header, self.attrs = read_header(self.store, allow_incomplete=allow_incomplete)
        root = open_root(self.store)
        try:
            self._open_split(root, split, allow_incomplete)
        except KDCacheError:
            raise
        except Exception as exc:  # noqa: BLE001 - a hand-damaged zarr.json of the split or of an array
            raise metadata_error(self.store, exc) from exc
        self._check_shapes()
        #: what is wrong with the split's chunk manifest (empty when it is sound or absent); an unsound one is unused
        self.manifest_problems = self._manifest_problems()
        if check_chunks if check_chunks is not None else not allow_incomplete:
            problems = self.chunk_problems() or self.manifest_problems
            if problems:
                more = f" (and {len(problems) - 1} more chunk file problem(s))" if len(problems) > 1 else ""
                raise KDCacheError(f"{problems[0]}{more}; {RECREATE_HINT}")
        if self.manifest_problems:
            self.chunk_digests = None

    def _open_split(self, root: zarr.Group, split: str, allow_incomplete: bool) -> None:
        with remote_errors(self.store.location):
            splits = sorted(root.group_keys())
            if split not in splits:
                have = ", ".join(splits) or "none"
                raise KDCacheError(f"{self.path}: no split {split!r} in this cache (splits: {have})")
            self.split = split
            self.group = root[split]
            self.split_attrs = dict(self.group.attrs)
            meta = self.store.display(f"{split}/zarr.json")
            self.split_header = SplitHeader.from_attrs(self.split_attrs, meta)
            if not allow_incomplete and self.split_header.complete is not True:
                raise KDCacheError(f"{self.path}: split {split!r} is incomplete; rerun cache-teacher")
            self.split_header.check_binding(self.header, meta)
            #: the stored target (targets.TargetSpec): dense logits for a cache of format version 1
            self.target = self.header.target_spec()
            #: every array of the split: the target's (format v1: `logits`), the per-row columns, then the optional
            #: float arrays (teacher checkpoints' logits, hidden-state projections) named in `extra_arrays`
            self.names: tuple[str, ...] = self.split_header.arrays_for(self.target)
            missing = [name for name in self.names if name not in self.group.array_keys()]
            if missing:
                raise KDCacheError(f"{self.path}/{split}: missing array(s) {', '.join(missing)}")
            self.arrays: dict[str, zarr.Array] = {name: self.group[name] for name in self.names}
        #: the target's first array (dense: `logits`; top-k: `topk_values`; sampled: `sampled_ids`): its rows and
        #: chunks are the split's. Read a sparse target by its arrays' names (`read`), never as logits.
        self.logits: zarr.Array = self.arrays[self.target.arrays[0]]
        if not self.target.outputs:  # a dense cache a script wrote without recording the teacher's width
            self.target = self.header.target_spec(outputs=int(self.logits.shape[1]))
        self.labels: zarr.Array = self.arrays["labels"]
        self.index: zarr.Array = self.arrays["index"]
        self.fingerprint: zarr.Array = self.arrays["fingerprint"]
        self.extra_widths: dict[str, int] = dict(self.split_header.extra_arrays)
        manifest = self.split_header.chunk_digests
        #: per array, the digest of each chunk (None for a split written before kdcache recorded them)
        self.chunk_digests: dict[str, list[str]] | None = manifest.arrays if manifest is not None else None

    def _array(self, name: str) -> zarr.Array:
        if name not in self.arrays:
            raise KDCacheError(f"{self.path}: split {self.split!r} has no array {name!r} "
                               f"(it holds {', '.join(self.names)})")
        return self.arrays[name]

    def where(self, name: str) -> str:
        """How error messages name one array of this split."""
        return f"{self.path}: split {self.split!r}, array {name!r}"

    def chunk_file(self, name: str, chunk: int) -> Path | str:
        """The file (a path; a URL on an object store) of chunk number `chunk` (along N) of array `name`."""
        array = self._array(name)
        key = f"{self.split}/{name}/{array.metadata.encode_chunk_key((chunk,) + (0,) * (array.ndim - 1))}"
        return self.store.path / key if self.store.is_local else self.store.display(key)

    def present_chunks(self, name: str) -> list[int]:
        """The chunk numbers of array `name` whose files exist, in order (one listing)."""
        return sorted(chunk_listing(self._array(name), self.store, f"{self.split}/{name}")[0])

    def chunk_problems(self) -> list[str]:
        """Missing or out-of-shape chunk files of every array, as one-line messages (empty when all is well)."""
        return [p for name in self.names
                for p in chunk_file_problems(self._array(name), self.store, f"{self.split}/{name}", self.where(name))]

    @property
    def chunk_rows(self) -> int:
        return int(self.logits.chunks[0])

    def read(self, name: str, start: int = 0, stop: int | None = None, *, finite: bool = True) -> np.ndarray:
        """Rows start:stop of array `name`, checksum-verified and checked against the split's chunk manifest: damage
        or a chunk out of place is one KDCacheError line naming the chunk file. `finite=False` lets NaN through (to
        `verify`, which counts such rows instead of stopping at the first)."""
        digests = self.chunk_digests.get(name) if self.chunk_digests is not None else None
        with remote_errors(self.store.location):
            return read_checked(self._array(name), self.store, f"{self.split}/{name}", self.where(name), start, stop,
                                digests, finite=finite)

    def _manifest_problems(self) -> list[str]:
        """A chunk manifest must name one digest per chunk of every array (a split refuses one that does not), and
        a split of a cache written with manifests must have one (removing it must not switch the check off)."""
        meta = self.store.display(f"{self.split}/zarr.json")
        if self.chunk_digests is None:
            if self.header.chunk_manifests and self.split_header.complete:
                return [f"{meta}: the split has no chunk manifest, but the cache was written with one (it was "
                        "removed)"]
            return []
        if not isinstance(self.chunk_digests, dict):
            return [f"{meta}: attribute chunk_digests.arrays must map array names to lists of digests"]
        nchunks = -(-len(self) // self.chunk_rows)
        problems = []
        for name in self.names:
            listed = self.chunk_digests.get(name)
            if not isinstance(listed, list) or len(listed) != nchunks:
                count = len(listed) if isinstance(listed, list) else "no"
                problems.append(f"{meta}: the chunk manifest lists {count} digest(s) for array {name!r}, which has "
                                f"{nchunks} chunk(s)")
        return problems

    def _check_shapes(self) -> None:
        n = self.split_header.rows
        dataset_n = self.split_header.dataset.n if self.split_header.dataset is not None else n
        lengths = {name: array.shape[0] for name, array in self.arrays.items()}
        if len(set(lengths.values())) != 1 or n not in lengths.values() or dataset_n != n:
            shown = ", ".join(f"{k}={v}" for k, v in lengths.items())
            raise KDCacheError(f"{self.path}/{self.split}: row counts disagree (attributes say {n}, dataset.n "
                               f"{dataset_n}; arrays: {shown})")
        recorded = self.header.storage.chunk_rows
        for name, array in self.arrays.items():
            chunk_bytes = array.chunks[0] * int(np.prod(array.shape[1:], dtype=np.int64)) * array.dtype.itemsize
            if (recorded is not None and array.chunks[0] != recorded) or chunk_bytes > schema.MAX_CHUNK_BYTES:
                raise KDCacheError(f"{self.store.display(f'{self.split}/{name}/zarr.json')}: chunks of "
                                   f"{array.chunks[0]} rows ({chunk_bytes:,} bytes), but the cache records "
                                   f"{recorded} rows per chunk (and no chunk may exceed "
                                   f"{schema.MAX_CHUNK_BYTES:,} bytes); {RECREATE_HINT}")
        width = self.header.num_outputs
        if width is not None and self.target.kind == "dense" and self.logits.shape[-1] != width:
            raise KDCacheError(f"{self.path}/{self.split}: logits have {self.logits.shape[-1]} columns but the teacher "
                               f"has {width} outputs")
        described = self.header.extra_arrays(width or self.target.outputs)
        if described != self.extra_widths:
            raise KDCacheError(f"{self.store.display(f'{self.split}/zarr.json')}: attribute extra_arrays "
                               f"{self.extra_widths} disagrees with the root's checkpoints and hidden_projections, "
                               f"which describe {described}")
        positions = self.target.positions  # a language-model split's extras are per token: [N, S, width]
        for name, columns in self.extra_widths.items():
            array = self.arrays[name]
            shaped = array.shape[1:] == ((positions, columns) if positions else (columns,))
            if not shaped or array.chunks[0] != self.logits.chunks[0]:
                raise KDCacheError(f"{self.path}/{self.split}: array {name!r} has shape {array.shape} in chunks of "
                                   f"{array.chunks[0]} rows; its attributes say {columns} columns"
                                   f"{f' at each of {positions} positions' if positions else ''} in chunks of "
                                   f"{self.logits.chunks[0]}")
        self._check_array_metadata()

    def _check_array_metadata(self) -> None:
        """Every attribute of every array's zarr.json that decides how its bytes are read (dtype, shape, chunk shape,
        codec chain) must be the one the root and split attributes imply (`schema.split_arrays`): a logits dtype
        edited from float16 to int16 keeps the bytes and the chunk manifest, and would read as wrong numbers."""
        kind = self.header.task.kind
        dtype, codec, source = self._float_storage()
        specs = schema.split_arrays(self.num_outputs, kind, dtype, self.extra_widths, self.target, codec)
        rows = self.split_header.rows
        cache_codec = codec
        for name, array in self.arrays.items():
            spec = specs[name]
            codec = spec.codec_name(cache_codec)
            expected = {
                "dtype": (str(spec.dtype), f"target.dtypes.{name}" if name in self.target.dtypes and name != "logits"
                          else f"{source}logits_dtype {dtype!r}" if spec.is_target else
                          f"task.kind {kind!r}" if name == "labels" else "the format"),
                "shape": (list(spec.shape(rows)), f"rows {rows} of the split" + (
                    f" and {spec.width} columns" if spec.is_target else "")),
                "chunk shape": ([self.chunk_rows, *spec.shape(rows)[1:]], f"storage.chunk_rows {self.chunk_rows}"),
                "codecs": (codecs.pipeline(codec, spec.dtype.itemsize),
                           f"the format's {codec!r}" if spec.codec or not spec.is_target else f"{source}codec {codec!r}"),
            }
            found = {"dtype": str(array.dtype), "shape": list(array.shape), "chunk shape": list(array.chunks),
                     "codecs": [c.to_dict() for c in array.metadata.codecs]}
            for key, (value, why) in expected.items():
                if found[key] != value:
                    raise KDCacheError(f"{self.store.display(f'{self.split}/{name}/zarr.json')}: split {self.split!r}, "
                                       f"array {name!r} has {key} {_shown(found[key])} in its zarr.json, but the cache "
                                       f"records {_shown(value)} ({why}); {RECREATE_HINT}")

    def _float_storage(self) -> tuple[str, str, str]:
        """The dtype and codec of the float arrays, and where they are recorded: the root's `storage`, bound to the
        `write_settings.storage` cache-teacher records; a cache a script wrote through CacheWriter without write
        settings records neither reliably, so its logits array says, if its dtype and codec chain are kdcache's."""
        if isinstance(self.header.write_settings.get("storage"), dict):
            return self.header.storage.logits_dtype, self.header.storage.codec, "storage."
        file, logits = self.store.display(f"{self.split}/logits/zarr.json"), self.logits
        if str(logits.dtype) not in schema.LOGIT_DTYPES:
            raise KDCacheError(f"{file}: split {self.split!r}, array 'logits' has dtype {logits.dtype} in its "
                               f"zarr.json, not one of {', '.join(schema.LOGIT_DTYPES)}; {RECREATE_HINT}")
        chain = [c.to_dict() for c in logits.metadata.codecs]
        for name in codecs.CODECS:
            if codecs.pipeline(name, logits.dtype.itemsize) == chain:
                return str(logits.dtype), name, "the logits' "
        raise KDCacheError(f"{file}: split {self.split!r}, array 'logits' has codecs {_shown(chain)} in its zarr.json, "
                           f"not a kdcache codec chain; {RECREATE_HINT}")

    @property
    def checkpoints(self) -> list[dict[str, Any]]:
        """The teacher checkpoints stored in this cache, in training order (the last is the trained teacher,
        stored as `logits`); each names its array, name, epoch and validation metric. Empty for a one-teacher cache."""
        return [c.to_attrs() for c in self.header.checkpoints]

    def checkpoint_array(self, name: str) -> str:
        """The array holding the logits of checkpoint `name`, or a one-line error naming the ones there are."""
        for entry in self.header.checkpoints:
            if entry.name == name:
                return entry.array
        have = ", ".join(str(e.name) for e in self.header.checkpoints)
        raise KDCacheError(f"{self.path}: no teacher checkpoint {name!r} in this cache "
                           f"({'checkpoints: ' + have if have else 'it stores no checkpoints (cache-teacher --checkpoints)'})")

    @property
    def projections(self) -> dict[str, Any] | None:
        """How the hidden-state projections were made (layers, dim, seed, widths), or None when there are none."""
        hidden = self.header.hidden_projections
        return hidden.to_attrs() if hidden is not None else None

    def __len__(self) -> int:
        return self.logits.shape[0]

    @property
    def num_outputs(self) -> int:
        """The teacher's outputs C (a sparse target stores fewer columns)."""
        return int(self.target.outputs)

    @property
    def label_names(self) -> list[str] | None:
        return self.header.teacher.get("label_names")

    @property
    def task_kind(self) -> str:
        return self.header.task.kind

    @property
    def target_quality(self) -> dict[str, Any] | None:
        """What capture measured of a sparse target on a sample of this split's rows (kept mass, KL), or None."""
        return self.split_attrs.get("target_quality")

    def __repr__(self) -> str:
        return (f"TeacherCache({self.path!r}, split={self.split!r}, rows={len(self)}, outputs={self.num_outputs}, "
                f"target={self.target.kind!r})")


def open_cache(location: str | Path | CacheStore, split: str = "train", *, allow_incomplete: bool = False,
               storage_options: dict[str, Any] | None = None) -> TeacherCache:
    """Open one split of a complete cache (a path or an fsspec URL) for reading; the usual way for scripts to get
    at stored logits."""
    return TeacherCache(location, split, allow_incomplete=allow_incomplete, storage_options=storage_options)


def load_cache_tokenizer(location: str | Path | CacheStore, storage_options: dict[str, Any] | None = None, *,
                         trust_model_code: bool = False) -> Any:
    """The teacher's tokenizer as stored in a text cache, so students read exactly the token ids the teacher saw.

    The blob must be the one recorded (its sha256), and neither it nor the files it unpacks to may exceed
    `MAX_TOKENIZER_BLOB_BYTES` / `MAX_TOKENIZER_FILES_BYTES`: a hostile cache cannot fill the disk or the memory.
    """
    import hashlib
    import tempfile

    store = as_store(location, storage_options)
    root = open_root(store)
    name = schema.TOKENIZER_ARRAY
    if name not in root.array_keys():
        raise KDCacheError(f"{store}: this cache stores no tokenizer (not a text cache?)")
    array, where = root[name], store.display(name)
    if array.ndim != 1 or array.dtype != np.uint8 or array.shape[0] > schema.MAX_TOKENIZER_BLOB_BYTES:
        raise KDCacheError(f"{where}: the stored tokenizer claims {array.shape} {array.dtype}, not at most "
                           f"{schema.MAX_TOKENIZER_BLOB_BYTES // 1024**2} MiB of bytes; the cache is damaged or hostile")
    blob = read_checked(array, store, name, f"{store}: array 'tokenizer'").tobytes()
    recorded = array.attrs.get("sha256")
    if recorded is None and read_header(store, allow_incomplete=True)[0].chunk_manifests:
        raise KDCacheError(f"{where}: the stored tokenizer has no recorded sha256, but the cache was written with "
                           f"one (it was removed); {RECREATE_HINT}")
    if recorded is not None and hashlib.sha256(blob).hexdigest() != recorded:
        raise KDCacheError(f"{where}: the stored tokenizer's sha256 differs from the one recorded beside it (its chunk "
                           f"was replaced); {RECREATE_HINT}")
    from kdcache.models.hf import check_no_custom_code, load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        _unzip_bounded(blob, Path(tmp), where)
        try:  # a data file never runs code unless the user trusts it (--trust-model-code)
            check_no_custom_code(tmp, trust_model_code)
            return load_tokenizer(tmp, trust_model_code=trust_model_code)
        except KDCacheError as exc:
            message = str(exc).replace(tmp, "")
            raise KDCacheError(f"{where}: cannot load the stored tokenizer ({message.lstrip('/: ')})") from exc


def _unzip_bounded(blob: bytes, folder: Path, where: str) -> None:
    """Extract the flat zip of tokenizer files, refusing nested names and anything past the size limit (the sizes
    in the zip's headers first, then the bytes actually produced, which a crafted header cannot hide)."""
    import io
    import zipfile

    limit = schema.MAX_TOKENIZER_FILES_BYTES
    try:
        with zipfile.ZipFile(io.BytesIO(blob)) as archive:
            members = archive.infolist()
            claimed = sum(m.file_size for m in members)
            if claimed > limit:
                biggest = max(members, key=lambda m: m.file_size)
                raise KDCacheError(f"{where}: the stored tokenizer would unpack to {claimed:,} bytes (member "
                                   f"{biggest.filename!r}: {biggest.file_size:,}), beyond the {limit:,}-byte limit; "
                                   "the cache is damaged or hostile")
            written = 0
            for member in members:
                name = member.filename
                if "/" in name or "\\" in name or name in ("", ".", "..") or member.is_dir():
                    raise KDCacheError(f"{where}: the stored tokenizer holds {name!r}, not a plain file name")
                with archive.open(member) as source, open(folder / name, "wb") as target:
                    while chunk := source.read(1 << 20):
                        written += len(chunk)
                        if written > limit:
                            raise KDCacheError(f"{where}: member {name!r} of the stored tokenizer unpacks beyond the "
                                               f"{limit:,}-byte limit; the cache is damaged or hostile")
                        target.write(chunk)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise KDCacheError(f"{where}: the stored tokenizer is not a readable zip ({_first_line(exc)})") from exc


class Cache:
    """A whole cache, read-only: its root header and its splits (each a `TeacherCache`)."""

    def __init__(self, location: str | Path | CacheStore, *, allow_incomplete: bool = False,
                 storage_options: dict[str, Any] | None = None) -> None:
        self.store = as_store(location, storage_options)
        self.header, self.attrs = read_header(self.store, allow_incomplete=allow_incomplete)
        self.root = open_root(self.store)
        self.allow_incomplete = allow_incomplete

    @property
    def splits(self) -> list[str]:
        """The split groups present (complete or not), sorted."""
        try:
            with remote_errors(self.store.location):
                return sorted(self.root.group_keys())
        except KDCacheError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise metadata_error(self.store, exc) from exc

    def split(self, name: str, *, check_chunks: bool | None = None) -> TeacherCache:
        return TeacherCache(self.store, name, allow_incomplete=self.allow_incomplete, check_chunks=check_chunks)

    def tokenizer(self, *, trust_model_code: bool = False) -> Any:
        return load_cache_tokenizer(self.store, trust_model_code=trust_model_code)


__all__ = ["Cache", "RECREATE_HINT", "TeacherCache", "as_store", "chunk_file_problems", "load_cache_tokenizer",
           "metadata_error", "open_cache", "open_root", "read_checked", "read_header"]
