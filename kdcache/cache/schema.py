"""The cache format in code, version 2: the root and split headers, the arrays of a split, the chunk manifest.

A cache is a Zarr v3 group. Its root attributes (`RootHeader`) describe the teacher, the task, the stored target
(`target`: a `kdcache.cache.targets.TargetSpec`), the storage and the software; one subgroup per split
(`SplitHeader`) holds the arrays of `split_arrays`: the target's arrays (dense: `logits` [N, C]; top-k and
sampled: see targets.py), `labels` [N], `index` [N], `fingerprint` [N] and optional float arrays of the same rows
(teacher checkpoints, hidden-state projections). Every chunk ends in a CRC32C; every complete split records a
digest per chunk (`ChunkManifest`); `complete: true` is written last. The specification in words is
docs/cache-format.md; the writer writes these headers and the reader reads them, so the two cannot drift apart.

A dense cache is written as format version 1 (no `target` attribute is needed to read it, so every kdcache reads
it); a sparse target makes it version 2, which a version-1 reader refuses by its version check. Headers are read
leniently (keys a newer writer added are kept in `extra`, keys an older writer lacked take their defaults), so a
reader built from this module opens every v1 cache, as dense.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kdcache.errors import KDCacheError
from kdcache.names import task_modality

FORMAT_NAME = "kdcache.teacher-cache"
FORMAT_VERSION = 2  # the newest version this kdcache reads and writes (a dense cache is still written as 1)
#: The version a dense cache is written as: unchanged from version 1, so older readers open it.
DENSE_FORMAT_VERSION = 1

BASE_ARRAYS = ("logits", "labels", "index", "fingerprint")  # a dense split's (format version 1's) four arrays
ROW_ARRAYS = ("labels", "index", "fingerprint")  # the per-row columns every split holds after its target
#: The per-row columns of a token-level (language-model) split, after ROW_ARRAYS: the window's token ids [N, S]
#: (0 past its length) and its length [N].
TOKEN_ARRAYS = ("input_ids", "lengths")
#: Every array name a target kind stores (targets.TargetSpec.dtypes): never an optional (extra) array's name.
TARGET_ARRAYS = ("logits", "topk_values", "topk_indices", "logsumexp", "sampled_ids", "sampled_counts",
                 "sampled_logprobs")
#: A views cache (`cache-teacher --views V`) stores each target array once more per augmented view, named with this
#: prefix ([N, V, ...]: `view_logits`, `view_topk_values`, ...), and each view's parameters in VIEW_PARAMS [N, V, P].
VIEW_PREFIX = "view_"
VIEW_PARAMS = "view_params"
LOGIT_DTYPES = ("float16", "float32")
LABEL_DTYPE = {"classification": "int64", "regression": "float32", "lm": "int64"}
INDEX_DTYPE = "int64"
FINGERPRINT_DTYPE = "uint64"
#: Float rows (logits, checkpoints' logits, projections) are filled with NaN where no chunk was written, so a
#: missing chunk can never read as plausible zeros.
FLOAT_FILL = float("nan")

#: Aim for about this much raw logit data per chunk: large enough to compress well and read fast (one request
#: per chunk on an object store), small enough that a crash loses little and a resume recomputes little.
TARGET_CHUNK_BYTES = 512 * 1024
MIN_CHUNK_ROWS = 1024
MAX_CHUNK_ROWS = 65536
#: No chunk of any array may decode to more than this: a shape edited to absurd sizes is refused at open.
MAX_CHUNK_BYTES = 1024**3

#: The digest of each chunk recorded in a complete split (`chunk_digests`), binding a chunk's content to its
#: array and place: a CRC32C only proves a chunk's bytes are intact, not that they belong there.
CHUNK_DIGEST_ALGORITHM = "sha256 of the chunk's rows (stored dtype, little-endian, C order), first 16 bytes, hex"
#: A text cache stores its tokenizer (a zip of save_pretrained files); larger blobs or contents are refused.
MAX_TOKENIZER_BLOB_BYTES = 64 * 1024**2
MAX_TOKENIZER_FILES_BYTES = 256 * 1024**2
TOKENIZER_ARRAY = "tokenizer"
#: What each root attribute holds and which arrays a split has, in words: docs/cache-format.md.
#: A capture by several processes (torchrun) records each finished chunk here, one small JSON file per chunk
#: (`<folder>/<split>/<chunk>.json`: its rows and the digest of each array's chunk); the folder is removed before
#: the cache is marked complete, so a complete cache never holds it.
PROGRESS_FOLDER = ".kdcache-progress"


# Zarr lists the folder among a group's members and warns that it is none; it is kdcache's, and expected there.
warnings.filterwarnings("ignore", message=rf"Object at {re.escape(PROGRESS_FOLDER)} is not recognized",
                        category=UserWarning)


def progress_key(split: str, chunk: int) -> str:
    """Where the record of one finished chunk of a split lies, relative to the cache."""
    return f"{PROGRESS_FOLDER}/{split}/{chunk}.json"


def default_chunk_rows(num_outputs: int, itemsize: int, min_rows: int = MIN_CHUNK_ROWS) -> int:
    """Power-of-two rows per chunk giving about TARGET_CHUNK_BYTES of raw logits (at least `min_rows`: a token-level
    row of S positions is already large, and takes 1)."""
    rows = max(1, TARGET_CHUNK_BYTES // max(1, num_outputs * itemsize))
    rows = 1 << (rows.bit_length() - 1)
    return int(min(MAX_CHUNK_ROWS, max(min_rows, rows)))


def logits_dtype(name: str) -> np.dtype:
    if name not in LOGIT_DTYPES:
        raise ValueError(f"unknown logits dtype {name!r}; choose float16 or float32")
    return np.dtype(name)


def chunk_digest(rows: np.ndarray) -> str:
    """The digest of one chunk's rows as they are stored, which the manifest records for its place."""
    little = np.ascontiguousarray(rows, dtype=rows.dtype.newbyteorder("<"))
    return hashlib.sha256(little.tobytes()).hexdigest()[:32]


