"""Edits to a cache that tests make on purpose, as a careless or hostile hand would."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr


def refresh_manifest(copy: Path) -> None:
    """Recompute every split's chunk manifest from the arrays as they now are: what a hostile (or very careful)
    editor does after rewriting values through Zarr, so the checks behind the manifest can be tested too."""
    from kdcache.cache import codecs, schema as fmt

    root = zarr.open_group(str(copy), mode="r+")
    for name in root.group_keys():
        group = root[name]
        manifest = dict(group.attrs["chunk_digests"])
        rows = group["labels"].chunks[0]  # every array of a split is chunked alike (dense or sparse targets)
        manifest["arrays"] = {key: [fmt.chunk_digest(np.asarray(group[key][a:a + rows]))
                                    for a in range(0, group[key].shape[0], rows)] for key in manifest["arrays"]}
        group.attrs["chunk_digests"] = manifest


def interrupted_at(cache: Path, split: str, rows_done: int) -> dict:
    """The split attributes a writer killed after `rows_done` rows would have left: rows_done and the chained
    digest of the chunks before it (what a resume checks the stored chunks against)."""
    from kdcache.cache import schema

    group = zarr.open_group(str(cache), mode="r")[split]
    views = [n for n in ("view_logits", schema.VIEW_PARAMS) if n in group.array_keys()]  # a dense views cache's
    names = (*schema.BASE_ARRAYS, *views, *(group.attrs.get("extra_arrays") or {}))
    rows, chain = group["logits"].chunks[0], ""
    for start in range(0, rows_done, rows):
        chain = schema.chain_digest(chain, [schema.chunk_digest(np.asarray(group[n][start:start + rows])) for n in names])
    return {"rows_done": rows_done, "chunk_chain": chain}


def interrupt_as_an_earlier_release(cache: Path, split: str, rows_done: int, *, drop_later_chunks: bool = False) -> None:
    """Make a finished cache look as a kdcache before the chunk records left it, killed after `rows_done` rows of
    `split`: the root and the split incomplete, the split's `rows_done` and `chunk_chain` as that release advanced
    them (and, with `drop_later_chunks`, the chunks after `rows_done` never written)."""
    import json
    import shutil

    for meta_file, extra in ((cache / "zarr.json", {}), (cache / split / "zarr.json",
                                                         interrupted_at(cache, split, rows_done))):
        meta = json.loads(meta_file.read_text())
        meta["attributes"].update({"complete": False, **extra})
        meta_file.write_text(json.dumps(meta))
    if drop_later_chunks:
        first = rows_done // zarr.open_group(str(cache), mode="r")[split]["labels"].chunks[0]
        for chunk in [p for p in (cache / split).glob("*/c/*") if int(p.name) >= first]:
            shutil.rmtree(chunk) if chunk.is_dir() else chunk.unlink()


def stored_rows(cache: Path, split: str) -> int:
    """Rows of `split` a writer has stored so far, as a resume would find them: every row of a complete split, else
    the rows of its recorded chunks (each record is written after its chunk)."""
    import json

    try:
        attrs = json.loads((cache / split / "zarr.json").read_text())["attributes"]
    except (OSError, ValueError, KeyError):
        return 0
    if attrs.get("complete"):
        return int(attrs["rows"])
    rows = 0
    for record in (cache / ".kdcache-progress" / split).glob("*.json"):
        try:
            start, stop = json.loads(record.read_text())["rows"]
        except (OSError, ValueError, KeyError):
            continue  # (a record is replaced whole: never seen half-written)
        rows += stop - start
    return rows
