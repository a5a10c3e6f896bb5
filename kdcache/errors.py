"""The one exception type users see: a message that names the file and the problem, fit for one line."""

from __future__ import annotations


class KDCacheError(Exception):
    """A user-facing failure (bad input, a cache that cannot be trusted); the CLI prints it as one line."""


class SplitMissing(KDCacheError):
    """The dataset has no such split at all (no file or folder for it), as opposed to a split that is there but
    damaged: `kdcache train` may select on the training data when the default validation split is missing, and
    never when it is damaged."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a long job, carrying what was kept and how to continue; the CLI prints it and exits 130.

    A KeyboardInterrupt still, so a script that catches Ctrl-C around a recipe keeps working."""


class SharedError(KDCacheError):
    """A failure every process of a torchrun run raises together (one rank's refusal, told to all): only rank 0
    prints it, so the user reads one line, not one per process."""