def chain_digest(previous: str, digests: list[str]) -> str:
    """The running digest of an incomplete split (`chunk_chain`), extended by one block of chunks (one digest per
    array, in storage order): a resumed write proves the chunks already stored are the ones it stored."""
    return hashlib.sha256((previous + "".join(digests)).encode()).hexdigest()


# --- arrays -------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ArraySpec:
    """One array of a split: a teacher output ([N, width] or [N]: logits, a sparse target's arrays, a checkpoint's
    logits, a projection) or a per-row column ([N]: labels, index, fingerprint)."""

    name: str
    dtype: np.dtype
    width: int | None = None  # None: one value per row
    fill: float | None = None
    target: bool = False  # a teacher output: floats are refused when not finite, and stored in the cache's codec
    codec: str | None = None  # the codec the format fixes for this array (None: the cache's codec for a teacher
    #                           output, the format's default for a per-row column)
    positions: int | None = None  # a token-level array: S positions per row, before the width ([N, S, width])
    views: int | None = None  # a views cache's per-view array: V views per row, before the width ([N, V, width])

    @property
    def is_target(self) -> bool:
        return self.target

    def codec_name(self, cache_codec: str) -> str:
        """The codec this array is stored with in a cache whose --codec is `cache_codec`."""
        from kdcache.cache.codecs import DEFAULT_CODEC

        return self.codec or (cache_codec if self.target else DEFAULT_CODEC)

    def shape(self, rows: int) -> tuple[int, ...]:
        return (rows, *((self.views,) if self.views else ()), *((self.positions,) if self.positions else ()),
                *((self.width,) if self.width else ()))


