"""Smoke test of the noise-toy benchmark (benchmarks/noise_toy.py) at its `tiny` scale, through the real CLI."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import numpy as np

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import reproduce  # noqa: E402
from noise_toy import ROWS, clean_signal, pick_margin, make_data, noise, table_teacher  # noqa: E402


def test_table_teacher_returns_the_noisy_value_of_the_nearest_point():
    import torch

    data = make_data("sine", 50, 10)
    x = np.concatenate([data["train"][0], data["validation"][0]]).astype(np.float32)
    y = np.concatenate([data["train"][1], data["validation"][1]]).astype(np.float32)
    model = table_teacher(rows=len(x))
    model.x.copy_(torch.from_numpy(x))
    model.y.copy_(torch.from_numpy(y))
    out = model(torch.from_numpy(x[:, None]))
    assert out.shape == (60, 1) and np.array_equal(out[:, 0].numpy(), y)
    noisy = data["train"][1] - clean_signal(data["train"][0])
    assert 0.2 < np.sqrt(np.mean(noisy ** 2)) < 0.35  # 0.4 sin(...): rms 0.28


def test_the_margin_by_validation_is_the_grids_best_fit_to_the_noisy_targets():
    assert pick_margin({0.001: 0.30, 0.01: 0.21, 0.1: 0.25, 1.0: 0.40}) == 0.01
    assert pick_margin({1.0: 0.2, 0.1: 0.2}) == 0.1  # a tie: the smaller margin


def test_noise_tiny_runs_end_to_end(tmp_path):
    kd = reproduce.Runner(tmp_path / "noise-tiny", device="cpu", in_process=True)  # same CLI entry point
    text = noise(kd, "tiny", 1)
    out = kd.out
    for name in ("results.csv", "summary.csv", "summary.md", "summary.png", "noise.png", "curves.npz",
                 "commands.txt"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    rows = list(csv.DictReader(open(out / "results.csv")))
    methods = {r["method"] for r in rows}
    assert methods == {f"{m} [sine]" for m in ROWS}
    # the margin by validation is one of the grid's, each margin's student a run of one sweep per seed
    assert "Margins chosen by validation, per seed: sine noise 0.1." in text
    assert "kdcache sweep" in (out / "commands.txt").read_text() and "--grid margin=0,0.1,0.16" in text
    for r in rows:
        assert r["metric"].startswith("rmse to clean signal")
        assert all(math.isfinite(float(r[k])) and float(r[k]) >= 0 for k in ("best", "last", "seconds")), r
    summary = list(csv.DictReader(open(out / "summary.csv")))
    assert len(summary) == len(methods) and all(math.isfinite(float(r["best_mean"])) for r in summary)
    assert "rmse to clean signal" in text and "Teacher RMSE to the clean signal" in text
    commands = (out / "commands.txt").read_text()
    assert "kdcache cache-teacher" in commands and "--task tabular" in commands and "kdcache distill" in commands
    curves = np.load(out / "curves.npz")
    assert np.isfinite(curves["sine__vanilla__seed0__last"]).all()


def test_subprocesses_can_build_the_table_teacher():
    """The benchmark's real runs are subprocesses: under its environment they must import the teacher's factory."""
    import subprocess

    from noise_toy import _subprocess_env

    code = "from kdcache.models import build_model; print(type(build_model('noise_toy:table_teacher', 1, rows=3, trust_model_code=True)).__name__)"
    with _subprocess_env():
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert done.returncode == 0 and done.stdout.strip() == "TableTeacher", done.stderr[-2000:]
