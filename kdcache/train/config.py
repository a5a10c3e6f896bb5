"""A student run's settings (`DistillConfig`) and every default of `distill` and `train`, in one visible place.

`cifar` and `glue` are the paper's settings (section 5: CIFAR 200 epochs, lr 0.2, batch 32; GLUE 30 epochs, lr
2e-5, batch 64); each method adds its own hyper-parameters per preset (T_max, psi, margin, T, alpha, ...: see
its module under kdcache/methods/). What the paper leaves open (optimiser, weight decay, warm-up, clipping) is ours
and marked so in docs/methods.md. `small` serves feature-vector tasks such as the bundled digits and MLPs on
images; `text-scratch` a Transformer trained from its config. `--preset auto` picks by the task's modality and
the model (`auto_preset`). A run of another length than its preset's keeps the schedules' shape (`settings`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdcache.data import DataOptions
from kdcache.errors import KDCacheError
from kdcache.presets import TRAINING_PRESETS  # re-exported: the table lives below methods/ (kdcache/presets.py)
#: `--preset auto` by the task's modality alone, the model being the usual one for it (a CNN on images, a
#: pre-trained encoder on text); `auto_preset` departs from it where the model is not.
AUTO_PRESET = {"text": "glue", "image": "cifar", "features": "small", "lm": "lm"}
#: (modality, model family) -> preset, where the model decides: an MLP on images trains like one on features, a
#: Transformer from its config (random weights) needs a from-scratch rate, not a pre-trained encoder's 2e-5.
AUTO_BY_MODEL = {("image", "mlp"): "small", ("text", "transformer"): "text-scratch"}
FAMILY_WORDS = {"mlp": "an MLP", "cnn": "a CNN", "pretrained": "a pre-trained model folder",
                "transformer": "a Transformer from its config (random weights)", None: "the student"}
#: The hyper-parameter flags of DistillConfig: None means "the preset's (or the method's) value".
HYPERPARAMETERS = ("epochs", "t_max", "margin", "psi", "alpha", "temperature", "anneal_epochs", "lr", "batch_size",
                   "optimizer", "weight_decay", "momentum", "lr_schedule", "warmup_ratio", "max_grad_norm")
#: Fields that do not change what a run computes: a resume may differ in these. Paths are left out too: the cache
#: and data are identified by their digests, so a moved run or cache resumes. `absolute_schedules` decides psi and
#: T_max, which the resolved hyper-parameters carry: a run begun before schedules followed --epochs resumes with it.
NOT_IDENTITY = ("resume", "overwrite", "stop_after_epoch", "progress", "device", "command", "out", "cache", "data",
                "trust_model_code", "storage_options", "num_workers", "memory_budget", "keep_inputs", "check_first",
                "log_every", "max_steps", "compile", "report_split", "progress_every", "absolute_schedules",
                "loss_chunk")
#: Fields added after runs existed: left out of the identity while unset, so those runs still resume.
OPTIONAL_FIELDS = ("checkpoint", "kd_loss", "phase_epochs", "layer_map", "augment", "view_order",
                   "anneal_continuous", "phi_on",
                   "topk_tail",
                   "student_layers")


@dataclass
class DistillConfig:
    """Everything `distill` and `train` need; None means "the preset's value"."""

    student: str
    out: Path
    cache: str | Path | None = None  # a path or an fsspec URL; None: `kdcache train`, CE on the dataset's labels
    method: str = "continuation"
    data: str | None = None
    task: str | None = None  # train only (a cache names its own task)
    tokenizer: str | None = None  # train only, for text
    data_options: DataOptions = field(default_factory=DataOptions)  # train only
    val_split: str | None = None  # default: validation, else test, when present
    preset: str = "auto"
    epochs: int | None = None
    t_max: int | None = None
    margin: float | None = None
    psi: str | None = None
    reduction: str = "sample"
    alpha: float | None = None
    temperature: float | None = None
    anneal_epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    optimizer: str | None = None
    weight_decay: float | None = None
    momentum: float | None = None
    lr_schedule: str | None = None
    warmup_ratio: float | None = None
    max_grad_norm: float | None = None
    schedule_unit: str = "epoch"
    absolute_schedules: bool | None = None  # keep the preset's schedules in absolute epochs, not scaled to --epochs
    seed: int = 0
    precision: str = "fp32"
    device: str = "auto"
    student_kwargs: dict[str, Any] = field(default_factory=dict)
    student_layers: int | None = None  # keep the first N transformer layers of a pre-trained HF student folder
    loss_chunk: int | None = None  # a language-model cache: positions per chunk of the token loss (None: 2**24 / V)
    save_every: int | None = None
    stream_mode: str = "auto"
    checkpoint: str | None = None  # distil from this cached teacher checkpoint instead of the trained teacher
    kd_loss: str | None = None  # prokd / curriculum's logits phase: vanilla (default) or continuation
    phase_epochs: str | None = None  # curriculum: epochs per projection phase ("5,5"); prokd: per checkpoint
    layer_map: str | None = None  # curriculum: teacher layer -> student layer, e.g. "2:1,4:2"
    anneal_continuous: bool | None = None  # annealing: stage 2 keeps stage 1's optimiser and LR schedule
    phi_on: str | None = None  # continuation: what phi anneals (both, as Eq. 4 | teacher | margin | none)
    topk_tail: str | None = None  # vanilla on a top-k cache: bucket (exact, the default) | renormalised
    resume: bool = False
    overwrite: bool = False
    stop_after_epoch: int | None = None
    progress: bool = True
    progress_every: str | None = None  # plain progress lines (stderr not a terminal) every N steps or 30s, 5m
    command: str | None = None
    trust_model_code: bool = False  # let a module:factory student (flag or model folder) import and run
    storage_options: dict[str, Any] = field(default_factory=dict)  # for a cache named by an fsspec URL
    augment: str | None = None  # random views of training images: cifar | imagenet (docs/methods.md)
    view_order: str | None = None  # a views cache: cycle (default) | random | plain (kdcache/train/views.py)
    num_workers: int | None = None  # DataLoader worker processes decoding inputs (None: by modality and device)
    memory_budget: str | None = None  # host memory for the teacher's targets (a share of RAM or a size)
    keep_inputs: str | None = None  # decoded inputs kept after the first epoch while they fit this size
    check_first: bool = False  # compare every row with the cache before training, not as rows are decoded
    log_every: int = 0  # read the loss back (and check it) every N steps; 0: once per epoch
    max_steps: int | None = None  # stop after N optimiser steps (evaluating once): smoke runs and benchmarks
    report_split: str | None = None  # also score this split every epoch (never selecting on it): the test split
    compile: bool = False  # torch.compile the student

    def __post_init__(self) -> None:
        if self.phi_on == "both":  # Eq. 4, the default: the same run whether the flag is given or not
            self.phi_on = None
        if self.topk_tail == "bucket":  # likewise the exact tail
            self.topk_tail = None
        if self.absolute_schedules is False:  # the default: the same run whether the flag is given or not
            self.absolute_schedules = None

    def identity(self) -> dict[str, Any]:
        """The fields that decide what the run computes, as plain JSON values."""
        values = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()
                  if k not in NOT_IDENTITY and not (k in OPTIONAL_FIELDS and v is None)}
        if values["data_options"].get("holdout_test") is None:  # added after runs existed: they still resume
            values["data_options"].pop("holdout_test", None)
        return values


def auto_preset(modality: str, family: str | None = None) -> tuple[str, str]:
    """The preset `--preset auto` picks, and why in words: by the task's modality, then by the model where it is
    not the one the modality's preset was written for (issue 26: an MLP on Fashion-MNIST is not a CIFAR ResNet)."""
    if (modality, family) in AUTO_BY_MODEL:
        return AUTO_BY_MODEL[(modality, family)], f"auto: {FAMILY_WORDS[family]} on {_a(modality)} task"
    if modality == "lm":
        return AUTO_PRESET["lm"], "auto: a language-model cache"
    return AUTO_PRESET.get(modality, "small"), f"auto: {_a(modality)} task"


