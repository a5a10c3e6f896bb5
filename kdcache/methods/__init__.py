"""Distillation methods, one module each, behind one interface (`kdcache.methods.base.Method`).

The names below load on first use, so the CLI can check `--psi` against `kdcache.methods.schedules` without
importing torch (a typo is reported in a fraction of a second).
"""

from __future__ import annotations

from typing import Any

__all__ = ["KDMethod", "KD_LOSSES", "METHODS", "Method", "MethodOptions", "Run", "StepPlan", "get", "make_method",
           "method_class"]


def __getattr__(name: str) -> Any:
    if name in ("get", "KDMethod"):  # a method as a plain object, for other training loops (methods/plain.py)
        from kdcache.methods import plain

        return getattr(plain, name)
    if name in __all__:
        from kdcache.methods import registry

        return getattr(registry, name)
    raise AttributeError(f"module 'kdcache.methods' has no attribute {name!r}")
