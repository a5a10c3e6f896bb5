"""Issue 20: a sparse capture under torchrun (two CPU processes, gloo) writes the bytes one process writes: the
top-k ids, values and log-sum-exps, and the sampled draws, which depend on (seed, row) alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import kdcache
from helpers import REPO

pytestmark = pytest.mark.slow

# 203 rows in chunks of 16 shared by two ranks; batches of 12 straddle chunks
ARGS = ["--teacher", "teachers_for_tests:linear_digits", "--task", "digits", "--split", "train", "--limit", "203",
        "--chunk-rows", "16", "--batch-size", "12", "--device", "cpu", "--no-progress", "--trust-model-code"]


def _capture(nproc: int, weights: Path, out: Path, *extra: str) -> None:
    args = ["cache-teacher", "--weights", str(weights), "--out", str(out), *ARGS, *extra]
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, *launcher, "-m", "kdcache", *args], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("kind", [("--topk", "3", "--lse-temperatures", "1,2,4"), ("--sample-tokens", "30")])
def test_two_processes_store_the_sparse_bytes_one_process_stores(tmp_path, kind):
    from teachers_for_tests import linear_digits

    torch.manual_seed(0)
    weights = tmp_path / "linear.pt"
    torch.save(linear_digits().state_dict(), weights)
    _capture(1, weights, tmp_path / "one.kdcache", *kind)
    _capture(2, weights, tmp_path / "two.kdcache", *kind)
    one, two = (kdcache.open_cache(tmp_path / name, "train") for name in ("one.kdcache", "two.kdcache"))
    assert one.target.kind != "dense" and one.names == two.names
    for name in one.names:
        assert np.array_equal(one.read(name), two.read(name)), name
    assert one.chunk_digests == two.chunk_digests
    assert two.target_quality["rows_measured"] == 203
    assert two.target_quality["kept_mass"] == pytest.approx(one.target_quality["kept_mass"], abs=1e-6)