def split_arrays(num_outputs: int, kind: str, dtype: str, extras: dict[str, int], target: Any = None,
                 codec: str | None = None) -> dict[str, ArraySpec]:
    """Every array of a split in storage order: the target's arrays (`target`, a targets.TargetSpec; None: dense
    `logits`), the three per-row columns, then the optional float arrays (checkpoints' logits, projections: [N, S,
    width] in a language-model split). `codec`: the cache's codec."""
    floats = logits_dtype(dtype)
    positions = getattr(target, "positions", None)
    if target is None or (target.kind == "dense" and not positions):
        specs = {"logits": ArraySpec("logits", floats, num_outputs, FLOAT_FILL, target=True)}
    else:
        specs = target.array_specs(codec)
    specs.update({
        "labels": ArraySpec("labels", np.dtype(LABEL_DTYPE[kind])),
        "index": ArraySpec("index", np.dtype(INDEX_DTYPE)),
        "fingerprint": ArraySpec("fingerprint", np.dtype(FINGERPRINT_DTYPE)),
    })
    if positions:  # a language-model split: the windows themselves, so a student never re-tokenises
        from kdcache.cache.targets import index_dtype

        specs["input_ids"] = ArraySpec("input_ids", index_dtype(target.outputs), positions=positions)
        specs["lengths"] = ArraySpec("lengths", np.dtype("int32"))
    if getattr(target, "views", None):  # a views cache: the target again per view, and each view's parameters
        specs.update(target.view_specs(codec))
    # a language-model split's checkpoint logits and projections are per token too: [N, S, width]
    specs.update({name: ArraySpec(name, floats, int(width), FLOAT_FILL, target=True, positions=positions)
                  for name, width in extras.items()})
    return specs


# --- attribute types ----------------------------------------------------------------------------------------------

def _fits(value: Any, kind: Any) -> bool:
    """Whether a value read from JSON has the type a header field is annotated with (ints are not bools, floats may
    be ints, a nested header is an object)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if kind is type(None):
        return value is None
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is str:
        return isinstance(value, str)
    if origin is list or kind is list:
        return isinstance(value, list) and all(_fits(v, args[0]) for v in value) if args else isinstance(value, list)
    if origin is dict or kind is dict:
        return isinstance(value, dict) and (not args or all(_fits(k, args[0]) and _fits(v, args[1])
                                                            for k, v in value.items()))
    if isinstance(kind, type) and issubclass(kind, _Header):
        return isinstance(value, (dict, kind))
    return isinstance(value, kind)


def _type_name(kind: Any) -> str:
    """A field's type in words, for the one-line error."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is list or kind is list:
        plural = {str: "strings", int: "integers", float: "numbers"}
        return f"a list of {plural[args[0]]}" if args and args[0] in plural else "a list"
    if origin is dict or kind is dict or (isinstance(kind, type) and issubclass(kind, _Header)):
        return "an object"
    return {type(None): "null", bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        kind, getattr(kind, "__name__", str(kind)))


def check_type(value: Any, kind: Any, where: str, attribute: str) -> None:
    """One attribute of a zarr.json against its type: a hand-edited `teacher: []` or `limit: "10"` is one line naming
    the file and the attribute, never an internal error later on."""
    if not _fits(value, kind):
        raise KDCacheError(f"{where}: attribute {attribute} must be {_type_name(kind)}, got {value!r}; the attributes "
                           "were edited")


#: The keys of a split's `dataset.preprocess` that readers act on (kdcache.data.recorded_options) and their types;
#: the others describe the data in words and decide nothing.
PREPROCESS_TYPES: dict[str, Any] = {
    "limit": int | None, "subset": int | None, "holdout": int | None, "holdout_test": int | None,
    "max_length": int | None,
    "image_size": int | None, "normalize": str | None, "text_column": str | None, "text_pair_column": str | None,
    "label_column": str | None, "split_used": str | None, "seq_len": int | None,
}
#: The keys of the root `teacher` that readers act on, and their types.
TEACHER_TYPES: dict[str, Any] = {"num_outputs": int | None, "label_names": list[str] | None}
MODALITIES = ("text", "image", "features")
#: Records of a split's preprocessing that describe the source file rather than the rows written (a text file's row
#: count is unknown when --limit stops reading early): a resumed write may record another value (writer._INFORMATIONAL).
INFORMATIONAL_PREPROCESS = ("rows_in_file",)


# --- headers ------------------------------------------------------------------------------------------------------

