"""cache-teacher under torchrun (issue 13): two CPU processes with gloo write the very bytes one process writes, a
rank killed mid-capture resumes (with the same or another number of processes) to those bytes again, and a cache
one rank cannot reach stops every rank with one line naming that rank and path."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kdcache
from kdcache.errors import KDCacheError
from cache_edits import interrupt_as_an_earlier_release
from helpers import REPO

pytestmark = pytest.mark.slow

TEACHER = "teachers_for_tests:linear_digits_that_dies"  # linear_digits, killing itself only when told (below)
# 203 rows in chunks of 16: 13 chunks, the last of 11 rows, shared 6/7 by two ranks; batches of 12 straddle chunks
ARGS = ["--task", "digits", "--split", "train", "--split", "validation", "--limit", "203", "--chunk-rows", "16",
        "--batch-size", "12", "--device", "cpu", "--no-progress", "--trust-model-code"]
#: Root attributes that say when and how fast a cache was written, and by which command line: they differ between
#: any two captures, one process or several (`throughput` also counts the processes and the rows a resume computed)
WHEN_AND_HOW_FAST = ("command", "created", "completed", "throughput", "resumed")


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "OMP_NUM_THREADS": "1",
            **extra}


def _capture(nproc: int, weights: Path, out: Path, *extra: str, check: bool = True,
             **env: str) -> subprocess.CompletedProcess:
    """`python -m kdcache cache-teacher ...`, alone or under torchrun with `nproc` processes, as a user runs it."""
    args = ["cache-teacher", "--teacher", TEACHER, "--weights", str(weights), "--out", str(out), *ARGS, *extra]
    if nproc == 1:
        command = [sys.executable, "-m", "kdcache", *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
                   "-m", "kdcache", *args]
    proc = subprocess.run(command, env=_env(**env), capture_output=True, text=True, timeout=300)
    if check and proc.returncode:
        raise AssertionError(f"{command} failed:\n{proc.stderr[-3000:]}")
    return proc


def _files(cache: Path) -> dict[str, object]:
    """Every file of a cache: its bytes, except the root zarr.json, whose attributes are kept in order without
    those that record when and how fast it was written."""
    found: dict[str, object] = {}
    for path in sorted(p for p in cache.rglob("*") if p.is_file()):
        key = path.relative_to(cache).as_posix()
        found[key] = path.read_bytes()
    root = json.loads(found.pop("zarr.json"))
    attrs = root.pop("attributes")
    found["zarr.json"] = (root, [(k, v) for k, v in attrs.items() if k not in WHEN_AND_HOW_FAST])
    return found


def _assert_same(got: Path, want: Path) -> None:
    a, b = _files(got), _files(want)
    assert sorted(a) == sorted(b)
    assert [k for k in b if a[k] != b[k]] == []


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    from teachers_for_tests import linear_digits_that_dies

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "linear.pt"
    torch.save(linear_digits_that_dies().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, weights) -> Path:
    """The cache one process writes."""
    out = tmp_path_factory.mktemp("one") / "c.kdcache"
    _capture(1, weights, out)
    return out


def test_two_processes_write_the_bytes_one_process_writes(tmp_path, weights, reference):
    out = tmp_path / "c.kdcache"
    proc = _capture(2, weights, out)
    _assert_same(out, reference)
    assert proc.stdout.count("wrote ") == 1  # rank 0 reports for the capture
    attrs = kdcache.open_cache(out, split="train").attrs
    assert attrs["throughput"]["train"]["processes"] == 2 and attrs["throughput"]["train"]["rows"] == 203
    assert not (out / ".kdcache-progress").exists()


def _killed(tmp_path: Path, weights: Path, nproc: int, rank: int) -> Path:
    """A capture whose rank `rank` killed itself (SIGKILL) after 62 rows of the train split (2 of them the probe),
    once some of its rows were stored."""
    out = tmp_path / "c.kdcache"
    proc = _capture(nproc, weights, out, check=False, KDCACHE_TEST_KILL_RANK=str(rank), KDCACHE_TEST_KILL_AFTER="62",
                    KDCACHE_TEST_KILL_ONCE_STORED=str(out))
    assert proc.returncode != 0
    with pytest.raises(KDCacheError, match="incomplete"):
        kdcache.open_cache(out)  # a half-written cache is never readable as complete
    return out


def test_a_rank_killed_mid_capture_resumes_to_the_same_bytes(tmp_path, weights, reference):
    out = _killed(tmp_path, weights, 2, rank=1)
    recorded = sorted(int(p.stem) for p in (out / ".kdcache-progress" / "train").glob("*.json"))
    assert 0 < len(recorded) < 13 and 12 not in recorded  # some chunks of both ranks stored, the last one not
    proc = _capture(2, weights, out)
    _assert_same(out, reference)
    attrs = json.loads((out / "zarr.json").read_text())["attributes"]
    assert attrs["throughput"]["train"]["resumed_at_chunks_stored"] == len(recorded) and "resumed" in attrs
    assert proc.stderr.count("error") == 0


def test_a_capture_of_two_processes_resumes_with_one_and_one_of_one_with_two(tmp_path, weights, reference):
    out = _killed(tmp_path / "a", weights, 2, rank=1)
    _capture(1, weights, out)
    _assert_same(out, reference)

    out = tmp_path / "b" / "c.kdcache"  # one process killed after recording its first chunks; finished by two
    proc = _capture(1, weights, out, check=False, KDCACHE_TEST_KILL_RANK="0", KDCACHE_TEST_KILL_AFTER="62",
                    KDCACHE_TEST_KILL_ONCE_STORED=str(out))
    assert proc.returncode != 0
    recorded = sorted(int(p.stem) for p in (out / ".kdcache-progress" / "train").glob("*.json"))
    assert recorded and recorded == list(range(len(recorded))) and len(recorded) < 13  # the first chunks, in order
    _capture(2, weights, out)
    _assert_same(out, reference)


def test_a_cache_an_earlier_release_interrupted_is_finished_by_two_processes(tmp_path, weights, reference):
    """Before the chunk records, one process advanced `rows_done` and `chunk_chain`: such a cache is checked against
    its chain, its stored chunks recorded, and the rest written by whoever resumes it, to the same bytes."""
    out = tmp_path / "c.kdcache"
    shutil.copytree(reference, out)
    interrupt_as_an_earlier_release(out, "train", 64, drop_later_chunks=True)
    proc = _capture(2, weights, out)
    assert "resuming split 'train' at row 64 of 203" in proc.stderr, proc.stderr
    _assert_same(out, reference)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_cache_one_rank_cannot_reach_stops_every_rank_with_one_line(tmp_path, weights, reference):
    # Two ranks started as torchrun starts them, but each with its own home folder, as on two machines: --out ~/...
    # is a folder rank 0 writes and rank 1 never sees (not on storage both share)
    homes = [tmp_path / "node0", tmp_path / "node1"]
    port = str(_free_port())
    procs = []
    for rank, home in enumerate(homes):
        home.mkdir()
        env = _env(HOME=str(home), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, "-m", "kdcache", "cache-teacher", "--teacher", TEACHER,
                                       "--weights", str(weights), "--out", "~/c.kdcache", *ARGS], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert all(code != 0 for code, _ in results), results
    errors = [line for _, err in results for line in err.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: rank 1 of 2: {homes[1] / 'c.kdcache'}: this process does not see the cache the first "
                      "process is writing there; every process must reach --out (a folder on storage all of them "
                      "share, or a URL)"], results
    # nothing lost: rank 0's cache is an interrupted one, which the same command finishes
    out = homes[0] / "c.kdcache"
    with pytest.raises(KDCacheError, match="incomplete"):
        kdcache.open_cache(out)
    _capture(1, weights, out)
    _assert_same(out, reference)


def test_each_rank_takes_a_contiguous_share_of_the_chunks_in_runs():
    from kdcache.recipes.cache_teacher import _chunk_share, _runs
    from kdcache.train.dist import World

    chunks = list(range(13))
    shares = [_chunk_share(chunks, World(rank, 2)) for rank in range(2)]
    assert shares == [list(range(6)), list(range(6, 13))]
    shares = [_chunk_share([1, 2, 5], World(rank, 4)) for rank in range(4)]  # a resume: the chunks still missing
    assert shares == [[1], [2], [], [5]]  # each once, in order; a rank may have none
    assert list(_runs([0, 1, 2, 5, 7, 8])) == [(0, 3), (5, 6), (7, 9)]
    assert list(_runs([])) == []
