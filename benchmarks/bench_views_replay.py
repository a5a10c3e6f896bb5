"""What replaying cached views costs the student loop (issue 23's goal: at most 5% against fresh augmentation, on
CPU): training samples/s of the same student on the same images, the arms run back to back and interleaved.

    OMP_NUM_THREADS=1 python benchmarks/bench_views_replay.py --plain PLAIN.kdcache --views V4.kdcache,V16.kdcache \
        [--epochs 2] [--repeats 3] [--student resnet8] [--batch-size 64]

Arms: `none` (the plain cache, no augmentation), `fresh` (the plain cache, `--augment cifar`), and each views cache
(its view e mod V in epoch e, replayed from the stored parameters). Every run is `kdcache distill --method
continuation --seed 0` for `--epochs`; its `samples_per_second` counts the training steps alone (evaluation
excluded). Each round runs every arm once, in turn; the table gives each arm's median over the rounds and its
ratio to `fresh` and to `none`. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def one_run(cache: Path, out: Path, flags: list[str], args: argparse.Namespace) -> float:
    """Training samples/s of one short distill run."""
    command = [sys.executable, "-m", "kdcache.cli", "distill", "--cache", str(cache), "--student", args.student,
               "--method", "continuation", "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
               "--lr", "0.1", "--seed", "0", "--device", "cpu", "--no-progress", "--overwrite", "--out", str(out),
               *flags]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{done.stderr[-2000:]}")
    return float(json.loads((out / "summary.json").read_text())["samples_per_second"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plain", type=Path, required=True)
    parser.add_argument("--views", required=True, help="comma-separated views caches")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--student", default="resnet8")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    arms = {"none": (args.plain, []), "fresh": (args.plain, ["--augment", "cifar"])}
    arms.update({Path(v).name.removesuffix(".kdcache"): (Path(v), []) for v in args.views.split(",") if v})
    rates: dict[str, list[float]] = {arm: [] for arm in arms}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for arm, (cache, flags) in arms.items():
                rates[arm].append(one_run(cache, Path(tmp) / arm, flags, args))
    fresh, none = statistics.median(rates["fresh"]), statistics.median(rates["none"])
    print(f"{args.student}, {args.epochs} epochs, batch {args.batch_size}; median of {args.repeats} interleaved "
          "rounds\n")
    print("| arm | training samples/s (each round) | median | vs fresh | vs none |\n|---|---|---|---|---|")
    for arm, values in rates.items():
        median = statistics.median(values)
        print(f"| {arm} | {', '.join(f'{v:,.0f}' for v in values)} | {median:,.0f} | {median / fresh:.3f}x | "
              f"{median / none:.3f}x |")


if __name__ == "__main__":
    main()
