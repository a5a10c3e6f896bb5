"""The names every flag may take, in a module that imports nothing: the command line checks a flag against them
before it imports torch, transformers or zarr, so a typo costs a tenth of a second, not seconds. The modules that
implement each name check themselves against this list (tests/cli/test_cli.py)."""

from __future__ import annotations

import os
import re

METHODS = ("continuation", "vanilla", "annealing", "ce", "prokd", "curriculum")
KD_LOSSES = ("vanilla", "continuation")
PRESETS = ("auto", "cifar", "glue", "small")
GLUE_TASKS = ("sst2", "cola", "mrpc", "rte", "stsb", "qnli", "qqp", "mnli")
IMAGE_TASKS = ("cifar10", "cifar100", "imagefolder", "mnist", "fashion-mnist", "svhn", "imagenet")
FEATURE_TASKS = ("digits", "tabular")
TASKS = (*GLUE_TASKS, "text", *IMAGE_TASKS, *FEATURE_TASKS)
STREAM_MODES = ("auto", "memory", "chunks")
PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMIZERS = ("sgd", "adamw", "adam")
LR_SCHEDULES = ("constant", "linear", "cosine")
REDUCTIONS = ("sample", "batch", "element", "mse")
PHI_ON = ("both", "teacher", "margin", "none")
SCHEDULE_UNITS = ("epoch", "step")
AUGMENTS = ("none", "cifar", "imagenet")
LOGIT_DTYPES = ("float16", "float32")


def check(flag: str, value: object, choices: tuple[str, ...]) -> None:
    """A flag's value among its choices, or the one-line error naming them (None: not given)."""
    if value is not None and value not in choices:
        from kdcache.errors import KDCacheError

        if flag == "--task":  # the wording of kdcache.data.modality_of, for the same mistake made in the library
            raise KDCacheError(f"unknown task {value!r}; choose one of {', '.join(choices)}")
        raise KDCacheError(f"{flag} {value!r} is not one of {', '.join(choices)}")


#: The default host-memory budget for a split's teacher targets, as a share of this machine's RAM.
DEFAULT_BUDGET_SHARE = 0.25
_UNITS = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3,
          "TIB": 1024**4}


def total_memory() -> int:
    """This machine's RAM in bytes (what a budget written as a share is a share of)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 8 * 1024**3


def parse_budget(spec: str | None, flag: str = "--memory-budget", default_share: float = DEFAULT_BUDGET_SHARE) -> int:
    """A memory budget in bytes, from a share of RAM (`0.25`: 0 to 1) or a size with its unit (`512MiB`, `4GiB`,
    `2e9B`); anything else is a one-line error naming the flag."""
    if spec is None:
        return int(default_share * total_memory())
    text = str(spec).strip()
    match = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([KMGT]i?B|B)?", text, flags=re.IGNORECASE)
    if not match:
        raise _error(f"{flag} {spec!r}: expected a share of RAM (0.25) or a size with its unit (512MiB, 4GiB)")
    value, unit = float(match.group(1)), (match.group(2) or "").upper()
    if not unit:
        if not 0 <= value <= 1:
            raise _error(f"{flag} {spec!r}: a number without a unit is a share of RAM, from 0 to 1; write a size "
                         "with its unit (512MiB, 4GiB)")
        return int(value * total_memory())
    return int(value * _UNITS[unit])


def _error(message: str) -> Exception:
    from kdcache.errors import KDCacheError

    return KDCacheError(message)
