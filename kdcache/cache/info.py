"""What a cache holds, in one dict: what `kdcache info` prints and `--json` emits for scripts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdcache.cache.reader import Cache
from kdcache.cache.schema import PROGRESS_FOLDER, ROW_ARRAYS, TOKEN_ARRAYS
from kdcache.cache.store import CacheStore

_SPLIT_KEYS = ("name", "rows", "logits_shape", "logits_dtype", "labels_dtype", "chunk_rows", "complete", "source",
               "digest", "logits_bytes_raw", "logits_bytes_stored", "compression_ratio", "bytes_per_sample",
               "missing_arrays", "target_arrays", "target_quality", "rows_stored", "tokens", "bytes_per_token",
               "bytes_per_view")


def describe_cache(location: str | Path | CacheStore, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Summarise a cache, complete or not: an interrupted cache must still be inspectable. A complete split gets
    the same checks every reader makes (shapes against attributes, its chunk files), so a cache whose attributes
    claim 10^12 rows is a one-line error, never a summary that calls it complete."""
    cache = Cache(location, allow_incomplete=True, storage_options=storage_options)
    sizes = cache.store.list_files()
    header = cache.header
    target = header.target_spec()
    splits = [_describe_split(cache, name, sizes, target) for name in cache.splits]
    return {
        "path": str(cache.store), "format": header.format, "format_version": header.format_version,
        "complete": header.complete is True, "created": header.created, "completed": header.completed,
        "teacher": header.teacher, "task": header.task.to_attrs(), "storage": header.storage.to_attrs(),
        "inference": header.inference, "software": header.software, "command": header.command,
        "throughput": header.throughput, "checkpoints": [c.to_attrs() for c in header.checkpoints],
        "hidden_projections": header.hidden_projections.to_attrs() if header.hidden_projections else None,
        "target": {**target.to_attrs(), "description": target.describe()},
        "tokens": header.tokens.to_attrs() if header.tokens is not None else None,
        "views": header.views.to_attrs() if header.views is not None else None,
        "size_on_disk": sum(sizes.values()), "splits": splits,
    }


def _describe_split(cache: Cache, name: str, sizes: dict[str, int], target: Any) -> dict[str, Any]:
    """One split; the bytes are those of the target's arrays (dense: `logits`), raw and as stored."""
    group = cache.root[name]
    wanted = (*target.arrays, *ROW_ARRAYS, *(TOKEN_ARRAYS if target.positions else ()), *target.view_arrays,
              *(group.attrs.get("extra_arrays") or {}))
    complete = group.attrs.get("complete") is True
    if not complete and not set(wanted) <= set(group.array_keys()):
        # The writer stopped (e.g. a full disk) before it had created this split's arrays.
        missing = [a for a in wanted if a not in set(group.array_keys())]
        return {**dict.fromkeys(_SPLIT_KEYS), "name": name, "rows": group.attrs.get("rows"), "complete": False,
                "missing_arrays": missing, "rows_stored": 0}
    split = cache.split(name, check_chunks=complete)
    arrays = {a: split.arrays[a] for a in split.target.arrays}
    raw = sum(a.nbytes for a in arrays.values())
    stored = sum(size for key, size in sizes.items() for a in arrays if key.startswith(f"{name}/{a}/"))
    dataset = split.split_header.dataset
    dense = split.target.kind == "dense"
    return {
        "name": name, "rows": len(split), "logits_shape": list(split.logits.shape) if dense else None,
        "logits_dtype": str(split.logits.dtype) if dense else None, "labels_dtype": str(split.labels.dtype),
        "target_arrays": {a: {"shape": list(v.shape), "dtype": str(v.dtype)} for a, v in arrays.items()},
        "target_quality": split.target_quality,
        "chunk_rows": split.chunk_rows, "complete": complete,
        "source": dataset.source if dataset else None, "digest": dataset.digest if dataset else None,
        "logits_bytes_raw": raw, "logits_bytes_stored": stored,
        "compression_ratio": round(raw / stored, 2) if stored else None,
        "bytes_per_sample": round(stored / len(split), 2) if len(split) else None,
        "missing_arrays": [], "extra_arrays": split.extra_widths,
        "rows_stored": len(split) if complete else _rows_stored(name, len(split), split.chunk_rows, sizes, group),
        **_token_sizes(split, stored),
        "bytes_per_view": _view_bytes(split, sizes),
    }


def _view_bytes(split: Any, sizes: dict[str, int]) -> float | None:
    """A views cache's stored bytes per sample per view (its view arrays and parameters), else None."""
    views = split.target.view_arrays
    if not views or not len(split):
        return None
    stored = sum(size for key, size in sizes.items() for a in views if key.startswith(f"{split.split}/{a}/"))
    return round(stored / (len(split) * int(split.target.views)), 2)


def _rows_stored(name: str, rows: int, chunk_rows: int, sizes: dict[str, int], group: Any) -> int:
    """The rows an interrupted split holds: those of its recorded chunks (each record is written after its chunk),
    counted from the one listing; a split an earlier release interrupted says it in `rows_done`."""
    prefix = f"{PROGRESS_FOLDER}/{name}/"
    chunks = {int(k[len(prefix):-5]) for k in sizes if k.startswith(prefix) and k.endswith(".json")
              and k[len(prefix):-5].isdigit()}
    counted = sum(max(0, min(rows, (k + 1) * chunk_rows) - k * chunk_rows) for k in chunks)
    return counted if chunks else int(group.attrs.get("rows_done") or 0)



def _token_sizes(split: Any, stored: int) -> dict[str, Any]:
    """A language-model split's tokens (the stream's, padding excluded) and its target's stored bytes per token."""
    dataset = split.split_header.dataset
    tokens = (dataset.preprocess or {}).get("tokens") if dataset is not None and split.target.positions else None
    if not isinstance(tokens, int) or tokens < 1:
        return {"tokens": None, "bytes_per_token": None}
    return {"tokens": tokens, "bytes_per_token": round(stored / tokens, 2)}


__all__ = ["describe_cache"]
