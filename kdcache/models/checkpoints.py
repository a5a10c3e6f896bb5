"""A teacher's training checkpoints (Pro-KD): found by folder or glob, put in training order, checked to be one run.

A checkpoint folder is any teacher folder; its epoch and validation metric come from the kdcache-checkpoint.json
that `train --save-every` writes beside it, else the epoch is the last number in the folder's name.
"""

from __future__ import annotations

import glob
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdcache.errors import KDCacheError
from kdcache.models.teachers import CHECKPOINT_FILE, Teacher, load_teacher


@dataclass
class TeacherCheckpoint:
    """One teacher checkpoint: its loaded model and what the cache records about it."""

    teacher: Teacher
    name: str
    epoch: int | None
    metric: float | None


def expand_checkpoints(patterns: tuple[str, ...]) -> list[Path]:
    """Folders named by `--checkpoints` (paths or glob patterns), each pattern sorted, duplicates dropped."""
    found: list[Path] = []
    for pattern in patterns:
        matches = [Path(p) for p in sorted(glob.glob(pattern))] if glob.has_magic(pattern) else [Path(pattern)]
        if not matches or not all(m.exists() for m in matches):
            raise KDCacheError(f"--checkpoints {pattern!r}: matches no folder")
        found += [m for m in matches if m.resolve() not in {f.resolve() for f in found}]
    return found


def checkpoint_name(path: Path) -> str:
    return path.name or str(path)


def checkpoint_meta(path: Path) -> dict[str, Any]:
    """Epoch and validation metric of a checkpoint folder: from its kdcache-checkpoint.json (written by
    `train --save-every`), else the epoch is the last number in the folder's name (epoch-12, checkpoint-3000)."""
    meta: dict[str, Any] = {"epoch": None, "metric": None}
    if not path.is_dir():  # an architecture-name teacher: nothing recorded, and its name is no epoch
        return meta
    marker = path / CHECKPOINT_FILE
    if marker.is_file():
        try:
            recorded = json.loads(marker.read_text())
        except (OSError, ValueError) as exc:
            raise KDCacheError(f"{marker}: unreadable checkpoint description ({exc})") from exc
        meta.update({k: recorded.get(k) for k in ("epoch", "metric")})
    if meta["epoch"] is None:
        numbers = re.findall(r"\d+", path.name)
        meta["epoch"] = int(numbers[-1]) if numbers else None
    return meta


def load_checkpoints(folders: list[Path], tokenizer: str | None, trust_model_code: bool,
                     causal_lm: bool = False) -> list[TeacherCheckpoint]:
    """Load every checkpoint and put them in training order: by epoch when every one has an epoch, else as given.
    `causal_lm`: each is a Hugging Face causal language model (`--task lm`)."""
    loaded = []
    for folder in folders:
        if not folder.is_dir():
            raise KDCacheError(f"{folder}: a checkpoint must be a model folder")
        meta = checkpoint_meta(folder)
        teacher = load_teacher(str(folder), tokenizer=tokenizer, trust_model_code=trust_model_code, causal_lm=causal_lm)
        loaded.append(TeacherCheckpoint(teacher, checkpoint_name(folder), meta["epoch"], meta["metric"]))
    if loaded and all(c.epoch is not None for c in loaded):
        loaded.sort(key=lambda c: c.epoch)
    return loaded


def check_unique_names(named: list[tuple[str, str]]) -> None:
    """(name, folder) pairs: two folders with one name would make `--checkpoint NAME` ambiguous."""
    seen: dict[str, str] = {}
    for name, spec in named:
        if name in seen:
            raise KDCacheError(f"checkpoints {seen[name]} and {spec} share the name {name!r}; "
                               "--checkpoint NAME could not tell them apart (rename one folder)")
        seen[name] = spec


def check_same_architecture(checkpoint: Teacher, teacher: Teacher) -> None:
    """Checkpoints of one training run share the teacher's architecture: same class, same tensor names and shapes."""
    mine = {k: tuple(v.shape) for k, v in checkpoint.model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in teacher.model.state_dict().items()}
    if type(checkpoint.model) is not type(teacher.model) or mine != theirs:
        differ = next((k for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)), None)
        detail = (f"{type(checkpoint.model).__name__} vs {type(teacher.model).__name__}"
                  if type(checkpoint.model) is not type(teacher.model)
                  else f"{differ}: {mine.get(differ, 'absent')} vs {theirs.get(differ, 'absent')}")
        raise KDCacheError(f"{checkpoint.spec}: checkpoint has another architecture than teacher {teacher.spec} "
                           f"({detail}); checkpoints must come from one training run")

__all__ = ["TeacherCheckpoint", "check_same_architecture", "check_unique_names", "checkpoint_meta", "checkpoint_name",
           "expand_checkpoints", "load_checkpoints"]
