"""The registry of methods: one entry per method module, each behind `kdcache.methods.base.Method`.

A new method is a module here and one entry in METHODS; the training loop asks the method what to read, what is
in effect at each step and what the loss is, and never compares its name.
"""

from __future__ import annotations

from kdcache.errors import KDCacheError
from kdcache.methods.annealing import AnnealingKD
from kdcache.methods.base import Method, MethodOptions, Run, StepPlan, check_options
from kdcache.methods.ce import CrossEntropy
from kdcache.methods.continuation import ContinuationKD
from kdcache.methods.curriculum import CurriculumExtraction
from kdcache.methods.prokd import KD_LOSSES, ProKD
from kdcache.methods.vanilla import VanillaKD

METHODS: dict[str, type[Method]] = {m.name: m for m in (ContinuationKD, VanillaKD, AnnealingKD, CrossEntropy, ProKD,
                                                        CurriculumExtraction)}


def method_class(name: str) -> type[Method]:
    """The method called `name`, or a one-line error listing the methods there are."""
    if name not in METHODS:
        raise KDCacheError(f"--method {name!r} is not one of {', '.join(METHODS)}")
    return METHODS[name]


def make_method(name: str, options: MethodOptions | None = None) -> Method:
    """A method object for one run, its flags checked (a flag this method does not use is a one-line error)."""
    cls = method_class(name)
    options = options or MethodOptions()
    check_options(cls, options, METHODS)
    if options.kd_loss is not None and options.kd_loss not in KD_LOSSES:
        raise KDCacheError(f"--kd-loss {options.kd_loss!r} is not one of {', '.join(KD_LOSSES)}")
    return cls(options)


__all__ = ["KD_LOSSES", "METHODS", "Method", "MethodOptions", "Run", "StepPlan", "make_method", "method_class"]
