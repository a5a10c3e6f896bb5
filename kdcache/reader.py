"""Opens a cache read-only and refuses anything it cannot vouch for (incomplete, foreign, newer, inconsistent, damaged).

Integrity on read: opening a complete split lists the chunk files of its arrays (a missing chunk would otherwise
read silently as the fill value: NaN logits, zero labels), and `TeacherCache.read` turns a checksum failure or an
unreadable chunk into one line naming the split, array, chunk number and chunk file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
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


#: What to do about a damaged chunk: the cache cannot be repaired in place, only written again.
RECREATE_HINT = "recreate the cache with kdcache cache-teacher --overwrite"


def open_root(path: Path) -> zarr.Group:
    """The cache's root group, opened read-only (a reader can never modify a cache); unreadable metadata is one line."""
    try:
        return zarr.open_group(store=str(path), mode="r")
    except Exception as exc:  # noqa: BLE001 - zarr raises many types for damaged metadata
        raise metadata_error(path, exc) from exc


def metadata_error(path: Path, exc: BaseException) -> KDCacheError:
    """A one-line error for damaged Zarr metadata, naming the first zarr.json that does not parse (if one does not)."""
    for meta in sorted(Path(path).rglob("zarr.json")):
        try:
            json.loads(meta.read_text())
        except (OSError, ValueError) as problem:
            return KDCacheError(f"{meta}: unreadable Zarr metadata ({_first_line(problem)}); {RECREATE_HINT}")
    return KDCacheError(f"{path}: unreadable Zarr metadata ({_first_line(exc)})")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _damage(exc: BaseException) -> str:
    """Why a chunk could not be read, in words a user can act on."""
    text = _first_line(exc)
    if "checksum" in text.lower():
        return "CRC32C checksum mismatch: the chunk file is damaged or truncated"
    if isinstance(exc, OSError):
        return f"cannot read the chunk file ({exc.strerror or text})"
    return f"the chunk cannot be decoded ({type(exc).__name__}: {text})"


def chunk_file(array: zarr.Array, directory: Path, chunk: int) -> Path:
    """The file holding chunk number `chunk` (along the first axis) of `array`, stored in `directory`."""
    return directory / array.metadata.encode_chunk_key((chunk,) + (0,) * (array.ndim - 1))


def _is_chunk_key(array: zarr.Array, key: str) -> bool:
    """Whether `key` is named like a chunk of `array` (e.g. `c/7/0`); other files (a writer's leftover
    temporary file, a desktop's .DS_Store) are no chunk and say nothing about the array's shape."""
    sep = getattr(array.metadata.chunk_key_encoding, "separator", "/")
    parts = key.split(sep)
    if array.metadata.encode_chunk_key((0,) * array.ndim).startswith("c"):
        if parts[0] != "c":
            return False
        parts = parts[1:]
    return len(parts) == array.ndim and all(p.isdigit() for p in parts)


def _chunk_number(array: zarr.Array, key: str) -> int | None:
    """The chunk number (along N) a file key names, or None when the key is no chunk of `array`."""
    if not _is_chunk_key(array, key):
        return None
    sep = getattr(array.metadata.chunk_key_encoding, "separator", "/")
    parts = key.split(sep)
    parts = parts[1:] if parts[0] == "c" else parts
    if any(int(p) != 0 for p in parts[1:]):
        return -1  # a chunk beyond the single column of chunks a kdcache array has
    return int(parts[0])


def chunk_listing(array: zarr.Array, directory: Path) -> tuple[dict[int, str], list[str]]:
    """The chunk files of `array` in one directory listing: {chunk number: key} of those within its shape, and
    the keys of chunk-named files outside it. Costs what the files present cost, never what the shape claims."""
    present: dict[int, str] = {}
    outside: list[str] = []
    nchunks = array.cdata_shape[0] if array.ndim else 1
    for folder, _, files in os.walk(directory):
        rel = Path(folder).relative_to(directory)
        for f in files:
            key = (rel / f).as_posix()
            number = None if f == "zarr.json" else _chunk_number(array, key)
            if number is None:
                continue
            if 0 <= number < nchunks:
                present[number] = key
            else:
                outside.append(key)
    return present, outside


