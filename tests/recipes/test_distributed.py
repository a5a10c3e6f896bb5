"""distill under torchrun (issue 13): two CPU processes with gloo compute what one process computes, rank 0 alone
writes the one run folder, a resume needs the same number of processes, and a failure on one rank is one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, said, tabular_cache

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    # 203 rows: batches of 32 leave a last batch of 11 rows, split 6/5 between two ranks
    return tabular_cache(tmp_path_factory.mktemp("ddp"), rows=(("train", 203), ("validation", 41)), features=16,
                         chunk_rows=16)[2]


def _launch(nproc: int, *args: object, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m kdcache ARGS`, alone or under torchrun with `nproc` processes, as a user runs it."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        command = [sys.executable, "-m", "kdcache", *map(str, args)]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
                   "-m", "kdcache", *map(str, args)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    if check and proc.returncode:
        raise AssertionError(f"{command} failed:\n{proc.stderr[-3000:]}")
    return proc


def _distill(cache, out, *extra):
    return ["distill", "--cache", cache, "--student", "mlp", "--student-kwargs", '{"hidden": 8, "depth": 1}',
            "--method", "continuation", "--epochs", "4", "--batch-size", "32", "--lr", "0.05", "--out", out,
            "--device", "cpu", "--no-progress", "--num-workers", "0", *extra]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _close(a: list[dict], b: list[dict]) -> None:
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b]
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4, abs=1e-6)
        assert x["metric"] == pytest.approx(y["metric"], abs=1e-9)


def test_two_processes_compute_what_one_computes_and_rank_0_alone_writes(tmp_path, cache):
    one, two = tmp_path / "one", tmp_path / "two"
    _launch(1, *_distill(cache, one))
    proc = _launch(2, *_distill(cache, two))
    _close(_metrics(one), _metrics(two))
    summary = json.loads((two / "summary.json").read_text())
    assert summary["world_size"] == 2 and json.loads((one / "summary.json").read_text())["world_size"] == 1
    assert summary["best_metric"] == pytest.approx(json.loads((one / "summary.json").read_text())["best_metric"])
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert len((two / "metrics.jsonl").read_text().splitlines()) == 4  # one line per epoch, not one per rank
    assert proc.stdout.count("best accuracy") == 1  # rank 0 reports for the run
    # the students are the same up to float rounding
    import torch
    a, b = (torch.load(run / "last.pt", weights_only=True)["model"] for run in (one, two))
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), name


def test_a_resume_continues_under_the_same_world_and_refuses_another(tmp_path, cache):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    _launch(2, *_distill(cache, whole))
    _launch(2, *_distill(cache, cut, "--stop-after-epoch", "2"))
    assert len(_metrics(cut)) == 2
    refused = _launch(1, *_distill(cache, cut, "--resume"), check=False)
    assert refused.returncode == 1
    lines = said(refused.stderr).splitlines()
    assert len(lines) == 1 and "trained by 2 process(es), not 1" in lines[0] and "--nproc-per-node 2" in lines[0]
    _launch(2, *_distill(cache, cut, "--resume"))
    _close(_metrics(whole), _metrics(cut))


def test_a_run_folder_that_holds_a_run_is_refused_once_for_all_ranks(tmp_path, cache):
    run = tmp_path / "run"
    _launch(2, *_distill(cache, run, "--epochs", "1"))
    proc = _launch(2, *_distill(cache, run), check=False)
    assert proc.returncode != 0
    assert proc.stderr.count("error: ") == 1 and "already holds a run" in proc.stderr


_ONE_RANK_FAILS = """
import sys
from kdcache.cli.main import main
from kdcache.errors import KDCacheError
from kdcache.train.dist import close_world, init_world

world, _ = init_world("cpu")
def read():
    if world.rank == 1:
        raise KDCacheError("/data/on/rank1/c.kdcache: no such cache")
    return "read"
try:
    world.all_ok(read)
except KDCacheError as exc:
    from kdcache.errors import SharedError
    if not isinstance(exc, SharedError):
        print(f"error: {exc}", file=sys.stderr)
    close_world(world)
    sys.exit(1)
