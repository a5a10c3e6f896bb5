"""The one exception type users see: a message that names the file and the problem, fit for one line."""

from __future__ import annotations


class KDCacheError(Exception):
    """A user-facing failure (bad input, a cache that cannot be trusted); the CLI prints it as one line."""