def chunk_file_problems(array: zarr.Array, directory: Path, where: str) -> list[str]:
    """Missing chunk files (Zarr would read them as the fill value) and chunk files outside the array's shape
    (its shape was edited by hand), as one-line messages; one directory listing per array, so opening stays cheap.
    The work and memory follow the files present, never the shape the metadata claims (which may be absurd)."""
    present, outside = chunk_listing(array, directory)
    nchunks = array.cdata_shape[0] if array.ndim else 1
    problems = []
    if len(present) < nchunks:
        missing, shown = nchunks - len(present), 0
        for c in range(nchunks):  # stops after the first few: an absurd shape costs nothing more
            if c in present:
                continue
            rows = f"rows {c * array.chunks[0]}:{min((c + 1) * array.chunks[0], array.shape[0])}"
            problems.append(f"{where}, chunk {c} ({rows}): chunk file missing "
                            f"({directory / array.metadata.encode_chunk_key((c,) + (0,) * (array.ndim - 1))})")
            shown += 1
            if shown == 3 and missing > 3:
                problems.append(f"{where}: {missing - 3} more chunk file(s) missing of {nchunks}")
                break
    for key in sorted(outside):
        problems.append(f"{where}: chunk file {directory / key} lies outside the array's {array.shape[0]} rows "
                        "(its shape was edited, or files were copied in)")
    return problems


def read_checked(array: zarr.Array, directory: Path, where: str, start: int = 0, stop: int | None = None,
                 digests: list[str] | None = None) -> np.ndarray:
    """Rows start:stop of `array`, every chunk checked against its CRC32C, its file's presence and, given the
    split's chunk manifest (`digests`, one per chunk), the digest recorded for its place.

    A failure is a KDCacheError naming the chunk and its file (found by re-reading chunk by chunk), never
    Zarr's bare codec error, never a silent fill value, never a chunk that belongs elsewhere. With a manifest,
    whole chunks are read (a chunk's digest covers all its rows) and the rows asked for are cut from them.
    """
    n, rows = array.shape[0], array.chunks[0]
    start, stop, _ = slice(start, stop).indices(n)
    chunks = range(start // rows, -(-stop // rows)) if stop > start else range(0)
    for c in chunks:
        if not chunk_file(array, directory, c).is_file():
            raise KDCacheError(f"{where}, chunk {c} (rows {c * rows}:{min((c + 1) * rows, n)}): chunk file missing "
                               f"({chunk_file(array, directory, c)}); {RECREATE_HINT}")
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
                                   f"(file {chunk_file(array, directory, c)}); {RECREATE_HINT}") from exc
        raise KDCacheError(f"{where}, rows {start}:{stop}: read failed ({_first_line(exc)})") from exc
    if digests is None:
        return block
    for c in chunks:
        a, b = c * rows, min((c + 1) * rows, n)
        if fmt.chunk_digest(block[a - first:b - first]) != digests[c]:
            raise KDCacheError(f"{where}, chunk {c} (rows {a}:{b}): the chunk does not belong at this place (its "
                               "content differs from the split's chunk manifest: the chunk file was swapped, "
                               f"duplicated or replaced) (file {chunk_file(array, directory, c)}); {RECREATE_HINT}")
    return block[start - first:stop - first]


