"""Crash-safe writes: SIGKILL at random points of a real-data cache-teacher run, resume, compare byte for byte."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

import kdcache
from kdcache.errors import KDCacheError
from kdcache.cache.store import LocalLock as WriteLock
from teachers_for_tests import make_tiny_bert
from cache_edits import interrupt_as_an_earlier_release, stored_rows
from helpers import _one_error_line, run_cli

ROWS = 600  # of real SST-2 train; chunks of 64 rows, batches of 24: a resume restarts inside a batch


def _kdcache(*args: str) -> list[str]:
    return [sys.executable, "-c", "from kdcache.cli.main import main; main()", *args]


def _args(teacher, data, out, *extra):
    return ["cache-teacher", "--teacher", str(teacher), "--task", "sst2", "--data", str(data), "--split", "train",
            "--split", "validation", "--out", str(out), "--limit", str(ROWS), "--chunk-rows", "64", "--batch-size",
            "24", "--device", "cpu", "--no-progress", *extra]


def _rows_done(out: Path) -> dict[str, int]:
    return {split: stored_rows(out, split) for split in ("train", "validation")}


def _arrays(out: Path) -> dict[str, bytes]:
    """Every stored chunk file of every split array, and the decoded arrays, keyed by path."""
    found = {}
    for split in ("train", "validation"):
        for name in ("logits", "labels", "index", "fingerprint"):
            folder = out / split / name
            for chunk in sorted((folder / "c").rglob("*")):
                if chunk.is_file():
                    found[str(chunk.relative_to(out))] = chunk.read_bytes()
            found[f"{split}/{name} decoded"] = np.asarray(zarr.open_array(str(folder), mode="r")[:]).tobytes()
    return found


@pytest.fixture(scope="module")
def sst2_teacher(tmp_path_factory, tiny_tokenizer):
    return make_tiny_bert(tmp_path_factory.mktemp("teacher"), tiny_tokenizer)


def _complete(out: Path) -> bool:
    try:
        return json.loads((out / "zarr.json").read_text())["attributes"].get("complete") is True
    except (OSError, ValueError, KeyError):
        return False


def _stopped(pid: int) -> bool:
    """Every thread of the process is stopped (SIGSTOP has landed), or it is gone."""
    try:
        states = [(task / "stat").read_text().rsplit(")", 1)[1].split()[0] for task in Path(f"/proc/{pid}/task").iterdir()]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return all(state in "TtZX" for state in states)


def _freeze(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGSTOP)
    while not _stopped(proc.pid):
        time.sleep(0.001)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread states from /proc (Linux)")
def test_sigkill_at_random_points_then_resume_is_byte_identical(tmp_path, sst2_teacher, glue_dir):
    """The writer is frozen (SIGSTOP) at whatever point it has reached, every few milliseconds; once the rows it has
    stored pass a random target it is killed (SIGKILL) right there, frozen: each kill lands at the state just read,
    mid-write or between writes, and never after the end. Then one resume; the bytes are those of an uninterrupted
    run, wherever the kills landed."""
    data = glue_dir / "SST-2"
    reference = tmp_path / "reference.kdcache"
    subprocess.run(_kdcache(*_args(sst2_teacher, data, reference)), check=True, capture_output=True, timeout=300)

    out = tmp_path / "killed.kdcache"
    rng = np.random.default_rng(3)
    kills = []
    targets = sorted(rng.choice(np.arange(1, 2 * ROWS - 128), size=4, replace=False))
    for target in targets:
        if sum(_rows_done(out).values()) >= target:
            continue
        proc = subprocess.Popen(_kdcache(*_args(sst2_teacher, data, out)), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            _freeze(proc)
            done = _rows_done(out)
            if sum(done.values()) >= target and not _complete(out):
                proc.send_signal(signal.SIGKILL)
                kills.append(done)
                break
            proc.send_signal(signal.SIGCONT)
            time.sleep(float(rng.uniform(0.001, 0.01)))
        code = proc.wait(timeout=300)
        if code == 0:
            break  # ran to the end between two freezes: nothing left to resume
        assert code == -signal.SIGKILL, proc.stderr.read().decode()
        assert _rows_done(out) == kills[-1]  # the kill landed where the writer was frozen
        with pytest.raises(KDCacheError, match="incomplete"):
            kdcache.open_cache(out)  # a killed cache is never used silently
    subprocess.run(_kdcache(*_args(sst2_teacher, data, out, "--resume")), check=True, capture_output=True, timeout=300)
    assert len(kills) >= 2, kills  # killed mid-run at several distinct points
    assert len({tuple(sorted(k.items())) for k in kills}) == len(kills), kills
    assert kdcache.open_cache(out).attrs["complete"] is True
    got, want = _arrays(out), _arrays(reference)
    assert got.keys() == want.keys()
    assert [k for k in want if got[k] != want[k]] == []
    assert not list(out.rglob("*.partial"))


def test_resume_with_other_settings_is_refused(tmp_path, capsys, monkeypatch, sst2_teacher, tiny_tokenizer, glue_dir):
    out = tmp_path / "c.kdcache"
    assert run_cli(_args(sst2_teacher, glue_dir / "SST-2", out), capsys, monkeypatch)[0] == 0
    meta = json.loads((out / "zarr.json").read_text())
    meta["attributes"]["complete"] = False  # as if killed just before its last write
    (out / "zarr.json").write_text(json.dumps(meta))
    other = make_tiny_bert(tmp_path / "other", tiny_tokenizer, seed=1)
    code, _, err = run_cli(_args(other, glue_dir / "SST-2", out), capsys, monkeypatch)
    _one_error_line(code, err, str(out), "other settings", "teacher_sha256", "--overwrite")
    code, _, err = run_cli(_args(sst2_teacher, glue_dir / "SST-2", out, "--dtype", "float32"), capsys, monkeypatch)
    _one_error_line(code, err, "storage.logits_dtype")


def test_resume_flag_needs_an_interrupted_cache(tmp_path, capsys, monkeypatch, sst2_teacher, glue_dir):
    out = tmp_path / "c.kdcache"
    _one_error_line(*run_cli(_args(sst2_teacher, glue_dir / "SST-2", out, "--resume"), capsys, monkeypatch)[::2],
                    "nothing to resume")
    assert run_cli(_args(sst2_teacher, glue_dir / "SST-2", out), capsys, monkeypatch)[0] == 0
    _one_error_line(*run_cli(_args(sst2_teacher, glue_dir / "SST-2", out, "--resume"), capsys, monkeypatch)[::2],
                    "already complete")


def test_a_second_writer_is_refused_and_a_dead_writers_lock_is_not_stuck(tmp_path, capsys, monkeypatch, sst2_teacher,
                                                                        glue_dir):
    out = tmp_path / "c.kdcache"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from kdcache.cache.store import LocalLock as WriteLock; "
                               f"WriteLock({str(out)!r}).acquire(); print('locked', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"locked"
        code, _, err = run_cli(_args(sst2_teacher, glue_dir / "SST-2", out), capsys, monkeypatch)
        _one_error_line(code, err, str(out), "another cache-teacher", f"pid {holder.pid}")
        assert not out.exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / "c.kdcache.lock").exists()  # the dead writer's lock file stays, but binds nobody
    with WriteLock(out):
        pass
    assert run_cli(_args(sst2_teacher, glue_dir / "SST-2", out), capsys, monkeypatch)[0] == 0


def _interrupt(out: Path, rows_done: int) -> None:
    """Make a finished cache look interrupted after `rows_done` rows of train, as an earlier release left it."""
    interrupt_as_an_earlier_release(out, "train", rows_done)


def test_kills_before_any_row_was_written_resume_too(tmp_path, capsys, monkeypatch, sst2_teacher, glue_dir):
    """Killed while creating a split's arrays, or between the tokenizer's metadata and its chunk."""
    reference, out = tmp_path / "ref.kdcache", tmp_path / "c.kdcache"
    assert run_cli(_args(sst2_teacher, glue_dir / "SST-2", reference), capsys, monkeypatch)[0] == 0
    assert run_cli(_args(sst2_teacher, glue_dir / "SST-2", out), capsys, monkeypatch)[0] == 0
    _interrupt(out, rows_done=0)
    shutil.rmtree(out / "train" / "logits")  # the split group exists, its logits array does not
    (out / "tokenizer" / "c" / "0").unlink()  # the tokenizer's metadata exists, its chunk does not
    code, _, err = run_cli(_args(sst2_teacher, glue_dir / "SST-2", out), capsys, monkeypatch)
    assert code == 0, err
    assert _arrays(out) == _arrays(reference)
    kdcache.cache.load_cache_tokenizer(out)


def test_resume_refuses_data_that_changed_under_it(tmp_path, capsys, monkeypatch, sst2_teacher, glue_dir):
    data = tmp_path / "SST-2"
    shutil.copytree(glue_dir / "SST-2", data)
    out = tmp_path / "c.kdcache"
    assert run_cli(_args(sst2_teacher, data, out), capsys, monkeypatch)[0] == 0
    _interrupt(out, rows_done=64)  # a resume recomputes rows 48..63 (batches of 24) and compares them
    lines = (data / "train.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    text, label = lines[51].rstrip("\n").split("\t")  # row 50 (line 0 is the header): same row count
    lines[51] = f"{text} great\t{label}\n"
    (data / "train.tsv").write_text("".join(lines), encoding="utf-8")
    code, _, err = run_cli(_args(sst2_teacher, data, out), capsys, monkeypatch)
    _one_error_line(code, err, "row 50", "differs from what the interrupted cache", "--overwrite")


def test_a_cache_interrupted_under_release_0_1_0_resumes(tmp_path, capsys, monkeypatch, sst2_teacher, glue_dir):
    """0.1.0 recorded no chunk chain: its interrupted caches resume (the stored chunks cannot be checked against a
    chain that was never written); a cache written since, which records one, is refused without it."""
    reference, out = tmp_path / "ref.kdcache", tmp_path / "c.kdcache"
    assert run_cli(_args(sst2_teacher, glue_dir / "SST-2", reference), capsys, monkeypatch)[0] == 0
    assert run_cli(_args(sst2_teacher, glue_dir / "SST-2", out), capsys, monkeypatch)[0] == 0
    _interrupt(out, rows_done=256)
    split = json.loads((out / "train" / "zarr.json").read_text())
    del split["attributes"]["chunk_chain"]
    (out / "train" / "zarr.json").write_text(json.dumps(split))
    code, _, err = run_cli(_args(sst2_teacher, glue_dir / "SST-2", out), capsys, monkeypatch)
    _one_error_line(code, err, "are not the ones that were written")  # this cache records chains: one was removed
    root = json.loads((out / "zarr.json").read_text())
    del root["attributes"]["chunk_manifests"]  # as 0.1.0 wrote it
    (out / "zarr.json").write_text(json.dumps(root))
    code, _, err = run_cli(_args(sst2_teacher, glue_dir / "SST-2", out), capsys, monkeypatch)
    assert code == 0, err
    assert _arrays(out) == _arrays(reference)


def test_a_limited_text_cache_interrupted_by_the_previous_release_resumes(tmp_path, capsys, monkeypatch, sst2_teacher,
                                                                          glue_dir):
    """Before --limit stopped reading a text file early, the cache recorded the file's row count; a cache
    interrupted then resumes now (the count describes the file, not the rows written) and ends byte-identical."""
    reference, out = tmp_path / "ref.kdcache", tmp_path / "c.kdcache"
    assert run_cli(_args(sst2_teacher, glue_dir / "SST-2", reference), capsys, monkeypatch)[0] == 0
    assert run_cli(_args(sst2_teacher, glue_dir / "SST-2", out), capsys, monkeypatch)[0] == 0
    _interrupt(out, rows_done=64)
    meta = json.loads((out / "zarr.json").read_text())
    pre = meta["attributes"]["write_settings"]["data"]["train"]["preprocess"]
    assert pre["rows_in_file"] is None  # read up to the limit only
    pre["rows_in_file"] = 67349  # what the previous release recorded for SST-2's train.tsv
    (out / "zarr.json").write_text(json.dumps(meta))
    code, _, err = run_cli(_args(sst2_teacher, glue_dir / "SST-2", out), capsys, monkeypatch)
    assert code == 0, err
    assert _arrays(out) == _arrays(reference)
    pre["max_length"] = 64  # a setting that changes the rows is still compared
    meta["attributes"]["complete"] = False
    (out / "zarr.json").write_text(json.dumps(meta))
    code, _, err = run_cli(_args(sst2_teacher, glue_dir / "SST-2", out), capsys, monkeypatch)
    _one_error_line(code, err, "written with other settings", "max_length")
