"""Distill samples/s against a sparse cache of a 1000-class teacher, against a dense cache of the same rows.

    PYTHONPATH=benchmarks python benchmarks/bench_sparse_distill.py --images DIR --rows 4096 --epochs 3

DIR holds JPEGs (e.g. tests/fixtures/data/cifar10-jpg unzipped); its first images are tiled to --rows rows of the
`tabular` table bench_target_codecs.py writes. One cache per kind (dense, top-10/32/100, sampled N = 50) is captured
by the random-weight ResNet-18 with 1000 outputs, then the same MLP student (3072 -> 256 -> 1000) is distilled from
each with vanilla KD (top-k: T = 1, the tail as one bucket; sampled: the RS-KD estimator), and continuation from the
dense and top-32 caches. Each distill runs `--repeats` times, interleaved, and the median samples/s of its epochs
(steps only, as summary.json reports them) is taken. Prints a Markdown table with each kind's ratio to dense.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from bench_target_codecs import KINDS, capture, write_table


def tiled(folder: Path, rows: int) -> Path:
    """The table's rows repeated up to `rows` (speed is what is measured, not what is learnt)."""
    with np.load(folder / "train.npz") as table:
        x, y, names = table["x"], table["y"], table["label_names"]
    reps = -(-rows // len(x))
    np.savez(folder / "train.npz", x=np.tile(x, (reps, 1))[:rows], y=np.tile(y, reps)[:rows], label_names=names)
    return folder


def distill(cache: Path, out: Path, method: str, epochs: int) -> float:
    schedule = ["--temperature", "1"] if method == "vanilla" else ["--t-max", "1"]
    args = [sys.executable, "-m", "kdcache", "distill", "--cache", str(cache), "--student", "mlp", "--student-kwargs",
            json.dumps({"hidden": 256, "depth": 1}), "--method", method, "--epochs", str(epochs), *schedule,
            "--out", str(out), "--device", "cpu", "--no-progress", "--overwrite"]
    subprocess.run(args, check=True, capture_output=True, text=True)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(line["samples_per_second"] for line in lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    from bench_target_codecs import resnet18_flat

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        weights = root / "resnet18.pt"
        torch.save(resnet18_flat().state_dict(), weights)
        data = tiled(write_table(args.images, 400, root / "table"), args.rows)
        caches = {kind: root / f"{kind.replace(' ', '').replace('=', '')}.kdcache" for kind in KINDS}
        for kind, flags in KINDS.items():
            capture(data, weights, caches[kind], flags)
        runs = [(kind, "vanilla") for kind in KINDS] + [("dense", "continuation"), ("top-32", "continuation")]
        rates: dict[tuple[str, str], list[float]] = {run: [] for run in runs}
        for _ in range(args.repeats):
            for kind, method in runs:
                rates[(kind, method)].append(distill(caches[kind], root / "run", method, args.epochs))
    print(f"{args.rows} rows, {args.epochs} epochs, {args.repeats} repeats (median), MLP student, CPU, "
          f"{torch.get_num_threads()} threads\n")
    print("| target | method | samples/s | x dense (same method) |")
    print("|---|---|---|---|")
    for kind, method in runs:
        rate = statistics.median(rates[(kind, method)])
        base = statistics.median(rates[("dense", method)])
        print(f"| {kind} | {method} | {rate:,.0f} | {rate / base:.2f} |")


if __name__ == "__main__":
    main()