"""


def test_a_cache_one_rank_cannot_read_stops_every_rank_with_one_line(tmp_path):
    script = tmp_path / "one_rank_fails.py"
    script.write_text(_ONE_RANK_FAILS)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert errors == ["error: rank 1 of 2: /data/on/rank1/c.kdcache: no such cache"]


def test_shares_cover_each_batch_once_and_weigh_by_size():
    import numpy as np

    from kdcache.train.dist import World

    for size, rows in ((2, 32), (2, 11), (3, 2), (4, 1)):
        batch = np.arange(rows) + 100
        shares = [World(rank, size).shard(batch) for rank in range(size)]
        covered = np.concatenate([batch[s] for s, w in shares if w])
        assert covered.tolist() == batch.tolist()
        assert sum(w for _, w in shares) == pytest.approx(1.0)
        assert all(batch[s].size == 1 for s, w in shares if not w)  # a stand-in row, weight 0


def test_parameters_no_process_used_stay_untouched_as_in_one_process(tmp_path, projection_cache):
    """Curriculum's projection phases leave the student's head without gradients: under torchrun they must keep
    none (no weight decay, no momentum), as in one process."""
    args = ["distill", "--cache", projection_cache, "--student", "mlp", "--student-kwargs",
            '{"hidden": 8, "depth": 2}', "--method", "curriculum", "--phase-epochs", "1,1", "--epochs", "4",
            "--batch-size", "32", "--device", "cpu", "--no-progress", "--num-workers", "0", "--optimizer", "adamw",
            "--weight-decay", "0.1"]
    one, two = tmp_path / "one", tmp_path / "two"
    _launch(1, *args, "--out", one)
    _launch(2, *args, "--out", two)
    _close(_metrics(one), _metrics(two))


_SYNC_BUFFERS = """
import torch
from kdcache.train.dist import close_world, init_world

world, _ = init_world("cpu")
bn = torch.nn.BatchNorm1d(3)
bn.running_mean.fill_(float(world.rank))  # each rank's own statistics, as its shares left them
bn.num_batches_tracked.fill_(7)
world.sync_buffers(bn)
import os, pathlib
pathlib.Path(os.environ["OUT_DIR"], f"rank{world.rank}.txt").write_text(
    f"rank {world.rank}: {bn.running_mean.tolist()} {int(bn.num_batches_tracked)}")
close_world(world)
"""


def test_batch_norm_statistics_are_the_same_on_every_rank_before_evaluation(tmp_path):
    script = tmp_path / "sync.py"
    script.write_text(_SYNC_BUFFERS)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "OUT_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == [
        "rank 0: [0.5, 0.5, 0.5] 7", "rank 1: [0.5, 0.5, 0.5] 7"]


def test_refusals_every_rank_finds_are_said_once(tmp_path, cache):
    batch = _launch(2, *_distill(cache, tmp_path / "b", "--reduction", "batch"), check=False)
    assert batch.returncode != 0
    assert batch.stderr.count("error: ") == 1 and "--reduction batch" in batch.stderr
    # the authors' mse is one hinge on the batch too, for Pro-KD's continuation loss as much as for the method
    mse = _launch(2, *_distill(cache, tmp_path / "m", "--method", "prokd", "--kd-loss", "continuation",
                               "--reduction", "mse"), check=False)
    assert mse.returncode != 0 and mse.stderr.count("error: ") == 1 and "--reduction mse" in mse.stderr
    alone = tmp_path / "alone"
    _launch(1, *_distill(cache, alone, "--stop-after-epoch", "1"))
    refused = _launch(2, *_distill(cache, alone, "--resume"), check=False)
    assert refused.returncode != 0
    assert refused.stderr.count("error: ") == 1 and "trained by 1 process(es), not 2" in refused.stderr


def test_a_changed_row_one_rank_meets_is_one_line(tmp_path):
    import numpy as np

    data, _, cache = tabular_cache(tmp_path, rows=(("train", 96), ("validation", 16)), features=16, chunk_rows=16)
    with np.load(data / "train.npz") as npz:
        x, y = npz["x"].copy(), npz["y"]
    x[50, 3] += 1.0
    np.savez(data / "train.npz", x=x, y=y)
    proc = _launch(2, *_distill(cache, tmp_path / "run"), check=False)
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "row 50 " in errors[0] and "does not match the cache" in errors[0], proc.stderr[-3000:]
    assert not (tmp_path / "run" / "last.pt").exists()
