"""kdcache: knowledge distillation from an offline teacher cache.

Stage one (`kdcache cache-teacher`, `kdcache.recipes.cache_teacher`) runs a teacher once and stores its
per-sample outputs in a checksummed Zarr cache; stage two trains students against the stored outputs.
Scripts read a cache with `kdcache.open_cache(path_or_url, split="train")`.
"""

from __future__ import annotations

from typing import Any

from kdcache.errors import KDCacheError

__version__ = "0.1.0"

__all__ = ["Cache", "KDCacheError", "TeacherCache", "open_cache", "replay_view", "__version__"]


def __getattr__(name: str) -> Any:
    """The cache API, imported on first use, so `import kdcache.errors` (the command line) stays instant."""
    import importlib

    if name in ("Cache", "TeacherCache", "open_cache"):
        return getattr(importlib.import_module("kdcache.cache"), name)
    if name == "replay_view":  # the exact input the teacher saw for one view of a views cache
        return importlib.import_module("kdcache.train.views").replay_view
    try:
        return importlib.import_module(f"kdcache.{name}")  # a subpackage used as kdcache.cache.X
    except ModuleNotFoundError as exc:
        if exc.name != f"kdcache.{name}":  # a dependency of that subpackage is missing: say so
            raise
        raise AttributeError(f"module 'kdcache' has no attribute {name!r}") from None
