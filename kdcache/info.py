"""What a cache holds, in one dict: what `kdcache info` prints and `--json` emits for scripts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdcache import format as fmt
from kdcache.reader import TeacherCache, read_cache_attrs


_SPLIT_KEYS = ("name", "rows", "logits_shape", "logits_dtype", "labels_dtype", "chunk_rows", "complete", "source",
               "digest", "logits_bytes_raw", "logits_bytes_stored", "compression_ratio", "bytes_per_sample",
               "missing_arrays")


def _disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def describe_cache(path: str | Path) -> dict[str, Any]:
    """Summarise a cache, complete or not: an interrupted cache must still be inspectable."""
    path = Path(path)
    attrs = read_cache_attrs(path, allow_incomplete=True)
    import zarr

    root = zarr.open_group(store=str(path), mode="r")
    splits = []
    for name in sorted(root.group_keys()):
        group = root[name]
        wanted = (*fmt.ARRAYS, *(group.attrs.get("extra_arrays") or {}))
        if group.attrs.get("complete") is not True and not set(wanted) <= set(group.array_keys()):
            # The writer stopped (e.g. a full disk) before it had created this split's arrays.
            missing = [a for a in wanted if a not in set(group.array_keys())]
            splits.append({**dict.fromkeys(_SPLIT_KEYS), "name": name, "rows": group.attrs.get("rows"),
                           "complete": False, "missing_arrays": missing})
            continue
        # the same checks as every reader: shapes against attributes, and for a complete split its chunk files
        # (an attribute claiming 10^12 rows is a one-line error, never a summary that calls the cache complete)
        cache = TeacherCache(path, name, allow_incomplete=True, check_chunks=group.attrs.get("complete") is True)
        raw = cache.logits.nbytes
        stored = _disk_bytes(path / name / "logits")
        splits.append({
            "name": name,
            "rows": len(cache),
            "logits_shape": list(cache.logits.shape),
            "logits_dtype": str(cache.logits.dtype),
            "labels_dtype": str(cache.labels.dtype),
            "chunk_rows": cache.logits.chunks[0],
            "complete": cache.split_attrs.get("complete") is True,
            "source": (cache.split_attrs.get("dataset") or {}).get("source"),
            "digest": (cache.split_attrs.get("dataset") or {}).get("digest"),
            "logits_bytes_raw": raw,
            "logits_bytes_stored": stored,
            "compression_ratio": round(raw / stored, 2) if stored else None,
            "bytes_per_sample": round(stored / len(cache), 2) if len(cache) else None,
            "missing_arrays": [],
            "extra_arrays": cache.extra_widths,
        })
    return {
        "path": str(path),
        "format": attrs.get("format"),
        "format_version": attrs.get("format_version"),
        "complete": attrs.get("complete") is True,
        "created": attrs.get("created"),
        "completed": attrs.get("completed"),
        "teacher": attrs.get("teacher"),
        "task": attrs.get("task"),
        "storage": attrs.get("storage"),
        "inference": attrs.get("inference"),
        "software": attrs.get("software"),
        "command": attrs.get("command"),
        "throughput": attrs.get("throughput"),
        "checkpoints": attrs.get("checkpoints") or [],
        "hidden_projections": attrs.get("hidden_projections"),
        "size_on_disk": _disk_bytes(path),
        "splits": splits,
    }
