"""kdcache: knowledge distillation from an offline teacher cache.

Stage one (`kdcache cache-teacher`, `kdcache.recipes.cache_teacher`) runs a teacher once and stores its
per-sample outputs in a checksummed Zarr cache; stage two trains students against the stored outputs.
Scripts read a cache with `kdcache.open_cache(path_or_url, split="train")`.
"""

from __future__ import annotations

from kdcache.errors import KDCacheError
from kdcache.cache import Cache, TeacherCache, open_cache

__version__ = "0.1.0"

__all__ = ["Cache", "KDCacheError", "TeacherCache", "open_cache", "__version__"]
