"""The sparse-parity benchmark (Pro-KD and curriculum extraction from one cache) cannot rot: its tiny scale runs
end to end through the CLI, and its data is the parity it claims to be."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import reproduce  # noqa: E402
import sparse_parity  # noqa: E402

import kdcache  # noqa: E402

pytestmark = pytest.mark.slow


def test_the_data_is_a_k_sparse_parity(tmp_path):
    sparse_parity.write_data(tmp_path, n=10, k=3, rows=400)
    train = np.load(tmp_path / "train.npz")
    x, y = train["x"], train["y"]
    assert set(np.unique(x)) == {-1.0, 1.0} and x.shape == (400, 10)
    np.testing.assert_array_equal(y, (x[:, 0] * x[:, 1] * x[:, 2] > 0).astype(np.int64))
    assert abs(y.mean() - 0.5) < 0.1  # balanced
    for j in range(10):  # no single coordinate predicts the label: that is what makes parity hard
        assert abs(np.corrcoef(x[:, j], y)[0, 1]) < 0.2


def test_sparse_parity_tiny(tmp_path):
    text = sparse_parity.run(reproduce.Runner(tmp_path, "cpu", in_process=True), "tiny", 1)
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [r["method"] for r in rows] == list(sparse_parity.METHODS)
    assert all(0 <= float(r["final"]) <= 1 for r in rows)
    curves = list(csv.DictReader(open(tmp_path / "curves.csv")))
    assert len(curves) == len(sparse_parity.METHODS) * sparse_parity.SCALES["tiny"]["epochs"]
    assert (tmp_path / "sparse_parity.png").stat().st_size > 1000
    assert "| curriculum |" in text and "| prokd-late |" in text and "| prokd-1ep |" in text
    full, late = (kdcache.open_cache(tmp_path / name) for name in ("teacher.kdcache", "teacher-late.kdcache"))
    assert [c["name"] for c in full.checkpoints] == ["epoch-0001", "epoch-0002", "epoch-0003"]
    assert [c["name"] for c in late.checkpoints] == ["epoch-0002", "epoch-0003"]
    assert full.projections["dim"] == sparse_parity.SCALES["tiny"]["student_width"]
    commands = (tmp_path / "commands.txt").read_text()
    assert "--method prokd" in commands and "--method curriculum" in commands
