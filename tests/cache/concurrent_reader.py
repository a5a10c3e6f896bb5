"""A student-like reader of one cache, run in many processes at once by tests/test_reliability.py.

Lives in its own small module so that each reader, forked from a forkserver that already imported torch and
kdcache, starts in a fraction of a second.
"""

from __future__ import annotations

import hashlib
from typing import Any

import kdcache
from kdcache.train.batches import LogitBatches  # imports torch: done once, in the forkserver
from kdcache.recipes.verify import verify_cache


def read_everything(path: str, barrier: Any, results: Any) -> None:
    """Wait for every reader, then stream the whole train split as distill does and verify the cache.

    Puts (digest of every batch in order, verify passed, store opened read-only) on `results`, or the error.
    """
    try:
        barrier.wait(timeout=120)  # all readers start reading at the same moment
        cache = kdcache.open_cache(path, "train")
        h = hashlib.sha256()
        for mode in ("chunks", "memory"):
            for epoch in range(3):
                for rows, logits, labels in LogitBatches(cache, 100, seed=5, mode=mode, buffer_chunks=2).epoch(epoch):
                    for t in (rows, logits, labels):
                        h.update(t.numpy().tobytes())
        h.update(cache.read("fingerprint").tobytes())
        results.put((h.hexdigest(), verify_cache(path).ok, bool(cache.group.store.read_only)))
    except BaseException as exc:  # noqa: BLE001 - reported to the test, which fails with it
        results.put(("error", f"{type(exc).__name__}: {exc}", False))
