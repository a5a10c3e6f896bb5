"""The main job on the embedded default: scikit-learn's bundled digits, no files or downloads needed.

Trains a small MLP teacher (saving a checkpoint every few epochs), saves it as a kdcache model folder, caches
for both splits its logits, its checkpoints' logits (Pro-KD) and a random projection of its last hidden layer
(curriculum extraction), then trains one narrow MLP student per method against that one cache (and one from
scratch with `train`, no cache), and returns a table of validation accuracy and time, the whole pipeline in
about a minute on a CPU.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from kdcache.data import load_split
from kdcache.errors import KDCacheError
from kdcache.cache.info import describe_cache
from kdcache.models import build_model
from kdcache.cache import open_cache
from kdcache.recipes.cache_teacher import CacheTeacherConfig, cache_teacher
from kdcache.recipes.distill import DistillConfig, distill
from kdcache.models import CHECKPOINT_FILE, save_model_dir

TEACHER_ARCH = "mlp"
TEACHER_KWARGS = {"in_features": 64, "hidden": 256, "depth": 2}
STUDENT_ARCH = "mlp"
STUDENT_KWARGS = {"in_features": 64, "hidden": 32, "depth": 1}
#: Student settings for the demo (the `small` preset, with a shorter run at a higher rate: digits is tiny).
STUDENT_FLAGS = {"epochs": 60, "lr": 3e-3, "batch_size": 32}
DEMO_METHODS = ("ce", "vanilla", "annealing", "continuation", "prokd", "curriculum")
CHECKPOINT_EVERY = 5  # teacher epochs between the checkpoints Pro-KD follows
#: Curriculum extraction: the teacher's last hidden layer, projected to the student's width, fits the student's
#: only hidden layer for a sixth of the run (10 of 60 epochs, through a linear read-out); the rest trains on logits.
HIDDEN = {"hidden_layers": "2", "proj_dim": 32, "proj_seed": 0}


def _accuracy(model: torch.nn.Module, split) -> float:
    batch = split.collate([split.dataset[i] for i in range(len(split))])
    with torch.inference_mode():
        return float((model(split.prepare(batch, torch.device("cpu"))).argmax(1) == batch.labels).float().mean())


def train_digits_teacher(directory: Path, *, epochs: int = 30, seed: int = 0, checkpoint_every: int | None = None) -> float:
    """A few seconds of Adam on the digits train split; returns validation accuracy. With `checkpoint_every`,
    also saves the model every that many epochs before the last under `directory/checkpoints/epoch-NNNN`."""
    torch.manual_seed(seed)
    train, val = load_split("digits", None, "train"), load_split("digits", None, "validation")
    model = build_model(TEACHER_ARCH, 10, **TEACHER_KWARGS)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    batch = train.collate([train.dataset[i] for i in range(len(train))])
    x, y = train.prepare(batch, torch.device("cpu")), batch.labels
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(1, epochs + 1):
        model.train()
        for idx in torch.randperm(len(y), generator=generator).split(64):
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if checkpoint_every and epoch % checkpoint_every == 0 and epoch < epochs:
            model.eval()
            folder = directory / "checkpoints" / f"epoch-{epoch:04d}"
            save_model_dir(model, folder, architecture=TEACHER_ARCH, num_classes=10, label_names=train.label_names,
                           kwargs=TEACHER_KWARGS)
            (folder / CHECKPOINT_FILE).write_text(json.dumps({"epoch": epoch, "metric": _accuracy(model, val)}) + "\n")
    model.eval()
    save_model_dir(model, directory, architecture=TEACHER_ARCH, num_classes=10, label_names=train.label_names,
                   kwargs=TEACHER_KWARGS)
    return _accuracy(model, val)


def run_demo(workdir: Path, *, epochs: int = 30, student_epochs: int | None = None, seed: int = 0,
             console: Console | None = None) -> dict:
    """Teacher -> cache -> one student per method; returns the cache summary and the methods' table."""
    threads = torch.get_num_threads()
    # The demo's models hold a few thousand weights: more than one intra-op thread only adds overhead, and on a
    # busy machine the threads wait on each other (2 cores, load average 10: 582 s with torch's default of 2
    # threads, 66 s with one; docs/benchmarks.md).
    torch.set_num_threads(1)
    try:
        return _run_demo(workdir, epochs=epochs, student_epochs=student_epochs, seed=seed, console=console)
    finally:
        torch.set_num_threads(threads)


def _run_demo(workdir: Path, *, epochs: int, student_epochs: int | None, seed: int, console: Console | None) -> dict:
    console = console or Console()
    workdir = Path(workdir)
    start = time.perf_counter()
    if epochs < 2:
        raise KDCacheError(f"demo: --epochs must be at least 2 (Pro-KD follows a checkpoint saved before the "
                           f"teacher's last epoch), got {epochs}")
    if student_epochs is not None and student_epochs < 2:
        raise KDCacheError(f"demo: --student-epochs must be at least 2 (Annealing-KD has two stages), got {student_epochs}")
    shutil.rmtree(workdir / "teacher" / "checkpoints", ignore_errors=True)  # a rerun's checkpoints, not an older run's
    # every CHECKPOINT_EVERY epochs, at least one checkpoint before the last epoch, and no more checkpoints than
    # Pro-KD has student epochs to follow them
    student_n = student_epochs or STUDENT_FLAGS["epochs"]
    every = max(min(CHECKPOINT_EVERY, epochs - 1), -(-(epochs - 1) // (student_n - 1)))
    accuracy = train_digits_teacher(workdir / "teacher", epochs=epochs, checkpoint_every=every)
    console.print(f"trained teacher ({TEACHER_ARCH} {TEACHER_KWARGS}) in {time.perf_counter() - start:.1f} s: "
                  f"validation accuracy {accuracy:.4f}")
    cache_path = workdir / "digits.kdcache"
    cache_teacher(CacheTeacherConfig(teacher=str(workdir / "teacher"), task="digits", out=cache_path,
                                     splits=("train", "validation"), overwrite=True, progress=False,
                                     checkpoints=(str(workdir / "teacher" / "checkpoints" / "epoch-*"),),
                                     command="kdcache demo", **HIDDEN))
    cache = open_cache(cache_path, split="validation")
    stored = np.asarray(cache.logits[:]).argmax(1)
    agree = float((stored == np.asarray(cache.labels[:])).mean())
    console.print(f"cached logits agree with the labels on {agree:.4f} of validation rows (the teacher's accuracy)")

    flags = {**STUDENT_FLAGS, **({"epochs": student_epochs} if student_epochs else {})}
    rows = []
    runs = [("train (no cache)", "scratch", None, "ce")] + [(f"distill {m}", m, cache_path, m) for m in DEMO_METHODS]
    for label, folder, cache_arg, method in runs:
        summary = distill(DistillConfig(
            student=STUDENT_ARCH, student_kwargs=STUDENT_KWARGS, cache=cache_arg, task="digits", method=method,
            out=workdir / "runs" / folder, overwrite=True,
            progress=False, seed=seed, device="cpu", command="kdcache demo", **flags,
            **({"phase_epochs": str(max(1, flags["epochs"] // 6))} if method == "curriculum" else {})))
        rows.append({"run": label, "method": method, "best_accuracy": summary["best_metric"],
                     "best_epoch": summary["best_epoch"], "last_accuracy": summary["last_metric"],
                     "seconds": summary["wall_seconds"], "samples_per_second": summary["samples_per_second"]})
    return {"cache": describe_cache(cache_path), "teacher_accuracy": accuracy, "student": STUDENT_KWARGS,
            "epochs": flags["epochs"], "runs": rows}
