"""Sparse parity: one-shot distillation vs Pro-KD (cached teacher checkpoints) vs curriculum extraction (cached
hidden projections), the setting of the curriculum-extraction paper (Gupta & Karmalkar), with kdcache's CLI.

    python benchmarks/sparse_parity.py [--scale tiny|cpu] [--seeds 3] [--out benchmarks/results/sparse-parity-cpu]

Task: x uniform on {-1, +1}^n, label 1 when the product of the first k coordinates is +1, else 0 (the support
is the first k coordinates; no model is told so). One draw of the data (numpy default_rng(0)) for every run:
N training rows and 2,000 validation rows, written as task `tabular` (.npz).

Teacher: a wide two-layer MLP (`mlp`, depth 1: n -> width -> 2, ReLU), trained on the labels with `kdcache train`
(SGD momentum 0.9, lr 0.05, batch 64, constant lr), saving a checkpoint every epoch (`--save-every 1`). One
cache holds everything the students need: `kdcache cache-teacher --checkpoints 'teacher/checkpoints/epoch-*'
--hidden-layers 1 --proj-dim D` (the checkpoints' logits, and the final teacher's hidden layer projected to D =
the student's width). Students: a narrow two-layer MLP (n -> width_s -> 2), same optimiser, one seed per run
(initialisation and batch order), trained for E epochs through `kdcache distill`:

- `labels`: `--method ce`, the hard labels only (no teacher): the baseline;
- `one-shot`: `--method vanilla --alpha 0 --temperature 1`, the final teacher's softmax only;
- `prokd`: `--method prokd`, the same KD loss against checkpoint 1, 2, ..., K in turn (K equal blocks of epochs,
  the final teacher last);
- `prokd-1ep`: the same cache and loss, one epoch per checkpoint (`--phase-epochs 1`), the final teacher taking
  every remaining epoch: the teacher's path walked quickly rather than in equal blocks;
- `prokd-late`: the same from a second cache holding only the later half of the checkpoints (the teacher's
  epochs K/2+1 .. K): which checkpoints to follow is the user's choice (`--checkpoints` takes a list), and early
  checkpoints of a teacher that has not yet left chance level have nothing to teach;
- `curriculum`: `--method curriculum --phase-epochs P`, P epochs fitting the student's hidden layer (through a
  linear read-out) to the projection of the teacher's hidden layer, then the same KD loss on the final logits.

Every run is evaluated after every epoch; "samples seen" = epochs x N (the projection epochs count too). The
table gives, per method, the validation accuracy at the end, the best one, and the samples seen until the
accuracy first reaches 90% (mean over the seeds that reach it, and how many did); the plot shows the accuracy
against samples seen (mean over seeds, band = min..max). Scales: `tiny` (seconds, CI), `cpu` (minutes on the
2-core CPU machine; the largest (n, k) whose teacher learns there in about a minute).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from reproduce import REPO, Runner  # noqa: E402

SCALES = {
    "tiny": {"n": 12, "k": 2, "rows": 512, "teacher_width": 64, "teacher_epochs": 3, "student_width": 8, "epochs": 4,
             "phase_epochs": 1},
    "cpu": {"n": 50, "k": 5, "rows": 30000, "teacher_width": 1000, "teacher_epochs": 8, "student_width": 32,
            "epochs": 30, "phase_epochs": 3},
}
METHODS = ("labels", "one-shot", "prokd", "prokd-1ep", "prokd-late", "curriculum")
TARGET = 0.9
SGD = ["--optimizer", "sgd", "--momentum", "0.9", "--lr", "0.05", "--batch-size", "64", "--lr-schedule", "constant",
       "--weight-decay", "0", "--max-grad-norm", "0"]


def write_data(folder: Path, n: int, k: int, rows: int) -> None:
    """train.npz and validation.npz: x in {-1, +1}^n (float32), y = 1 when the first k coordinates multiply to +1."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for split, size in (("train", rows), ("validation", 2000)):
        x = rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=(size, n))
        y = (np.prod(x[:, :k], axis=1) > 0).astype(np.int64)
        np.savez(folder / f"{split}.npz", x=x, y=y)


