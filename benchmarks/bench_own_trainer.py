"""KDTrainer (Hugging Face's Trainer, examples/hf_trainer_sst2.py) against `kdcache distill` on the same student,
cache and flags, seed by seed: dev accuracy at the best epoch and training samples/s (issue 25, point 5).

    python benchmarks/bench_own_trainer.py --cache teacher.kdcache --data glue/SST-2 --student MINILM \\
        --seeds 5 --out benchmarks/results/own-trainer-sst2-cpu

The cache and the flags are those of `reproduce.py glue --task sst2 --scale cpu` (1,000 training rows, max length
64; students the encoder's first 2 layers; 8 epochs, batch 32, AdamW 5e-5, Continuation-KD with T_max 8 and psi
linear:5). Each run is a fresh process; results.csv grows run by run, so a cut run keeps what finished.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def distill(args: argparse.Namespace, seed: int) -> tuple[float, float, float]:
    out = args.out / f"distill-{seed}"
    started = time.perf_counter()
    subprocess.run([str(Path(sys.executable).with_name("kdcache")), "distill", "--cache", args.cache, "--student",
                    args.student, "--student-layers", "2", "--method", "continuation", "--t-max", "8", "--psi",
                    "linear:5", "--epochs", "8", "--batch-size", "32", "--lr", "5e-5", "--seed", str(seed), "--out",
                    str(out), "--device", "cpu", "--no-progress", "--overwrite"], check=True)
    summary = json.loads((out / "summary.json").read_text())
    return summary["best_metric"], summary["samples_per_second"], time.perf_counter() - started


def trainer(args: argparse.Namespace, seed: int) -> tuple[float, float, float]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(REPO / "examples" / "hf_trainer_sst2.py"), "--cache", args.cache,
                           "--data", args.data, "--student", args.student, "--layers", "2", "--epochs", "8",
                           "--batch-size", "32", "--lr", "5e-5", "--t-max", "8", "--psi", "linear:5", "--seed",
                           str(seed), "--out", str(args.out / f"trainer-{seed}")],
                          check=True, capture_output=True, text=True)
    best = float(re.search(r"^best validation accuracy ([0-9.]+)", done.stdout, re.M).group(1))
    rate = float(re.search(r"^train samples/s ([0-9.]+)", done.stdout, re.M).group(1))
    return best, rate, time.perf_counter() - started


def summarise(rows: list[dict]) -> str:
    from scipy import stats

    lines = ["| loop | seeds | dev accuracy, best epoch (mean ± sd) | training samples/s (mean) | wall s / run |",
             "|---|---|---|---|---|"]
    by = {loop: [r for r in rows if r["loop"] == loop] for loop in ("distill", "KDTrainer")}
    for loop, runs in by.items():
        if runs:
            acc = [float(r["best"]) for r in runs]
            sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
            lines.append(f"| {loop} | {len(runs)} | {statistics.mean(acc):.4f} ± {sd:.4f} | "
                         f"{statistics.mean(float(r['samples_per_second']) for r in runs):.1f} | "
                         f"{statistics.mean(float(r['seconds']) for r in runs):.0f} |")
    seeds = sorted({r["seed"] for r in by["distill"]} & {r["seed"] for r in by["KDTrainer"]})
    if len(seeds) > 1:
        a = [float(next(r["best"] for r in by["KDTrainer"] if r["seed"] == s)) for s in seeds]
        b = [float(next(r["best"] for r in by["distill"] if r["seed"] == s)) for s in seeds]
        test = stats.ttest_rel(a, b)
        wins = sum(x > y for x, y in zip(a, b))
        lines.append("")
        lines.append(f"KDTrainer minus distill, paired by seed: {statistics.mean(x - y for x, y in zip(a, b)):+.4f} "
                     f"(paired t-test p {test.pvalue:.2f}; KDTrainer ahead on {wins} of {len(seeds)} seeds)")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--student", required=True)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    table = args.out / "results.csv"
    rows = list(csv.DictReader(open(table))) if table.is_file() else []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for loop, run in (("distill", distill), ("KDTrainer", trainer)):
            if any(r["loop"] == loop and int(r["seed"]) == seed for r in rows):
                continue
            best, rate, seconds = run(args, seed)
            rows.append({"loop": loop, "seed": seed, "best": best, "samples_per_second": rate, "seconds": seconds})
            with open(table, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
            print(f"{loop} seed {seed}: best {best:.4f}, {rate:.1f} samples/s, {seconds:.0f} s", flush=True)
    (args.out / "summary.md").write_text(summarise(rows))
    print(summarise(rows))


if __name__ == "__main__":
    main()
