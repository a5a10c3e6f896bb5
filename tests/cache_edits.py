"""Edits to a cache that tests make on purpose, as a careless or hostile hand would."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr


def refresh_manifest(copy: Path) -> None:
    """Recompute every split's chunk manifest from the arrays as they now are: what a hostile (or very careful)
    editor does after rewriting values through Zarr, so the checks behind the manifest can be tested too."""
    from kdcache import format as fmt

    root = zarr.open_group(str(copy), mode="r+")
    for name in root.group_keys():
        group = root[name]
        manifest = dict(group.attrs["chunk_digests"])
        rows = group["logits"].chunks[0]
        manifest["arrays"] = {key: [fmt.chunk_digest(np.asarray(group[key][a:a + rows]))
                                    for a in range(0, group[key].shape[0], rows)] for key in manifest["arrays"]}
        group.attrs["chunk_digests"] = manifest
