"""Short runs as a new user starts them (issue 21, point 6): the default method against vanilla KD and CE at 3-5
epochs, every other value left to `--preset auto`, on the data these machines have.

    python benchmarks/short_runs.py digits|mnist1d|cifar10 [--epochs 5] [--seeds 5] [--cifar-cache C] [--out DIR]

Each task: a teacher trained with `kdcache train` at its defaults (digits, MNIST-1D; CIFAR-10 reuses the teacher
cache of `reproduce.py vision --scale cpu`, passed as --cifar-cache), cached once, then `kdcache distill --epochs N`
with nothing else but the student: `continuation` (the default method, its schedules fitted to N epochs),
`continuation-absolute` (the same with `--absolute-schedules`: the preset's schedules in the paper's absolute
epochs, as every release before issue 21 ran them), `vanilla` and `ce`. Writes reproduce.py's results.csv,
summary.md (seed-paired tests) and commands.txt under benchmarks/results/short-runs-TASK/.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import reproduce  # noqa: E402
from reproduce import DATA, REPO, Runner, distill_methods, write_results  # noqa: E402

METHODS = ("ce", "vanilla", "continuation-absolute", "continuation")
STUDENT_MLP = ["--student", "mlp", "--student-kwargs", json.dumps({"hidden": 32, "depth": 1})]


def _mnist1d(folder: Path) -> Path:
    """MNIST-1D's frozen pickle as the `tabular` task's npz files (train 4,000 rows, test 1,000)."""
    import numpy as np

    raw = pickle.load(open(DATA / "mnist1d" / "mnist1d_data.pkl", "rb"))
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "train.npz", x=raw["x"].astype("float32"), y=raw["y"].astype("int64"))
    np.savez(folder / "test.npz", x=raw["x_test"].astype("float32"), y=raw["y_test"].astype("int64"))
    return folder


def run(task: str, epochs: int, seeds: int, out: Path, cifar_cache: Path | None, in_process: bool) -> str:
    kd = Runner(out, "cpu", in_process=in_process)
    notes, report = [], []
    if task == "cifar10":
        if cifar_cache is None:
            raise SystemExit("cifar10: pass --cifar-cache, the teacher.kdcache of reproduce.py vision --scale cpu")
        cache, student = cifar_cache, ["--student", "resnet8"]
        report = ["--report-split", "test"]
        notes.append(f"Teacher cache {cifar_cache} (reproduce.py vision --scale cpu: ResNet-20 on 3,000 images, 500 "
                     "held out for selection, 3,500 test images reported); students ResNet-8.")
    else:
        if task == "digits":
            data, held, splits = ["--task", "digits"], [], ["--split", "train", "--split", "validation"]
        else:
            data = ["--task", "tabular", "--data", _mnist1d(out / "data")]
            held = ["--holdout", 500]
            splits = ["--split", "train", "--split", "validation", "--split", "test"]
            report = ["--report-split", "test"]
        seconds = kd("train", "--model", "mlp", *data, *held, "--out", out / "teacher", "--no-progress",
                     "--overwrite", "--device", "cpu")
        teacher = kd.summary(out / "teacher")
        cache = out / "teacher.kdcache"
        kd("cache-teacher", "--teacher", out / "teacher" / "best", *data, *held, *splits, "--out", cache,
           "--no-progress", "--overwrite", "--device", "cpu")
        student = STUDENT_MLP
        notes.append(f"Teacher `kdcache train --model mlp` at its defaults (preset {teacher['preset']}, "
                     f"{teacher['epochs']} epochs): validation {teacher['metric_name']} {teacher['best_metric']:.4f} "
                     f"({seconds:.0f} s); students MLP, one hidden layer of 32.")
    flags = {"all": report}
    results = distill_methods(kd, cache=cache, student=student, work=out, seeds=seeds, epochs=epochs, flags=flags,
                              takd=None, methods=METHODS)
    notes.append(f"Every student: `kdcache distill --epochs {epochs}` and the student, nothing else (`--preset "
                 "auto`); continuation-absolute adds `--absolute-schedules`. Selected on the validation split"
                 + (", scored on test." if report else " (digits has no test split)."))
    return write_results(out, f"Short runs, {task}: {epochs} epochs at the defaults", results, notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=["digits", "mnist1d", "cifar10"])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--cifar-cache", type=Path)
    parser.add_argument("--in-process", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    out = args.out or REPO / "benchmarks" / "results" / f"short-runs-{args.task}"
    start = time.perf_counter()
    text = run(args.task, args.epochs, args.seeds, out, args.cifar_cache, args.in_process)
    text += (f"\nCommand: `python benchmarks/short_runs.py {' '.join(sys.argv[1:])}`; "
             f"{(time.perf_counter() - start) / 60:.1f} min in all (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}).\n")
    (out / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