class TeacherCache:
    """One split of a cache, read-only: arrays are Zarr arrays, so slicing reads only the chunks it needs.

    Read through `read(name, start, stop)` for rows that are checked: a damaged or missing chunk becomes one
    clear error. Opening a complete split also checks that every chunk file exists (`check_chunks`).
    """

    def __init__(self, path: str | Path, split: str = "train", *, allow_incomplete: bool = False,
                 check_chunks: bool | None = None) -> None:
        self.path = Path(path)
        self.attrs = read_cache_attrs(self.path, allow_incomplete=allow_incomplete)
        root = open_root(self.path)
        try:
            splits = sorted(root.group_keys())
            if split not in splits:
                have = ", ".join(splits) or "none"
                raise KDCacheError(f"{self.path}: no split {split!r} in this cache (splits: {have})")
            self.split = split
            self.group = root[split]
            self.split_attrs = dict(self.group.attrs)
            if not allow_incomplete and self.split_attrs.get("complete") is not True:
                raise KDCacheError(f"{self.path}: split {split!r} is incomplete; rerun cache-teacher")
            extras = self.split_attrs.get("extra_arrays") or {}
            if not isinstance(extras, dict) or not all(
                    isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in extras.values()):
                raise KDCacheError(f"{self.path / split / 'zarr.json'}: attribute extra_arrays must map array names to "
                                   f"positive integer widths, got {extras!r}")
            #: every array of the split: the four of format v1, then the optional float arrays (teacher
            #: checkpoints' logits, hidden-state projections) named in the split's `extra_arrays` attribute
            self.names: tuple[str, ...] = (*fmt.ARRAYS, *extras)
            missing = [name for name in self.names if name not in self.group.array_keys()]
            if missing:
                raise KDCacheError(f"{self.path}/{split}: missing array(s) {', '.join(missing)}")
            self.arrays: dict[str, zarr.Array] = {name: self.group[name] for name in self.names}
            self.logits: zarr.Array = self.group["logits"]
            self.labels: zarr.Array = self.group["labels"]
            self.index: zarr.Array = self.group["index"]
            self.fingerprint: zarr.Array = self.group["fingerprint"]
            self.extra_widths: dict[str, int] = {name: int(width) for name, width in extras.items()}
            #: per array, the digest of each chunk (None for a split written before kdcache recorded them)
            self.chunk_digests: dict[str, list[str]] | None = (self.split_attrs.get("chunk_digests") or {}).get("arrays")
        except KDCacheError:
            raise
        except Exception as exc:  # noqa: BLE001 - a hand-damaged zarr.json of the split or of an array
            raise metadata_error(self.path, exc) from exc
        self._check_shapes()
        #: what is wrong with the split's chunk manifest (empty when it is sound or absent); an unsound one is not used
        self.manifest_problems = self._manifest_problems()
        if check_chunks if check_chunks is not None else not allow_incomplete:
            problems = self.chunk_problems() or self.manifest_problems
            if problems:
                more = f" (and {len(problems) - 1} more chunk file problem(s))" if len(problems) > 1 else ""
                raise KDCacheError(f"{problems[0]}{more}; {RECREATE_HINT}")
        if self.manifest_problems:
            self.chunk_digests = None

    def _array(self, name: str) -> zarr.Array:
        if name not in self.arrays:
            raise KDCacheError(f"{self.path}: split {self.split!r} has no array {name!r} "
                               f"(it holds {', '.join(self.names)})")
        return self.arrays[name]

    def where(self, name: str) -> str:
        """How error messages name one array of this split."""
        return f"{self.path}: split {self.split!r}, array {name!r}"

    def chunk_file(self, name: str, chunk: int) -> Path:
        """The file of chunk number `chunk` (along N) of array `name`."""
        return chunk_file(self._array(name), self.path / self.split / name, chunk)

    def present_chunks(self, name: str) -> list[int]:
        """The chunk numbers of array `name` whose files exist, in order (one directory listing)."""
        return sorted(chunk_listing(self._array(name), self.path / self.split / name)[0])

    def chunk_problems(self) -> list[str]:
        """Missing or out-of-shape chunk files of every array, as one-line messages (empty when all is well)."""
        return [p for name in self.names
                for p in chunk_file_problems(self._array(name), self.path / self.split / name, self.where(name))]

    @property
    def chunk_rows(self) -> int:
        return int(self.logits.chunks[0])

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows start:stop of array `name`, checksum-verified and checked against the split's chunk manifest: damage
        or a chunk out of place is one KDCacheError line naming the chunk file."""
        digests = self.chunk_digests.get(name) if self.chunk_digests is not None else None
        return read_checked(self._array(name), self.path / self.split / name, self.where(name), start, stop, digests)

    def _manifest_problems(self) -> list[str]:
        """A chunk manifest must name one digest per chunk of every array (a split refuses one that does not)."""
        if self.chunk_digests is None:
            return []
        meta = self.path / self.split / "zarr.json"
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
        n = self.split_attrs.get("rows")
        dataset_n = (self.split_attrs.get("dataset") or {}).get("n", n)
        lengths = {name: array.shape[0] for name, array in self.arrays.items()}
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
        described = self.described_extras()
        if described != self.extra_widths:
            raise KDCacheError(f"{self.path / self.split / 'zarr.json'}: attribute extra_arrays {self.extra_widths} "
                               f"disagrees with the root's checkpoints and hidden_projections, which describe "
                               f"{described}")
        for name, columns in self.extra_widths.items():
            array = self.arrays[name]
            if array.ndim != 2 or array.shape[1] != columns or array.chunks[0] != self.logits.chunks[0]:
                raise KDCacheError(f"{self.path}/{self.split}: array {name!r} has shape {array.shape} in chunks of "
                                   f"{array.chunks[0]} rows; its attributes say {columns} columns in chunks of "
                                   f"{self.logits.chunks[0]}")

    def described_extras(self) -> dict[str, int]:
        """The optional arrays (name -> width) that the root attributes say every split holds."""
        width = self.attrs.get("teacher", {}).get("num_outputs") or self.logits.shape[1]
        out = {str(c.get("array")): int(width) for c in self.checkpoints if c.get("array") != "logits"}
        hidden = self.projections or {}
        out.update({str(name): int(hidden.get("dim") or 0) for name in (hidden.get("arrays") or {}).values()})
        return out

    @property
    def checkpoints(self) -> list[dict[str, Any]]:
        """The teacher checkpoints stored in this cache, in training order (the last is the trained teacher,
        stored as `logits`); each names its array, name, epoch and validation metric. Empty for a one-teacher cache."""
        return list(self.attrs.get("checkpoints") or [])

    def checkpoint_array(self, name: str) -> str:
        """The array holding the logits of checkpoint `name`, or a one-line error naming the ones there are."""
        for entry in self.checkpoints:
            if entry.get("name") == name:
                return str(entry["array"])
        have = ", ".join(str(e.get("name")) for e in self.checkpoints)
        raise KDCacheError(f"{self.path}: no teacher checkpoint {name!r} in this cache "
                           f"({'checkpoints: ' + have if have else 'it stores no checkpoints (cache-teacher --checkpoints)'})")

    @property
    def projections(self) -> dict[str, Any] | None:
        """How the hidden-state projections were made (layers, dim, seed, widths), or None when there are none."""
        return self.attrs.get("hidden_projections")

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
    """The teacher's tokenizer as stored in a text cache, so students read exactly the token ids the teacher saw.

    The blob must be the one recorded (its sha256), and neither it nor the files it unpacks to may exceed
    `MAX_TOKENIZER_BLOB_BYTES` / `MAX_TOKENIZER_FILES_BYTES`: a hostile cache cannot fill the disk or the memory.
    """
    import hashlib
    import tempfile

    path = Path(path)
    root = open_root(path)
    if "tokenizer" not in root.array_keys():
        raise KDCacheError(f"{path}: this cache stores no tokenizer (not a text cache?)")
    array, where = root["tokenizer"], f"{path / 'tokenizer'}"
    if array.ndim != 1 or array.dtype != np.uint8 or array.shape[0] > fmt.MAX_TOKENIZER_BLOB_BYTES:
        raise KDCacheError(f"{where}: the stored tokenizer claims {array.shape} {array.dtype}, not at most "
                           f"{fmt.MAX_TOKENIZER_BLOB_BYTES // 1024**2} MiB of bytes; the cache is damaged or hostile")
    blob = read_checked(array, path / "tokenizer", f"{path}: array 'tokenizer'").tobytes()
    recorded = array.attrs.get("sha256")
    if recorded is not None and hashlib.sha256(blob).hexdigest() != recorded:
        raise KDCacheError(f"{where}: the stored tokenizer's sha256 differs from the one recorded beside it (its chunk "
                           f"was replaced); {RECREATE_HINT}")
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        _unzip_bounded(blob, Path(tmp), where)
        try:
            return AutoTokenizer.from_pretrained(tmp, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - transformers raises many types
            raise KDCacheError(f"{path}/tokenizer: cannot load the stored tokenizer ({exc})".splitlines()[0]) from exc


def _unzip_bounded(blob: bytes, folder: Path, where: str) -> None:
    """Extract the flat zip of tokenizer files, refusing nested names and anything past the size limit (the
    sizes in the zip's headers first, then the bytes actually produced, which a crafted header cannot hide)."""
    import io
    import zipfile

    limit = fmt.MAX_TOKENIZER_FILES_BYTES
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
