"""Distillation methods, one module each, behind one interface (`kdcache.methods.base.Method`).

The names below load on first use, so the CLI can check `--psi` against `kdcache.methods.schedules` without
importing torch (a typo is reported in a fraction of a second).
"""

from __future__ import annotations

from typing import Any

__all__ = ["KD_LOSSES", "METHODS", "Method", "MethodOptions", "Run", "StepPlan", "make_method", "method_class"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from kdcache.methods import registry

        return getattr(registry, name)
    raise AttributeError(f"module 'kdcache.methods' has no attribute {name!r}")
