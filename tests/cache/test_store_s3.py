"""Caches on object storage, against a real S3 server (SeaweedFS on 127.0.0.1, tests/s3_server.py): everything a
local cache promises, kept through the store module: the whole CLI round trip, byte-identical resume after
SIGKILL, the writer's lease, damage named on read, and bad input as one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import s3fs

import kdcache
from kdcache.cache.store import CacheStore
from kdcache.errors import KDCacheError
from kdcache.recipes.cache_teacher import CacheTeacherConfig, cache_teacher
from kdcache.recipes.distill import DistillConfig, distill
from kdcache.recipes.verify import verify_cache
from helpers import STUDENT_KW, _one_error_line, run_cli
from s3_server import KEY, SECRET

ARRAYS = ("logits", "labels", "index", "fingerprint")


def _options(server) -> list[str]:
    return ["--storage-option", f"endpoint_url={server.url}", "--storage-option", f"key={KEY}",
            "--storage-option", f"secret={SECRET}"]


def _fs(server) -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(**server.options, skip_instance_cache=True)


@pytest.fixture(scope="module")
def digits_teacher(tmp_path_factory) -> Path:
    from kdcache.recipes.demo import train_digits_teacher

    folder = tmp_path_factory.mktemp("teacher") / "teacher"
    train_digits_teacher(folder, epochs=2)
    return folder


def _capture(teacher: Path, out: str, *extra: str) -> list[str]:
    return ["cache-teacher", "--teacher", str(teacher), "--task", "digits", "--split", "train", "--split",
            "validation", "--chunk-rows", "128", "--batch-size", "32", "--out", out, "--no-progress", *extra]


def _stored(fs_or_root, split: str, array: str) -> dict[str, bytes]:
    """Every stored chunk of one array, by key: the bytes as the storage holds them."""
    if isinstance(fs_or_root, tuple):
        fs, root = fs_or_root
        keys = fs.find(f"{root}/{split}/{array}/c")
        return {k[len(root) + 1:]: fs.cat_file(k) for k in keys}
    root = Path(fs_or_root)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in (root / split / array / "c").rglob("*")
            if p.is_file()}


def test_cache_teacher_info_verify_distill_on_s3(tmp_path, capsys, monkeypatch, s3_server, s3_bucket,
                                                 digits_teacher):
    url = f"s3://{s3_bucket}/digits.kdcache"
    code, out, err = run_cli(_capture(digits_teacher, url, *_options(s3_server)), capsys, monkeypatch)
    assert code == 0, err
    assert f"wrote {url}" in out
    local = tmp_path / "local.kdcache"
    assert run_cli(_capture(digits_teacher, str(local)), capsys, monkeypatch)[0] == 0
    fs = _fs(s3_server)
    for split in ("train", "validation"):  # what lands on S3 is what lands on disk, chunk for chunk
        for array in ARRAYS:
            assert _stored((fs, f"{s3_bucket}/digits.kdcache"), split, array) == _stored(local, split, array)
    code, out, err = run_cli(["info", url, "--json", *_options(s3_server)], capsys, monkeypatch)
    info = json.loads(out)
    assert code == 0 and info["path"] == url and info["complete"] and info["size_on_disk"] > 10_000, err
    assert [s["rows"] for s in info["splits"]] == [1437, 360]
    code, out, _ = run_cli(["verify", url, "--teacher", str(digits_teacher), "--device", "cpu", *_options(s3_server)],
                           capsys, monkeypatch)
    assert code == 0 and "verdict: ok" in out and "chunks match their CRC32C and their place" in out, out
    for stream in ("memory", "chunks"):
        code, out, err = run_cli(["distill", "--cache", url, "--student", "mlp", "--student-kwargs",
                                  json.dumps(STUDENT_KW), "--epochs", "2", "--stream", stream, "--out",
                                  tmp_path / f"run-{stream}", "--device", "cpu", "--no-progress",
                                  *_options(s3_server)], capsys, monkeypatch)
        assert code == 0 and "2/2 epochs" in out, err
    local_run = distill(DistillConfig(student="mlp", student_kwargs=STUDENT_KW, cache=local, epochs=2,
                                      out=tmp_path / "run-local", device="cpu", progress=False))
    remote_metrics = (tmp_path / "run-memory" / "metrics.jsonl").read_text().splitlines()
    local_metrics = (tmp_path / "run-local" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["accuracy"] for r in remote_metrics] == [json.loads(r)["accuracy"] for r in local_metrics]
    assert local_run["epochs_done"] == 2


def test_environment_variables_configure_the_endpoint(tmp_path, monkeypatch, s3_server, s3_bucket, digits_teacher):
    """fsspec's own configuration, read when a store is opened: no flag needed."""
    monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", s3_server.url)
    monkeypatch.setenv("FSSPEC_S3_KEY", KEY)
    monkeypatch.setenv("FSSPEC_S3_SECRET", SECRET)
    url = f"s3://{s3_bucket}/env.kdcache"
    cache_teacher(CacheTeacherConfig(teacher=str(digits_teacher), task="digits", out=url, splits=("validation",),
                                     chunk_rows=128, device="cpu", progress=False))
    cache = kdcache.open_cache(url, "validation")
    assert len(cache) == 360 and cache.read("logits").shape == (360, 10)