def _a(word: str) -> str:
    return f"{'an' if word[:1] in 'aeiou' else 'a'} {word}"


def preset_name(preset: str, modality: str, family: str | None = None) -> str:
    name = auto_preset(modality, family)[0] if preset == "auto" else preset
    if name not in TRAINING_PRESETS:
        raise KDCacheError(f"--preset {preset!r} is not one of auto, {', '.join(TRAINING_PRESETS)}")
    return name


@dataclass
class Settings:
    """A run's resolved values and how they were chosen: the preset and why, and what was fitted to the run's
    length (`scaled`: one phrase per change; empty when nothing was)."""

    preset: str
    values: dict[str, Any]
    reason: str
    scaled: list[str]
    preset_epochs: int

    def line(self, method: str) -> str:
        """The one line `train` and `distill` print at the start: what the run will use, and why."""
        v = self.values
        parts = [f"{v['optimizer']} lr {v['lr']:g}", f"{v['epochs']} epochs", f"batch {v['batch_size']}",
                 f"{v['lr_schedule']} LR" + (f", warm-up {v['warmup_ratio']:g}" if v["warmup_ratio"] else ""),
                 f"weight decay {v['weight_decay']:g}",
                 f"clip {v['max_grad_norm']:g}" if v["max_grad_norm"] else "no clipping"]
        own = [f"{k} {v[k]}" for k in ("t_max", "psi", "margin", "temperature", "alpha", "anneal_epochs")
               if v.get(k) is not None]
        text = f"settings: preset {self.preset} ({self.reason}): {', '.join(parts)}"
        if own:
            text += f"; {method}: {', '.join(own)}"
        if self.scaled:
            text += (f"; schedules fitted to {v['epochs']} epochs (the preset's are for {self.preset_epochs}): "
                     f"{', '.join(self.scaled)}" + ("" if method == "annealing" else
                                                   " (--absolute-schedules keeps the preset's)"))
        return text

    def record(self) -> dict[str, Any]:
        """What summary.json keeps of it."""
        return {"preset_reason": self.reason,
                "schedules_scaled": {"preset_epochs": self.preset_epochs, "epochs": int(self.values["epochs"]),
                                     "changes": self.scaled} if self.scaled else None}


