"""The names every flag may take, in a module that imports nothing: the command line checks a flag against them
before it imports torch, transformers or zarr, so a typo costs a tenth of a second, not seconds. The modules that
implement each name check themselves against this list (tests/cli/test_cli.py)."""

from __future__ import annotations

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
REDUCTIONS = ("sample", "batch", "element")
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
