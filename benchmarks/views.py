"""Issue 23's measurement: does a student taught on the teacher's own augmented views (replayed exactly) beat one
taught on fresh views against the plain image's logits? CIFAR-10 JPEG, through the CLI, seed-paired.

    python benchmarks/reproduce.py views [--scale tiny|cpu|full] [--seeds 5] [--views 4,16] [--kd-method continuation]
        [--view-augment cifar|cifar+mixup|cifar+cutmix]

Arms, every one the same student, method, epochs, batch and learning rate (the vision experiment's scale):
- `none`: the plain cache, no augmentation;
- `fresh`: the plain cache, `--augment cifar` (random crops and flips against the plain image's logits);
- `views-V`: a `--views V --augment cifar` cache, the student replaying view e mod V in epoch e against that view's
  target (one cache per V).
The teacher trains as the vision experiment's does (the students' rows, `--augment cifar`). The summary adds, per
arm, the distill samples/s against `none`, and per views cache its capture time and stored bytes per sample per view.
"""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

from reproduce import VISION_SCALES, DATA, Result, RESULT_COLUMNS, Runner, _row, write_results

DEFAULT_VIEWS = (4, 16)


def _stored_bytes(cache: Path, split: str, prefix: str) -> int:
    """Bytes on disk of a split's arrays whose names start with `prefix` (their chunk files and metadata)."""
    return sum(p.stat().st_size for folder in (cache / split).iterdir() if folder.is_dir()
               and folder.name.startswith(prefix) for p in folder.rglob("*") if p.is_file())


def views(kd: Runner, scale: str, seeds: int, view_counts: tuple[int, ...] = DEFAULT_VIEWS,
          method: str = "continuation", first_seed: int = 0, view_augment: str = "cifar") -> str:
    """Teacher -> a plain cache and one views cache per V -> the arms above, seed by seed."""
    s = VISION_SCALES[scale]
    data = ["--task", "imagefolder", "--data", DATA / "cifar10-jpg" / "cifar10-jpg-d7d0561.zip", "--normalize",
            "cifar10"]
    subset = ["--subset", s["rows"]] if s["rows"] < 50000 else []
    work = kd.out
    teacher_dir = work / "teacher"
    teacher_seconds = kd("train", "--model", s["teacher"], *data, *subset, "--holdout", s["holdout"], "--augment",
                         "cifar", "--epochs", s["teacher_epochs"], "--batch-size", s["batch"], "--lr", s["lr"],
                         "--out", teacher_dir, "--device", kd.device, "--no-progress", "--overwrite")
    held = ["--holdout", s["holdout"], "--split", "train", "--split", "validation", "--split", "test"]
    caches = {"plain": work / "plain.kdcache"}
    capture = {"plain": kd("cache-teacher", "--teacher", teacher_dir / "best", *data, *subset, *held, "--out",
                           caches["plain"], "--device", kd.device, "--no-progress", "--overwrite")}
    for v in view_counts:
        caches[f"views-{v}"] = work / f"views-{v}.kdcache"
        capture[f"views-{v}"] = kd("cache-teacher", "--teacher", teacher_dir / "best", *data, *subset, *held,
                                   "--views", v, "--augment", view_augment, "--out", caches[f"views-{v}"], "--device",
                                   kd.device, "--no-progress", "--overwrite")
    arms = {"none": (caches["plain"], []), "fresh": (caches["plain"], ["--augment", "cifar"]),
            **{f"views-{v}": (caches[f"views-{v}"], []) for v in view_counts}}
    n = s["epochs"]
    common = ["--method", method, "--epochs", n, "--batch-size", s["batch"], "--lr", s["lr"], "--report-split", "test",
              "--device", kd.device, "--no-progress", "--overwrite"]
    results, speed = [], {arm: [] for arm in arms}
    with open(work / "results.csv", "w", newline="") as f:
        csv.writer(f).writerow(RESULT_COLUMNS)
    for seed in range(first_seed, first_seed + seeds):
        for arm, (cache, flags) in arms.items():
            run = work / f"{arm}-seed{seed}"
            seconds = kd("distill", "--cache", cache, "--student", "resnet8", "--out", run, "--seed", seed, *common,
                         *flags)
            summary = kd.summary(run)
            speed[arm].append(float(summary["samples_per_second"]))
            results.append(Result(arm, seed, summary["best_metric"], summary["last_metric"], seconds,
                                  summary["metric_name"], test=summary.get("report_metric_at_best")))
            with open(work / "results.csv", "a", newline="") as f:
                csv.writer(f).writerow(_row(results[-1]))
            print(f"  {arm:10s} seed {seed}: best {summary['best_metric']:.4f} test "
                  f"{summary.get('report_metric_at_best')} ({seconds:.0f} s)", flush=True)
    rows = s["rows"] - s["holdout"]
    base = statistics.mean(speed["none"])
    notes = [f"Teacher {s['teacher']} trained on the students' {rows} training images with random crops and flips "
             f"({teacher_seconds:.0f} s); ResNet-8 students, --method {method}, {n} epochs, batch {s['batch']}, lr "
             f"{s['lr']}; best epoch selected on the {s['holdout']} held-out validation images, its test accuracy "
             "reported (`--report-split test`).",
             "Distill samples/s (mean over seeds; against `none`): " + ", ".join(
                 f"{arm} {statistics.mean(v):,.0f} ({statistics.mean(v) / base:.2f}x)" for arm, v in speed.items())
             + ".",
             "Capture: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in capture.items()) + "; stored "
             "bytes per training sample per view (view arrays and parameters): " + ", ".join(
                 f"V = {v}: {_stored_bytes(caches[f'views-{v}'], 'train', 'view_') / (rows * v):.1f}"
                 for v in view_counts)
             + f"; the plain target: {_stored_bytes(caches['plain'], 'train', 'logits') / rows:.1f}.",
             f"Views cached with --augment {view_augment}. Epochs / V: "
             + ", ".join(f"V = {v}: {n / v:g}" for v in view_counts) + "."]
    return write_results(work, f"CIFAR-10 ({scale} scale): consistent replayed views against fresh augmentation",
                         results, notes)


__all__ = ["DEFAULT_VIEWS", "views"]