def settings(preset: str, modality: str, method: Any, cfg: DistillConfig, family: str | None = None) -> Settings:
    """The preset's training values and the method's own defaults, with every flag the user gave (not None) on top;
    then the method's schedules fitted to the run's length unless --absolute-schedules (each method's
    `fit_schedules`: the paper's shape at any n, T reaching 1). The tables themselves are never modified."""
    name = preset_name(preset, modality, family)
    reason = auto_preset(modality, family)[1] if preset == "auto" else "--preset"
    values = {**TRAINING_PRESETS[name], **method.preset_defaults(name), "anneal_epochs": None}
    given = frozenset(k for k in HYPERPARAMETERS if getattr(cfg, k) is not None)
    values.update({k: getattr(cfg, k) for k in given})
    if int(values["epochs"]) < 1 or int(values["batch_size"]) < 1:
        raise KDCacheError("--epochs and --batch-size must be at least 1")
    if cfg.schedule_unit not in ("epoch", "step"):
        raise KDCacheError(f"--schedule-unit {cfg.schedule_unit!r} is not one of epoch, step")
    preset_epochs = int(TRAINING_PRESETS[name]["epochs"])
    scaled = method.fit_schedules(values, given, preset_epochs, bool(cfg.absolute_schedules))
    return Settings(name, values, reason, scaled, preset_epochs)


def resolve(preset: str, modality: str, method: Any, cfg: DistillConfig,
            family: str | None = None) -> tuple[str, dict[str, Any]]:
    """(preset name, values) of `settings`."""
    chosen = settings(preset, modality, method, cfg, family)
    return chosen.preset, chosen.values


__all__ = ["AUTO_BY_MODEL", "AUTO_PRESET", "DistillConfig", "HYPERPARAMETERS", "NOT_IDENTITY", "Settings",
           "TRAINING_PRESETS", "auto_preset", "preset_name", "resolve", "settings"]
