"""The names every flag may take, in a module that imports nothing: the command line checks a flag against them
before it imports torch, transformers or zarr, so a typo costs a tenth of a second, not seconds. The modules that
implement each name check themselves against this list (tests/cli/test_cli.py)."""

from __future__ import annotations

import os
import re

METHODS = ("continuation", "vanilla", "annealing", "ce", "prokd", "curriculum")
KD_LOSSES = ("vanilla", "continuation")
PRESETS = ("auto", "cifar", "glue", "small", "text-scratch", "lm")
GLUE_TASKS = ("sst2", "cola", "mrpc", "rte", "stsb", "qnli", "qqp", "mnli")
IMAGE_TASKS = ("cifar10", "cifar100", "imagefolder", "mnist", "fashion-mnist", "svhn", "imagenet")
FEATURE_TASKS = ("digits", "tabular")
LM_TASKS = ("lm",)  # a causal language model over a token stream (kdcache.data.lm)
TASKS = (*GLUE_TASKS, "text", *LM_TASKS, *IMAGE_TASKS, *FEATURE_TASKS)
STREAM_MODES = ("auto", "memory", "chunks")
PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMIZERS = ("sgd", "adamw", "adam")
LR_SCHEDULES = ("constant", "linear", "cosine")
REDUCTIONS = ("sample", "batch", "element", "mse")
PHI_ON = ("both", "teacher", "margin", "none")
#: What vanilla KD on a top-k cache does with the outputs the cache did not keep (docs/methods.md).
TOPK_TAILS = ("bucket", "renormalised")
SCHEDULE_UNITS = ("epoch", "step")
AUGMENTS = ("none", "cifar", "imagenet")
#: Which view of a views cache each row trains on per epoch (kdcache/train/views.py).
VIEW_ORDERS = ("cycle", "random", "plain")
LOGIT_DTYPES = ("float16", "float32")


def task_modality(task: str | None) -> str | None:
    """The modality a task name implies (None for a name this kdcache does not know): the data loaders read by it,
    and a cache's recorded modality must agree with it, since the modality picks the distillation preset."""
    if task in GLUE_TASKS or task == "text" or task in LM_TASKS:
        return "text"
    if task in IMAGE_TASKS:
        return "image"
    if task in FEATURE_TASKS:
        return "features"
    return None


def check(flag: str, value: object, choices: tuple[str, ...]) -> None:
    """A flag's value among its choices, or the one-line error naming them (None: not given)."""
    if value is not None and value not in choices:
        from kdcache.errors import KDCacheError

        if flag == "--task":  # the wording of kdcache.data.modality_of, for the same mistake made in the library
            raise KDCacheError(f"unknown task {value!r}; choose one of {', '.join(choices)}")
        raise KDCacheError(f"{flag} {value!r} is not one of {', '.join(choices)}")


#: The range of every numeric flag, checked where it is parsed: (low, low included, high, high included), None
#: for no bound. NaN and infinities are refused everywhere (a NaN compares False with every bound, so a range alone
#: would let it through).
NUMBER_RANGES: dict[str, tuple[float | None, bool, float | None, bool]] = {
    "lr": (0, False, None, False), "weight_decay": (0, True, None, False), "momentum": (0, True, 1, False),
    "warmup_ratio": (0, True, 1, False), "max_grad_norm": (0, True, None, False), "margin": (0, True, None, False),
    "alpha": (0, True, 1, True), "temperature": (0, False, None, False), "rtol": (0, True, None, False),
    "atol": (0, True, None, False), "seed": (0, True, 2**32 - 1, True), "proj_seed": (0, True, 2**32 - 1, True),
    "views": (1, True, 4096, True), "view_seed": (0, True, 2**32 - 1, True),
    "t_max": (1, True, None, False), "anneal_epochs": (1, True, None, False), "save_every": (1, True, None, False),
    "stop_after_epoch": (1, True, None, False), "epochs": (1, True, None, False), "batch_size": (1, True, None, False),
    "max_steps": (1, True, None, False), "student_layers": (1, True, None, False), "chunk_rows": (1, True, None, False),
    "loss_chunk": (1, True, None, False),
    "workers": (0, True, None, False), "num_workers": (0, True, None, False), "log_every": (0, True, None, False),
    "max_length": (1, True, None, False), "image_size": (1, True, None, False), "limit": (1, True, None, False),
    "subset": (1, True, None, False), "holdout": (1, True, None, False),
    "holdout_test": (1, True, None, False), "proj_dim": (1, True, None, False),
    "sample": (0, True, None, False), "student_epochs": (1, True, None, False), "seq_len": (1, True, None, False),
    "vocab_size": (257, True, None, False),
}


def check_numbers(**flags: object) -> None:
    """Every numeric flag given (not None) finite and inside its NUMBER_RANGES range, or a one-line error naming
    the flag and the range; flags without a range are left alone."""
    import math

    for name, value in flags.items():
        if name not in NUMBER_RANGES or value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        low, low_in, high, high_in = NUMBER_RANGES[name]
        ok = math.isfinite(value) and (low is None or value > low or (low_in and value == low)) and \
            (high is None or value < high or (high_in and value == high))
        if not ok:
            raise _error(f"--{name.replace('_', '-')} must be {_describe(low, low_in, high, high_in)}, got {value}")


def _describe(low: float | None, low_in: bool, high: float | None, high_in: bool) -> str:
    parts = []
    if low is not None:
        parts.append(f"{'at least' if low_in else 'more than'} {low:g}" if low else
                     ("0 or more" if low_in else "more than 0"))
    if high is not None:
        parts.append(f"{'at most' if high_in else 'less than'} {high:g}" if high < 1e9 else f"at most {int(high):,}")
    return " and ".join(parts) if parts else "a finite number"


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


def parse_interval(spec: str, flag: str = "--progress-every") -> tuple[int | None, float | None]:
    """(steps, seconds) of a progress interval: `100` steps, or `30s`, `5m`, `1h`; anything else is one line."""
    text = str(spec).strip().lower()
    match = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*(s|m|h)?", text)
    if not match or float(match.group(1)) <= 0 or (not match.group(2) and not match.group(1).isdigit()):
        raise _error(f"{flag} {spec!r}: expected a number of steps (100) or of seconds, minutes or hours (30s, 5m, 1h)")
    if not match.group(2):
        return int(match.group(1)), None
    return None, float(match.group(1)) * {"s": 1, "m": 60, "h": 3600}[match.group(2)]


#: config.json's mark of a kdcache run folder (as a cache's root attributes carry its `format`): known here too,
#: so a model loader can tell a run folder given where a model folder belongs.
RUN_FORMAT = "kdcache.run"


def _error(message: str) -> Exception:
    from kdcache.errors import KDCacheError

    return KDCacheError(message)


#: Task kinds whose primary validation metric is better lower (a language model's perplexity); every other
#: kind's metric (accuracy, F1, MCC, Pearson) is better higher.
LOWER_IS_BETTER = ("lm",)


def better(new: float, old: float, kind: str) -> bool:
    """Whether validation metric `new` beats `old` for a task of this kind (the direction of its primary metric)."""
    return new < old if kind in LOWER_IS_BETTER else new > old