def _subprocess_env(server) -> dict[str, str]:
    return {**os.environ, "FSSPEC_S3_ENDPOINT_URL": server.url, "FSSPEC_S3_KEY": KEY, "FSSPEC_S3_SECRET": SECRET,
            "PYTHONPATH": os.pathsep.join(sys.path)}


def _kdcache(*args: str) -> list[str]:
    return [sys.executable, "-c", "from kdcache.cli.main import main; main()", *args]


def _split_attrs(fs: s3fs.S3FileSystem, root: str, split: str) -> dict:
    try:
        return json.loads(fs.cat_file(f"{root}/{split}/zarr.json"))["attributes"]
    except (FileNotFoundError, ValueError, KeyError):
        return {}


def _stored_rows(fs: s3fs.S3FileSystem, root: str, split: str) -> int:
    """Rows of `split` stored so far: all of a complete split, else those of its recorded chunks."""
    attrs = _split_attrs(fs, root, split)
    if attrs.get("complete"):
        return int(attrs["rows"])
    try:
        records = fs.ls(f"{root}/.kdcache-progress/{split}", detail=False, refresh=True)
    except FileNotFoundError:
        return 0
    return sum(b - a for a, b in (json.loads(fs.cat_file(r))["rows"] for r in records if r.endswith(".json")))


