"""The teacher cache, and nothing else: its format (schema, codecs), where its bytes live (store), and the writer,
the reader, verification and description built on them. Nothing here knows about models, data or training."""

from kdcache.cache.reader import Cache, TeacherCache, load_cache_tokenizer, open_cache
from kdcache.cache.store import CacheStore, parse_storage_options

__all__ = ["Cache", "CacheStore", "TeacherCache", "load_cache_tokenizer", "open_cache", "parse_storage_options"]