class _Header:
    """Shared by the headers: to and from the plain dicts Zarr stores, keeping keys this version does not know."""

    def to_attrs(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if f.name == "extra":
                continue
            if isinstance(value, _Header):
                value = value.to_attrs()
            elif isinstance(value, list) and value and isinstance(value[0], _Header):
                value = [v.to_attrs() for v in value]
            if value is None and f.metadata.get("optional"):
                continue
            out[f.name] = value
        return {**getattr(self, "extra", {}), **out}

    @classmethod
    def from_attrs(cls, attrs: Any, where: str, *, file: str | None = None, prefix: str = "") -> Any:
        """The header from a zarr.json's attributes, each known key checked against its type (`file` names the
        zarr.json in that error, `prefix` the enclosing attribute, e.g. `task.`)."""
        if not isinstance(attrs, dict):
            raise KDCacheError(f"{where}: expected an object of attributes, got {type(attrs).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        known = {k: v for k, v in attrs.items() if k in names and k != "extra"}
        hints = typing.get_type_hints(cls)
        for key, value in known.items():
            check_type(value, hints[key], file or where, f"{prefix}{key}")
        try:
            header = cls(**known)
        except TypeError as exc:
            raise KDCacheError(f"{where}: attributes lack a required key ({exc})") from None
        if "extra" in names:
            header.extra = {k: v for k, v in attrs.items() if k not in names}  # type: ignore[attr-defined]
        return header


def _optional() -> Any:
    return field(default=None, metadata={"optional": True})


@dataclass
class TaskInfo(_Header):
    name: str | None = None
    kind: str = "classification"
    modality: str | None = None
    label_names: list[str] | None = None


@dataclass
class StorageInfo(_Header):
    logits_dtype: str = "float16"
    codec: str = "blosc-zstd3-shuffle"
    checksum: str = "crc32c"
    chunk_rows: int | None = None


@dataclass
class CheckpointEntry(_Header):
    """One stored teacher checkpoint (Pro-KD); the last one is the trained teacher, stored as `logits`."""

    name: str
    array: str
    epoch: int | None = None
    metric: float | None = None
    spec: str | None = None
    sha256: str | None = None


@dataclass
class Projections(_Header):
    """How the hidden-state projections were made (curriculum extraction)."""

    layers: list
    dim: int
    seed: int
    arrays: dict[str, str]
    widths: dict[str, int] = field(default_factory=dict)
    matrix: str | None = None
    pooling: str | None = None
    teacher: str | None = None


#: Where each position's target points, recorded in a language-model cache (`TokenInfo.alignment`).
ALIGNMENT_RULE = ("position j of a window holds the teacher's distribution over the token at stream position "
                  "window_start + j + 1: the next token, input_ids[j + 1] for j < length - 1; the last position "
                  "(j = length - 1) predicts the first token of the next window, stored as that row's `labels` "
                  "(-1 after the stream's last token)")
#: How a language-model split is cut into rows (`TokenInfo.windows`).
WINDOW_RULE = ("each split is one token stream: every document (a non-empty line of .txt, the text column of a JSONL "
               "or Parquet row) tokenised without special tokens and followed by the tokenizer's EOS, in file order; "
               "row n is stream[n * S:(n + 1) * S], the last row shorter (its length in `lengths`); positions past a "
               "row's length hold 0 in `input_ids` and in every target array; the teacher sees each window alone "
               "(no context from the previous window)")


@dataclass
class TokenInfo(_Header):
    """A language-model cache's token axis: what a student must agree with to read `input_ids` and the targets."""

    seq_len: int  # S, positions per row
    outputs: int  # the model's output width C (the head; may exceed the tokenizer's vocabulary)
    vocab_size: int  # the tokenizer's true vocabulary, len(tokenizer): ids 0..vocab_size-1
    eos_id: int
    tokenizer_sha256: str  # sha256 of the stored tokenizer zip (array `tokenizer`)
    tokenizer_class: str | None = None
    alignment: str = ALIGNMENT_RULE
    windows: str = WINDOW_RULE


#: How each view's parameters are drawn (`ViewInfo.seed_rule`): numbers stored per view, so a replay reads them and
#: never redraws.
VIEW_SEED_RULE = ("torch.Generator().manual_seed(kdcache.data.augment.view_seed(seed, row)), row = the row's position "
                  "in its split; kdcache.data.augment.draw_params(augment, V, H, W, generator) on the CPU")


@dataclass
class ViewInfo(_Header):
    """A views cache's view axis: which augmentation made the V views of each row, at which version, what the P
    numbers of `view_params` are, and how they were drawn (the plain image's target stays the split's target)."""

    augment: str
    version: int
    count: int  # V, views per row
    params: list[str]  # the layout of the P numbers of one view (kdcache.data.augment.LAYOUTS)
    seed: int
    seed_rule: str = VIEW_SEED_RULE
    applied: str = ("kdcache.data.augment.apply_params(uint8 NCHW images as decoded, augment, params) then the "
                    "split's normalisation; the teacher's input for view v of row r")


@dataclass
class RootHeader(_Header):
    """The root attributes: what wrote the cache, of what, how; `complete` is the writer's last word."""

    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    complete: bool = False
    teacher: dict[str, Any] = field(default_factory=dict)
    task: TaskInfo = field(default_factory=TaskInfo)
    storage: StorageInfo = field(default_factory=StorageInfo)
    inference: dict[str, Any] = field(default_factory=dict)
    fingerprint_algorithm: str | None = None
    digest_algorithm: str | None = None
    software: dict[str, Any] = field(default_factory=dict)
    command: str | None = None
    created: str | None = None
    write_settings: dict[str, Any] = field(default_factory=dict)
    splits: list[str] = field(default_factory=list)
    #: written by a kdcache that records chunk manifests and the tokenizer's sha256: a split or a tokenizer without
    #: them is then refused (someone removed them), while caches written before stay readable
    chunk_manifests: bool | None = _optional()
    checkpoints: list[CheckpointEntry] = field(default_factory=list, metadata={"optional": True})
    hidden_projections: Projections | None = _optional()
    #: a language-model cache's token axis: alignment rule, tokenizer, vocabulary (`TokenInfo`); absent otherwise
    tokens: TokenInfo | None = _optional()
    #: a views cache's view axis (`ViewInfo`): augmentation, version, parameter layout, seed; absent otherwise
    views: ViewInfo | None = _optional()
    #: the stored target (a targets.TargetSpec); absent in a version-1 cache, which holds dense logits
    target: Any = _optional()
    completed: str | None = _optional()
    throughput: dict[str, Any] | None = _optional()
    resumed: str | None = _optional()
    extra: dict[str, Any] = field(default_factory=dict)

    def to_attrs(self) -> dict[str, Any]:
        out = super().to_attrs()
        if not self.checkpoints:
            out.pop("checkpoints", None)
        return out

    @classmethod
    def from_attrs(cls, attrs: Any, where: str, *, file: str | None = None, prefix: str = "") -> "RootHeader":
        """Check the format name and version first (a newer cache is refused), then read the rest leniently: keys
        this version does not know are kept, the known ones must have their types (errors name `file`, the root's
        zarr.json) and agree with each other (`check_binding`)."""
        if not isinstance(attrs, dict) or attrs.get("format") != FORMAT_NAME:
            found = attrs.get("format") if isinstance(attrs, dict) else None
            raise KDCacheError(f"{where}: not a kdcache cache (format attribute is {found!r})")
        version = attrs.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise KDCacheError(f"{where}: format_version attribute is missing or not an integer")
        if version > FORMAT_VERSION:
            raise KDCacheError(f"{where}: cache format version {version} is newer than this kdcache reads "
                               f"({FORMAT_VERSION}); upgrade kdcache")
        file = file or where
        header = super().from_attrs(attrs, where, file=file)
        header.task = TaskInfo.from_attrs(attrs.get("task") or {}, f"{where}: task", file=file, prefix="task.")
        header.storage = StorageInfo.from_attrs(attrs.get("storage") or {}, f"{where}: storage", file=file,
                                                prefix="storage.")
        header.checkpoints = [CheckpointEntry.from_attrs(c, f"{where}: checkpoints", file=file, prefix="checkpoints[].")
                              for c in attrs.get("checkpoints") or []]
        hidden = attrs.get("hidden_projections")
        header.hidden_projections = Projections.from_attrs(hidden, f"{where}: hidden_projections", file=file,
                                                           prefix="hidden_projections.") if hidden else None
        if attrs.get("tokens") is not None:
            header.tokens = TokenInfo.from_attrs(attrs["tokens"], f"{where}: tokens", file=file, prefix="tokens.")
        if attrs.get("views") is not None:
            header.views = ViewInfo.from_attrs(attrs["views"], f"{where}: views", file=file, prefix="views.")
        if attrs.get("target") is not None:
            from kdcache.cache.targets import TargetSpec

            header.target = TargetSpec.from_attrs(attrs["target"], f"{where}: target", file=file)
        for key, kind in TEACHER_TYPES.items():
            check_type(header.teacher.get(key), kind, file, f"teacher.{key}")
        header.check_binding(file)
        return header

    def check_binding(self, file: str) -> None:
        """The root attributes that decide how the cache is read must agree with each other: the task's kind names a
        labels dtype, its modality is the task's own (it picks the distillation preset), the storage is a known dtype
        and codec, and task and storage are those recorded in `write_settings` when the writing began."""
        task, storage, settings = self.task, self.storage, self.write_settings
        if task.kind not in LABEL_DTYPE:
            raise KDCacheError(f"{file}: attribute task.kind is {task.kind!r}, not one of {', '.join(LABEL_DTYPE)}; "
                               "the attributes were edited")
        implied = task_modality(task.name)
        if task.modality is not None and task.modality not in MODALITIES or (
                implied is not None and task.modality not in (None, implied)):
            expected = f"task {task.name!r} is read as {implied!r}" if implied else f"one of {', '.join(MODALITIES)}"
            raise KDCacheError(f"{file}: attribute task.modality is {task.modality!r}, but {expected}; the attributes "
                               "were edited")
        if storage.logits_dtype not in LOGIT_DTYPES:
            raise KDCacheError(f"{file}: attribute storage.logits_dtype is {storage.logits_dtype!r}, not one of "
                               f"{', '.join(LOGIT_DTYPES)}; the attributes were edited")
        from kdcache.cache.codecs import CODECS

        if storage.codec not in CODECS:
            raise KDCacheError(f"{file}: attribute storage.codec is {storage.codec!r}, not a kdcache codec; the "
                               "attributes were edited")
        target = self.target
        if target is not None:
            if self.num_outputs is not None and target.outputs != self.num_outputs:
                raise KDCacheError(f"{file}: attribute target.outputs is {target.outputs}, but teacher.num_outputs is "
                                   f"{self.num_outputs}; the attributes were edited")
            if self.format_version < target.format_version:
                raise KDCacheError(f"{file}: a {target.kind} target needs format_version {target.format_version}, but "
                                   f"the cache says {self.format_version}; the attributes were edited")
            values = target.dtypes.get("logits", target.dtypes.get("topk_values"))
            if values is not None and values != storage.logits_dtype:
                raise KDCacheError(f"{file}: attribute target.dtypes stores values as {values!r}, but "
                                   f"storage.logits_dtype is {storage.logits_dtype!r}; the attributes were edited")
            if target.kind != "dense" and task.kind not in ("classification", "lm"):
                raise KDCacheError(f"{file}: a {target.kind} target on a {task.kind} task; the attributes were edited")
            if bool(target.positions) != (task.kind == "lm") or (task.kind == "lm") != (self.tokens is not None):
                raise KDCacheError(f"{file}: task.kind {task.kind!r}, target.axes {target.axes} and the tokens "
                                   "attribute disagree (a language-model cache has all three); the attributes were "
                                   "edited")
            if self.tokens is not None and (self.tokens.outputs != target.outputs
                                            or self.tokens.seq_len != target.positions):
                raise KDCacheError(f"{file}: attribute tokens (outputs {self.tokens.outputs}, seq_len "
                                   f"{self.tokens.seq_len}) disagrees with target (outputs {target.outputs}, positions "
                                   f"{target.positions}); the attributes were edited")
        views = getattr(target, "views", None) if target is not None else None
        if (views or None) != (self.views.count if self.views is not None else None):
            raise KDCacheError(f"{file}: attribute target.views ({views}) and the views attribute "
                               f"({self.views.count if self.views is not None else None} views) disagree; the "
                               "attributes were edited")
        if self.views is not None and target is not None and len(self.views.params) != target.view_params:
            raise KDCacheError(f"{file}: attribute views.params names {len(self.views.params)} numbers, but "
                               f"target.view_params is {target.view_params}; the attributes were edited")
        if self.views is not None and task.modality not in (None, "image"):
            raise KDCacheError(f"{file}: a views attribute on a {task.modality} task; the attributes were edited")
        recorded_target = settings.get("target")
        if recorded_target is not None and (target is None or recorded_target != target.to_attrs()):
            raise KDCacheError(f"{file}: attribute target differs from write_settings.target, recorded when the "
                               "writing began; the attributes were edited")
        if storage.chunk_rows is not None and storage.chunk_rows < 1:
            raise KDCacheError(f"{file}: attribute storage.chunk_rows is {storage.chunk_rows}, not a positive integer")
        if "task" in settings and settings["task"] != task.name:
            raise KDCacheError(f"{file}: attribute task.name is {task.name!r}, but write_settings.task records "
                               f"{settings['task']!r}; the attributes were edited")
        recorded = settings.get("storage")
        if isinstance(recorded, dict):
            for key in ("logits_dtype", "codec", "chunk_rows"):
                if key in recorded and recorded[key] != getattr(storage, key):
                    raise KDCacheError(f"{file}: attribute storage.{key} is {getattr(storage, key)!r}, but "
                                       f"write_settings.storage.{key} records {recorded[key]!r}; the attributes were "
                                       "edited")

    @property
    def num_outputs(self) -> int | None:
        return self.teacher.get("num_outputs")

    def target_spec(self, outputs: int | None = None) -> Any:
        """The stored target (targets.TargetSpec): the recorded one, or dense logits for a cache without the attribute
        (format version 1); `outputs` is the logits' width when the header does not record the teacher's."""
        from kdcache.cache.targets import TargetSpec

        if self.target is not None:
            return self.target
        return TargetSpec.dense(int(self.num_outputs or outputs or 0), self.storage.logits_dtype)

    def extra_arrays(self, width: int) -> dict[str, int]:
        """The optional arrays (name -> width) that every split of this cache holds, as the header describes them."""
        out = {c.array: int(width) for c in self.checkpoints if c.array != "logits"}
        if self.hidden_projections is not None:
            out.update({str(a): int(self.hidden_projections.dim) for a in self.hidden_projections.arrays.values()})
        return out


@dataclass
class DatasetInfo(_Header):
    """Which data a split was computed from, and how it was read (so a reader re-reads the very same rows)."""

    task: str | None = None
    source: str | None = None
    split: str | None = None
    n: int | None = None
    modality: str | None = None
    label_names: list[str] | None = None
    preprocess: dict[str, Any] = field(default_factory=dict)
    digest: str | None = None


@dataclass
class ChunkManifest(_Header):
    """Per array, the digest of each chunk in chunk order (CHUNK_DIGEST_ALGORITHM)."""

    arrays: dict[str, list[str]]
    algorithm: str = CHUNK_DIGEST_ALGORITHM


@dataclass
class SplitHeader(_Header):
    """A split's attributes, written whole when the split closes (`complete` with them); while it is written, each
    finished chunk has its own record instead (`progress_key`). `rows_done` and `chunk_chain` of an unfinished split
    are what releases before the chunk records left: a resume checks and records those chunks."""

    split: str
    rows: int
    complete: bool = False
    rows_done: int = 0
    chunk_chain: str = ""  # chain_digest over the split's chunks, in chunk order
    extra_arrays: dict[str, int] = field(default_factory=dict)
    dataset: DatasetInfo | None = _optional()
    chunk_digests: ChunkManifest | None = _optional()
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_attrs(cls, attrs: Any, where: str, *, file: str | None = None, prefix: str = "") -> "SplitHeader":
        """`where` names the split's zarr.json. A chunk manifest that is no object is kept for the reader to report
        (`TeacherCache.manifest_problems`)."""
        file = file or where
        if isinstance(attrs, dict):  # a manifest or extra_arrays of the wrong type are reported below, in their words
            header = super().from_attrs({k: v for k, v in attrs.items() if k not in ("chunk_digests", "extra_arrays")},
                                        where, file=file)
            header.extra_arrays = attrs.get("extra_arrays", {})
        else:
            header = super().from_attrs(attrs, where, file=file)
        extras = header.extra_arrays
        if not isinstance(extras, dict) or not all(
                isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in extras.values()):
            raise KDCacheError(f"{where}: attribute extra_arrays must map array names to positive integer widths, "
                               f"got {extras!r}")
        if isinstance(attrs.get("dataset"), dict):
            header.dataset = DatasetInfo.from_attrs(attrs["dataset"], f"{where}: dataset", file=file,
                                                    prefix="dataset.")
            for key, kind in PREPROCESS_TYPES.items():
                check_type(header.dataset.preprocess.get(key), kind, file, f"dataset.preprocess.{key}")
        manifest = attrs.get("chunk_digests")
        header.chunk_digests = None
        if isinstance(manifest, dict) and "arrays" in manifest and isinstance(manifest["arrays"], dict):
            header.chunk_digests = ChunkManifest.from_attrs(manifest, f"{where}: chunk_digests", file=file,
                                                            prefix="chunk_digests.")
        elif manifest is not None:
            header.chunk_digests = ChunkManifest(arrays=manifest)  # type: ignore[arg-type] - reported by the reader
        return header

    def check_binding(self, root: RootHeader, file: str) -> None:
        """What the split records about how its data is read must agree with the root: the task, its modality and
        label names, and the preprocessing recorded in the root's `write_settings` when the writing began (a
        normalisation edited in one place is refused, never trained on)."""
        dataset = self.dataset
        if dataset is None:
            return
        task = root.task
        for key, mine, theirs in (("task", dataset.task, task.name), ("modality", dataset.modality, task.modality),
                                  ("label_names", dataset.label_names, task.label_names)):
            if mine is not None and theirs is not None and mine != theirs:
                raise KDCacheError(f"{file}: attribute dataset.{key} is {mine!r}, but the root's "
                                   f"task.{'name' if key == 'task' else key} is {theirs!r}; the attributes were edited")
        if "data" not in root.write_settings:  # a cache a script wrote through CacheWriter without write settings
            return
        data = root.write_settings["data"]
        recorded = data.get(self.split) if isinstance(data, dict) else None
        if recorded is None:
            raise KDCacheError(f"{file}: the root's write_settings.data records nothing for split {self.split!r} (it "
                               "was removed); the attributes were edited")
        before = recorded.get("preprocess") if isinstance(recorded, dict) else None
        if not isinstance(before, dict):
            raise KDCacheError(f"{file}: the root's write_settings.data.{self.split}.preprocess must be an object, got "
                               f"{before!r}; the attributes were edited")
        now, before = ({k: v for k, v in p.items() if k not in INFORMATIONAL_PREPROCESS}
                       for p in (dataset.preprocess, before))
        if now != before:
            keys = sorted(k for k in set(now) | set(before) if now.get(k, "(absent)") != before.get(k, "(absent)"))
            shown = ", ".join(f"{k} {now.get(k, '(absent)')!r} here, {before.get(k, '(absent)')!r} there"
                              for k in keys[:3])
            raise KDCacheError(f"{file}: attribute dataset.preprocess differs from the root's write_settings.data."
                               f"{self.split}.preprocess, recorded when the writing began ({shown}); the attributes "
                               "were edited")

    @property
    def array_names(self) -> tuple[str, ...]:
        """The arrays of a dense split (format version 1)."""
        return (*BASE_ARRAYS, *self.extra_arrays)

    def arrays_for(self, target: Any) -> tuple[str, ...]:
        """The arrays of this split in storage order, for the root's target (a targets.TargetSpec)."""
        return (*target.arrays, *ROW_ARRAYS, *(TOKEN_ARRAYS if target.positions else ()), *target.view_arrays,
                *self.extra_arrays)


__all__ = ["ALIGNMENT_RULE", "TOKEN_ARRAYS", "VIEW_PARAMS", "VIEW_PREFIX", "VIEW_SEED_RULE", "ViewInfo", "TokenInfo", "WINDOW_RULE", "ArraySpec", "BASE_ARRAYS", "DENSE_FORMAT_VERSION", "ROW_ARRAYS", "TARGET_ARRAYS", "CHUNK_DIGEST_ALGORITHM", "CheckpointEntry", "ChunkManifest", "DatasetInfo",
           "FORMAT_NAME", "FORMAT_VERSION", "PROGRESS_FOLDER", "Projections", "RootHeader", "SplitHeader", "StorageInfo",
           "TaskInfo", "PREPROCESS_TYPES", "TEACHER_TYPES", "MODALITIES",
           "chain_digest", "check_type", "chunk_digest", "default_chunk_rows", "logits_dtype", "progress_key",
           "split_arrays", "task_modality"]