def test_sigkill_mid_write_then_resume_is_byte_identical_on_s3(tmp_path, capsys, monkeypatch, s3_server, s3_bucket,
                                                                digits_teacher):
    """Killed once 256 rows are stored: wherever the kill lands after that, the rerun resumes each split at the row
    the cache recorded, and the bytes end as those of an uninterrupted run."""
    root, fs = f"{s3_bucket}/killed.kdcache", _fs(s3_server)
    url = f"s3://{root}"
    args = _capture(digits_teacher, url, "--batch-size", "16", "--chunk-rows", "64", "--device", "cpu")
    env = _subprocess_env(s3_server)
    proc = subprocess.Popen(_kdcache(*args), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if _stored_rows(fs, root, "train") >= 256:
            proc.send_signal(signal.SIGKILL)
            break
        fs.invalidate_cache()
        time.sleep(0.01)
    assert proc.wait(timeout=60) == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    with pytest.raises(KDCacheError, match="incomplete"):
        kdcache.open_cache(url, storage_options=s3_server.options)  # a killed cache is never used silently
    fs.invalidate_cache()
    recorded = {split: (_split_attrs(fs, root, split).get("complete"), _stored_rows(fs, root, split))
                for split in ("train", "validation")}  # as the kill left them
    assert recorded["train"][1] >= 256
    done = subprocess.run(_kdcache(*args), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    for split, (complete, rows) in recorded.items():
        if complete or not rows:
            assert f"resuming split '{split}'" not in done.stderr  # finished before the kill, or not started
        else:
            assert f"resuming split '{split}' at row {rows} of " in done.stderr, (split, done.stderr)
    reference = tmp_path / "reference.kdcache"
    assert run_cli(_capture(digits_teacher, str(reference), "--batch-size", "16", "--chunk-rows", "64"),
                   capsys, monkeypatch)[0] == 0
    for split in ("train", "validation"):
        for array in ARRAYS:
            assert _stored((fs, root), split, array) == _stored(reference, split, array), (split, array)
    assert verify_cache(url, storage_options=s3_server.options).ok


HOLDER = """
import time
from kdcache.cache.store import CacheStore
from kdcache.errors import KDCacheError
lease = CacheStore({url!r}).lock().acquire()
print("locked", flush=True)
while True:  # a writer checks its lease before every write
    try:
        lease.check()
    except KDCacheError as exc:
        print("lost:", exc, flush=True)
        break
    time.sleep(0.1)
"""


def test_two_writers_racing_for_one_lease_never_both_get_it(s3_server, s3_bucket, monkeypatch):
    """Conditional writes (If-None-Match to create, If-Match to take over): of two writers that both read "no lease"
    (or the same expired one), exactly one gets it, however their writes interleave."""
    from kdcache.cache.store import Lease

    for key, value in (("FSSPEC_S3_ENDPOINT_URL", s3_server.url), ("FSSPEC_S3_KEY", KEY), ("FSSPEC_S3_SECRET", SECRET)):
        monkeypatch.setenv(key, value)
    url = f"s3://{s3_bucket}/raced.kdcache"
    first, second = Lease(CacheStore(url), seconds=30), Lease(CacheStore(url), seconds=30)
    original = Lease._read

    def both_read_before_either_writes(self):  # the race: B read "no lease" before A's create landed
        record = original(self)
        if self is second and not hasattr(second, "_raced"):
            second._raced = True
            first.acquire()
        return record

    monkeypatch.setattr(Lease, "_read", both_read_before_either_writes)
    with pytest.raises(KDCacheError, match="took the lease on this cache at the same moment"):
        second.acquire()
    monkeypatch.setattr(Lease, "_read", original)
    record, _ = first._read()
    assert record["id"] == first.owner["id"]  # the first writer's lease stands, untouched
    first.release()
    assert not _fs(s3_server).exists(f"{s3_bucket}/raced.kdcache.lock")


def test_credentials_are_never_recorded(tmp_path, capsys, monkeypatch, s3_server, s3_bucket, digits_teacher):
    url = f"s3://{s3_bucket}/secret.kdcache"
    assert run_cli(_capture(digits_teacher, url, *_options(s3_server)), capsys, monkeypatch)[0] == 0
    code, _, err = run_cli(["distill", "--cache", url, "--student", "mlp", "--student-kwargs", json.dumps(STUDENT_KW),
                            "--epochs", "1", "--out", tmp_path / "run", "--device", "cpu", "--no-progress",
                            *_options(s3_server)], capsys, monkeypatch)
    assert code == 0, err
    fs = _fs(s3_server)
    stored = b"".join(fs.cat_file(k) for k in fs.find(f"{s3_bucket}/secret.kdcache") if k.endswith("zarr.json"))
    recorded = stored + b"".join(p.read_bytes() for p in (tmp_path / "run").rglob("*.json"))
    assert SECRET.encode() not in recorded and KEY.encode() not in recorded
    assert b"--storage-option secret=***" in stored and f"endpoint_url={s3_server.url}".encode() in stored


def test_a_second_writer_is_refused_while_the_lease_is_held_and_takes_over_once_it_expires(
        tmp_path, capsys, monkeypatch, s3_server, s3_bucket, digits_teacher):
    """Event-driven, never timed: the holder's renewal is awaited (the lease object changes), and its expiry is the
    frozen holder's record set in the past, as the clock would; the 10 s lease leaves a loaded machine its margin."""
    url, fs = f"s3://{s3_bucket}/leased.kdcache", _fs(s3_server)
    key = f"{s3_bucket}/leased.kdcache.lock"
    env = {**_subprocess_env(s3_server), "KDCACHE_LEASE_SECONDS": "10"}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER.format(url=url)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked", holder.stderr.read()
        first = json.loads(fs.cat_file(key))
        deadline = time.monotonic() + 120
        while json.loads(fs.cat_file(key))["expires"] == first["expires"]:  # a live holder renews its lease
            assert time.monotonic() < deadline, "the holder never renewed its lease"
            time.sleep(0.05)
        code, _, err = run_cli(_capture(digits_teacher, url, *_options(s3_server)), capsys, monkeypatch)
        _one_error_line(code, err, url, "another cache-teacher", "holds the lease on this cache")
        assert not fs.exists(f"{s3_bucket}/leased.kdcache/zarr.json")  # nothing was written
        holder.send_signal(signal.SIGSTOP)  # alive but frozen, as a writer on a machine that dropped off: no renewal
        record = json.loads(fs.cat_file(key))
        fs.pipe_file(key, json.dumps({**record, "expires": record["expires"] - 3600}).encode())  # its lease expired
        code, _, err = run_cli(_capture(digits_teacher, url, *_options(s3_server)), capsys, monkeypatch)
        assert code == 0, err
        holder.send_signal(signal.SIGCONT)  # the old writer wakes up: it must know it no longer holds the cache
        assert holder.stdout.readline().strip().startswith("lost:"), holder.stderr.read()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert not fs.exists(key)  # released at the end


def test_a_flipped_byte_in_a_remote_chunk_is_named(tmp_path, capsys, monkeypatch, s3_server, s3_bucket,
                                                   digits_teacher):
    url, fs = f"s3://{s3_bucket}/damaged.kdcache", _fs(s3_server)
    assert run_cli(_capture(digits_teacher, url, *_options(s3_server)), capsys, monkeypatch)[0] == 0
    key = f"{s3_bucket}/damaged.kdcache/train/logits/c/1/0"
    raw = bytearray(fs.cat_file(key))
    raw[len(raw) // 2] ^= 0x01
    fs.pipe_file(key, bytes(raw))
    with pytest.raises(KDCacheError, match=rf"array 'logits', chunk 1 .*CRC32C checksum mismatch.*{url}/train/logits/c/1/0"):
        kdcache.open_cache(url, storage_options=s3_server.options).read("logits")
    code, out, _ = run_cli(["verify", url, *_options(s3_server)], capsys, monkeypatch)
    assert code == 1 and f"{url}/train/logits/c/1/0" in out and "FAIL  train/checksums" in out


def test_remote_reads_are_whole_chunks_never_a_request_per_row(s3_server, s3_bucket, digits_teacher, monkeypatch):
    from zarr.storage import FsspecStore

    from kdcache.train.batches import LogitBatches

    url = f"s3://{s3_bucket}/streamed.kdcache"
    cache_teacher(CacheTeacherConfig(teacher=str(digits_teacher), task="digits", out=url, splits=("train",),
                                     chunk_rows=128, device="cpu", progress=False,
                                     storage_options=s3_server.options))
    cache = kdcache.open_cache(url, storage_options=s3_server.options)
    requests = []
    original = FsspecStore.get

    async def counted(self, key, *args, **kwargs):
        requests.append(key)
        return await original(self, key, *args, **kwargs)

    monkeypatch.setattr(FsspecStore, "get", counted)
    rows = sum(len(rows) for rows, _, _ in LogitBatches(cache, 32, seed=0, mode="chunks").epoch(1))
    chunks = -(-1437 // 128)
    assert rows == 1437 and len(requests) <= 2 * chunks + 4, len(requests)  # logits + labels, one request each


def test_a_cache_in_memory_round_trips(tmp_path, digits_teacher):
    url = "memory://kdcache-tests/digits.kdcache"
    cache_teacher(CacheTeacherConfig(teacher=str(digits_teacher), task="digits", out=url,
                                     splits=("train", "validation"), chunk_rows=256, device="cpu", progress=False,
                                     overwrite=True))
    assert verify_cache(url).ok
    summary = distill(DistillConfig(student="mlp", student_kwargs=STUDENT_KW, cache=url, epochs=1,
                                    out=tmp_path / "run", device="cpu", progress=False))
    assert summary["epochs_done"] == 1 and summary["cache"] == url


@pytest.mark.parametrize("case", ["unreachable endpoint", "missing bucket", "refused credentials", "no credentials",
                                  "protocol not installed", "no scheme, not a path", "no bucket"])
def test_bad_storage_is_one_line_and_nothing_half_written(tmp_path, capsys, monkeypatch, s3_server, s3_bucket,
                                                          digits_teacher, case):
    good = [f"endpoint_url={s3_server.url}", f"key={KEY}", f"secret={SECRET}"]
    closed = s3_server.url.rsplit(":", 1)[0] + ":1"
    url, options, needle = {
        "unreachable endpoint": (f"s3://{s3_bucket}/c.kdcache", [f"endpoint_url={closed}", f"key={KEY}",
                                                                   f"secret={SECRET}",
                                                                   'config_kwargs={"connect_timeout": 1, '
                                                                   '"retries": {"max_attempts": 1}}'],
                                 "cannot reach the storage endpoint"),
        "missing bucket": ("s3://no-such-bucket-kdcache/c.kdcache", good, "no such bucket 'no-such-bucket-kdcache'"),
        "refused credentials": (f"s3://{s3_bucket}/c.kdcache", [f"endpoint_url={s3_server.url}", "key=wrong",
                                                                "secret=wrong"], "access denied"),
        "no credentials": (f"s3://{s3_bucket}/c.kdcache", [f"endpoint_url={s3_server.url}"], "no credentials"),
        "no bucket": ("s3://", [], "names no bucket"),
        "protocol not installed": ("gs://some-bucket/c.kdcache", [], "the gs:// protocol needs a package"),
        "no scheme, not a path": ("s3:bucket/c.kdcache", [], "not a path, and not a URL either (a URL is s3://...)"),
    }[case]
    flags = [x for option in options for x in ("--storage-option", option)]
    for variable in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "FSSPEC_S3_KEY", "FSSPEC_S3_SECRET"):
        monkeypatch.delenv(variable, raising=False)
    import fsspec.config

    monkeypatch.setattr(fsspec.config, "conf", {})  # what earlier tests' FSSPEC_S3_* variables left in fsspec's config
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    for args in (_capture(digits_teacher, url, *flags), ["info", url, *flags], ["verify", url, *flags],
                 ["distill", "--cache", url, "--student", "mlp", "--out", tmp_path / "run", *flags]):
        code, _, err = run_cli(args, capsys, monkeypatch)
        _one_error_line(code, err, url.split("/")[0] if case == "no scheme, not a path" else url, needle)
    fs = _fs(s3_server)
    assert not fs.find(s3_bucket)  # nothing was written where the cache would be
    # and no bucket was made for it: this server makes a missing bucket on a first write, so a lease object (or
    # any object) written before the bucket is checked would have created it
    assert not fs.exists("no-such-bucket-kdcache")