def _curve(run_dir: Path) -> list[float]:
    return [json.loads(line)["metric"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run(kd: Runner, scale: str, seeds: int) -> str:
    s = SCALES[scale]
    work = kd.out
    write_data(work / "data", s["n"], s["k"], s["rows"])
    data = ["--task", "tabular", "--data", work / "data"]
    model = {"in_features": s["n"], "depth": 1}
    teacher_seconds = kd("train", "--model", "mlp", "--model-kwargs", json.dumps({**model, "hidden": s["teacher_width"]}),
                         *data, "--epochs", s["teacher_epochs"], *SGD, "--save-every", 1, "--out", work / "teacher",
                         "--device", kd.device, "--no-progress", "--overwrite")
    teacher_curve = _curve(work / "teacher")
    cache = work / "teacher.kdcache"
    cache_seconds = kd("cache-teacher", "--checkpoints", work / "teacher" / "checkpoints" / "epoch-*", *data,
                       "--split", "train", "--split", "validation", "--hidden-layers", 1, "--proj-dim",
                       s["student_width"], "--proj-seed", 0, "--dtype", "float32", "--out", cache, "--device",
                       kd.device, "--no-progress", "--overwrite")
    late = [work / "teacher" / "checkpoints" / f"epoch-{e:04d}"
            for e in range(s["teacher_epochs"] // 2 + 1, s["teacher_epochs"] + 1)]
    late_cache = work / "teacher-late.kdcache"
    kd("cache-teacher", *(a for folder in late for a in ("--checkpoints", folder)), *data, "--split", "train",
       "--split", "validation", "--dtype", "float32", "--out", late_cache, "--device", kd.device, "--no-progress",
       "--overwrite")
    student = ["--student", "mlp", "--student-kwargs", json.dumps({**model, "hidden": s["student_width"]})]
    kd_loss = ["--alpha", "0", "--temperature", "1"]
    flags = {"labels": ["--method", "ce"], "one-shot": ["--method", "vanilla", *kd_loss],
             "prokd": ["--method", "prokd", *kd_loss], "prokd-late": ["--method", "prokd", *kd_loss],
             "prokd-1ep": ["--method", "prokd", "--phase-epochs", 1, *kd_loss],
             "curriculum": ["--method", "curriculum", "--phase-epochs", s["phase_epochs"], *kd_loss]}
    rows, curves = [], {m: [] for m in METHODS}
    for seed in range(seeds):
        for method in METHODS:
            out = work / f"{method}-seed{seed}"
            source = late_cache if method == "prokd-late" else cache
            seconds = kd("distill", "--cache", source, *student, *flags[method], "--epochs", s["epochs"], *SGD,
                         "--seed", seed, "--out", out, "--device", kd.device, "--no-progress", "--overwrite")
            curve = _curve(out)
            curves[method].append(curve)
            reached = next((e + 1 for e, acc in enumerate(curve) if acc >= TARGET), None)
            rows.append({"method": method, "seed": seed, "final": curve[-1], "best": max(curve),
                         "samples_to_target": reached * s["rows"] if reached else None, "seconds": round(seconds, 1)})
            print(f"  {method:11} seed {seed}: final {curve[-1]:.3f} best {max(curve):.3f} "
                  f"{TARGET:.0%} at {rows[-1]['samples_to_target']} samples ({seconds:.0f} s)", flush=True)
    _write_csvs(work, rows, curves, s["rows"])
    _plot(work / "sparse_parity.png", curves, s, teacher_curve)
    return _table(rows, s, teacher_curve, teacher_seconds, cache_seconds, seeds)


def _write_csvs(work: Path, rows: list[dict], curves: dict[str, list[list[float]]], n_rows: int) -> None:
    with open(work / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(work / "curves.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "seed", "epoch", "samples_seen", "accuracy"])
        for method, per_seed in curves.items():
            for seed, curve in enumerate(per_seed):
                writer.writerows([method, seed, e + 1, (e + 1) * n_rows, f"{acc:.4f}"] for e, acc in enumerate(curve))


def _stat(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"


def _table(rows: list[dict], s: dict, teacher_curve: list[float], teacher_seconds: float, cache_seconds: float,
           seeds: int) -> str:
    lines = [f"**Sparse parity (n = {s['n']}, k = {s['k']}): students of width {s['student_width']} from a width-"
             f"{s['teacher_width']} teacher**", "",
             f"| method | final accuracy | best accuracy | samples to {TARGET:.0%} (mean of seeds that reach it) | "
             f"seeds reaching {TARGET:.0%} | s / run |", "|---|---|---|---|---|---|"]
    for method in METHODS:
        mine = [r for r in rows if r["method"] == method]
        reached = [r["samples_to_target"] for r in mine if r["samples_to_target"]]
        lines.append(f"| {method} | {_stat([r['final'] for r in mine])} | {_stat([r['best'] for r in mine])} | "
                     f"{f'{statistics.mean(reached):,.0f}' if reached else 'never'} | {len(reached)}/{len(mine)} | "
                     f"{statistics.mean(r['seconds'] for r in mine):.0f} |")
    first = next((e + 1 for e, acc in enumerate(teacher_curve) if acc >= TARGET), None)
    lines += ["", f"Data: {s['rows']:,} training rows (one epoch = {s['rows']:,} samples seen), 2,000 validation rows; "
              f"{seeds} seeds. Teacher: validation accuracy by epoch "
              f"{', '.join(f'{a:.2f}' for a in teacher_curve)} ({TARGET:.0%} first at epoch {first}; "
              f"{teacher_seconds:.0f} s); cache (logits of {s['teacher_epochs']} checkpoints, hidden layer projected to "
              f"{s['student_width']}) {cache_seconds:.0f} s. Students: {s['epochs']} epochs; curriculum: "
              f"{s['phase_epochs']} projection epochs, then the logits; Pro-KD: {s['teacher_epochs']} checkpoints in "
              f"blocks of {s['epochs'] // s['teacher_epochs']} epochs (the final teacher also takes the "
              f"{s['epochs'] % s['teacher_epochs']} left over); Pro-KD 1ep: one epoch on each checkpoint, the final teacher the "
              f"last {s['epochs'] - s['teacher_epochs'] + 1}; Pro-KD late: checkpoints of epochs "
              f"{s['teacher_epochs'] // 2 + 1}-{s['teacher_epochs']}."]
    return "\n".join(lines) + "\n"


def _plot(path: Path, curves: dict[str, list[list[float]]], s: dict, teacher_curve: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for method, per_seed in curves.items():
        a = np.array(per_seed)
        samples = np.arange(1, a.shape[1] + 1) * s["rows"]
        ax.plot(samples, a.mean(axis=0), label=method)
        ax.fill_between(samples, a.min(axis=0), a.max(axis=0), alpha=0.2)
    ax.axhline(TARGET, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("training samples seen")
    ax.set_ylabel("validation accuracy")
    ax.set_title(f"sparse parity n={s['n']}, k={s['k']}: width-{s['student_width']} students "
                 f"(teacher width {s['teacher_width']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    out = args.out or REPO / "benchmarks" / "results" / f"sparse-parity-{args.scale}"
    start = time.perf_counter()
    text = run(Runner(out, args.device), args.scale, args.seeds)
    text += (f"\nCommand: `python benchmarks/sparse_parity.py {' '.join(sys.argv[1:])}`; "
             f"{(time.perf_counter() - start) / 60:.1f} min in all.\n")
    (out / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
