"""The writer's lease and a cache's metadata, round three (issue #19): a writer frozen past its lease cannot undo the
cache another writer finished (every metadata write is fenced), a lease record is read with its own ETag, a
damaged lease is one line, and a metadata file that is a FIFO or a device is refused instead of read for ever."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import s3fs

import kdcache
from kdcache.cache import codecs
from kdcache.cache.store import CacheStore, Lease
from kdcache.cache.writer import CacheWriter
from kdcache.errors import KDCacheError
from kdcache.recipes.verify import verify_cache
from helpers import _one_error_line, run_cli

ROWS, CHUNK, OUTPUTS = 300, 64, 3
HEADER = {"teacher": {"num_outputs": OUTPUTS}, "task": {"kind": "classification"}, "write_settings": {"seed": 1}}


def _rows(start: int, stop: int) -> dict[str, np.ndarray]:
    """Rows as a deterministic teacher gives them: any writer computes the same ones."""
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(ROWS, OUTPUTS)).astype(np.float32)
    labels = rng.integers(0, OUTPUTS, size=ROWS)
    fps = rng.integers(0, 2**62, size=ROWS, dtype=np.uint64)
    return {"logits": logits[start:stop], "labels": labels[start:stop], "index": np.arange(start, stop),
            "fingerprint": fps[start:stop]}


def _split(writer: CacheWriter):
    return writer.add_split("train", rows=ROWS, num_outputs=OUTPUTS, kind="classification", dtype="float16",
                            codec=codecs.DEFAULT_CODEC, chunk_rows=CHUNK)


def _expire(store: CacheStore) -> None:
    """What time does to a frozen writer's lease: its record stays, its expiry passes (no renewal came)."""
    record = json.loads(store.fs.cat_file(f"{store.root}.lock"))
    store.fs.pipe_file(f"{store.root}.lock", json.dumps({**record, "expires": 0}).encode())


def test_a_writer_frozen_past_its_lease_cannot_undo_the_cache_another_finished(s3_server, s3_bucket):
    url = f"s3://{s3_bucket}/frozen.kdcache"
    store_a = CacheStore(url, s3_server.options)
    lease_a = Lease(store_a, seconds=600).acquire()  # no renewal comes during the test: A believes it holds the cache
    writer_a = CacheWriter(store_a, HEADER, lock=lease_a)
    split_a = _split(writer_a)
    split_a.write(_rows(0, CHUNK))  # one chunk stored and recorded
    assert split_a.recorded == [0]

    _expire(store_a)  # A is frozen (SIGSTOP, a paused VM) long enough for its lease to expire
    store_b = CacheStore(url, s3_server.options)
    with Lease(store_b, seconds=600) as lease_b:  # B takes the expired lease over and finishes the cache
        writer_b = CacheWriter(store_b, HEADER, resume=True, lock=lease_b)
        split_b = _split(writer_b)
        assert split_b.pending_chunks() == [1, 2, 3, 4]
        split_b.seek(CHUNK, ROWS, CHUNK, compare_before=False, compare_after=False)
        split_b.write(_rows(CHUNK, ROWS))
        split_b.close({"n": ROWS, "source": "test"})
        writer_b.finalize()
    finished = store_b.fs.cat_file(f"{store_b.root}/train/zarr.json")
    assert kdcache.open_cache(url, storage_options=s3_server.options).split_attrs["complete"] is True

    # A wakes up with its stale view: its lease check still passes (its clock saw a recent renewal). A chunk it stores
    # holds the bytes any writer of these settings computes (unfenced, as every chunk); none of its metadata lands
    split_a.write(_rows(CHUNK, 2 * CHUNK))
    with pytest.raises(KDCacheError) as caught:
        split_a.close({"n": ROWS, "source": "test"})
    message = str(caught.value)
    assert "\n" not in message and url in message and "another writer" in message, message
    with pytest.raises(KDCacheError, match="another writer"):
        writer_a.finalize()
    lease_a.release()

    assert store_b.fs.cat_file(f"{store_b.root}/train/zarr.json") == finished
    assert not store_b.fs.exists(f"{store_b.root}/.kdcache-progress/train/1.json")  # A's late record, removed
    cache = kdcache.open_cache(url, storage_options=s3_server.options)
    assert cache.split_attrs["complete"] is True and len(cache) == ROWS
    np.testing.assert_array_equal(np.asarray(cache.fingerprint[:]), _rows(0, ROWS)["fingerprint"])
    assert verify_cache(url, storage_options=s3_server.options).ok


def test_a_writer_whose_lease_is_lost_during_a_block_writes_no_metadata(s3_server, s3_bucket, monkeypatch):
    """The lease is checked right before every record and metadata write, not only once per chunk: a writer that
    learns of the loss while it stores a chunk does not record it, nor close the split or the cache."""
    from zarr.storage import FsspecStore

    url = f"s3://{s3_bucket}/lost.kdcache"
    store = CacheStore(url, s3_server.options)
    lease = Lease(store, seconds=600).acquire()
    writer = CacheWriter(store, HEADER, lock=lease)
    split = _split(writer)
    split.write(_rows(0, CHUNK))
    before = store.fs.cat_file(f"{store.root}/train/zarr.json")
    chunk_write = FsspecStore.set

    async def renewal_fails_meanwhile(self, key, value, *args, **kwargs):  # the renewal thread's finding lands
        await chunk_write(self, key, value, *args, **kwargs)
        lease.lost = f"{url}: the writer's lease was taken by another writer"

    monkeypatch.setattr(FsspecStore, "set", renewal_fails_meanwhile)
    with pytest.raises(KDCacheError, match="lease was taken"):
        split.write(_rows(CHUNK, 2 * CHUNK))
    monkeypatch.setattr(FsspecStore, "set", chunk_write)
    with pytest.raises(KDCacheError, match="lease was taken"):
        split.close({"n": ROWS, "source": "test"})
    with pytest.raises(KDCacheError, match="lease was taken"):
        writer.finalize()
    lease.release()
    assert store.fs.cat_file(f"{store.root}/train/zarr.json") == before
    assert split.recorded == [0]  # chunk 1 was stored, never recorded: a resume writes it again


def test_a_lease_record_is_read_with_its_own_etag(s3_server, s3_bucket, monkeypatch):
    """A record and another version's ETag are never paired: the object replaced right after it was read still
    gives the ETag of the bytes returned."""
    url = f"s3://{s3_bucket}/paired.kdcache"
    lease = Lease(CacheStore(url, s3_server.options), seconds=30)
    first = json.dumps({"id": "a", "host": "h", "pid": 1, "expires": 0}).encode()
    later = json.dumps({"id": "b", "host": "h", "pid": 2, "expires": 10**10}).encode()
    fs = lease.store.fs
    fs.pipe_file(lease.key, first)
    for name in ("cat_file", "info", "cat", "open"):  # whichever request answers first, the lease changes after it
        original = getattr(fs, name)

        def replaced_after(*args, _original=original, **kwargs):
            out = _original(*args, **kwargs)
            s3fs.S3FileSystem(**s3_server.options, skip_instance_cache=True).pipe_file(lease.key, later)
            return out

        monkeypatch.setattr(fs, name, replaced_after)
    record, etag = lease._read()
    assert record["id"] == "a"
    assert etag.strip('"') == hashlib.md5(first).hexdigest()  # single-part PUT: the ETag is the bytes' MD5


@pytest.mark.parametrize("damage", ['{"expires": "abc"}', '{"expires": null}', '{"expires": [1]}',
                                    '{"expires": 1e308}', '{"expires": NaN}', '[1, 2]', 'null', 'not json'])
def test_a_damaged_lease_is_one_line_naming_it(s3_server, s3_bucket, damage):
    url = f"s3://{s3_bucket}/damaged.kdcache"
    store = CacheStore(url, s3_server.options)
    store.fs.pipe_file(f"{store.root}.lock", damage.encode())
    with pytest.raises(KDCacheError) as caught:
        Lease(store, seconds=30).acquire()
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{url}.lock: ") and "damaged" in message, message
    assert "delete" in message
    assert store.fs.cat_file(f"{store.root}.lock") == damage.encode()  # left for the user to judge
    assert not store.fs.exists(f"{store.root}/zarr.json")


@pytest.fixture(scope="module")
def digits_teacher(tmp_path_factory):
    from kdcache.recipes.demo import train_digits_teacher

    folder = tmp_path_factory.mktemp("teacher") / "teacher"
    train_digits_teacher(folder, epochs=1)
    return folder


def test_a_damaged_lease_in_the_cli_is_one_line(capsys, monkeypatch, s3_server, s3_bucket, digits_teacher):
    url = f"s3://{s3_bucket}/cli.kdcache"
    store = CacheStore(url, s3_server.options)
    store.fs.pipe_file(f"{store.root}.lock", b'{"expires": "abc"}')
    options = [f"--storage-option={k}={v}" for k, v in s3_server.options.items()]
    code, _, err = run_cli(["cache-teacher", "--teacher", str(digits_teacher), "--task", "digits", "--out", url,
                            "--no-progress", *options], capsys, monkeypatch)
    _one_error_line(code, err, f"{url}.lock", "damaged", "delete")  # the lease is taken before the teacher is loaded


# --- metadata files that are no plain files ------------------------------------------------------------------------

def _small_cache(path) -> None:
    writer = CacheWriter(path, HEADER)
    split = _split(writer)
    split.write(_rows(0, ROWS))
    split.close({"n": ROWS, "source": "test"})
    writer.finalize()


OPEN_CACHE = """
import sys, kdcache
from kdcache.errors import KDCacheError
try:
    kdcache.open_cache(sys.argv[1])
except KDCacheError as exc:
    print(exc)
"""


@pytest.mark.parametrize("where", ["zarr.json", "train/zarr.json", "train/logits/zarr.json"])
@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_a_metadata_file_that_is_a_fifo_or_a_device_is_one_line(tmp_path, capsys, monkeypatch, kind, where):
    cache = tmp_path / "c.kdcache"
    _small_cache(cache)
    target = cache / where
    target.unlink()
    if kind == "fifo":
        os.mkfifo(target)
    else:
        target.symlink_to("/dev/zero")
    # each in a process of its own: a hang would show as a timeout, never as a pass
    opened = subprocess.run([sys.executable, "-c", OPEN_CACHE, str(cache)], capture_output=True, text=True,
                            timeout=120)
    message = opened.stdout.strip()
    assert opened.returncode == 0 and "\n" not in message, opened.stderr[-2000:]
    assert message.startswith(f"{target}: ") and "not a plain file" in message, message
    done = subprocess.run([sys.executable, "-c", "from kdcache.cli.main import main; main()", "info", str(cache)],
                          capture_output=True, text=True, timeout=120)
    _one_error_line(done.returncode, done.stderr, str(target), "not a plain file")


def test_an_oversized_metadata_file_is_refused_before_it_is_read(tmp_path, monkeypatch):
    from kdcache.cache import store as store_module

    cache = tmp_path / "c.kdcache"
    _small_cache(cache)
    monkeypatch.setattr(store_module, "MAX_METADATA_BYTES", 64)
    with pytest.raises(KDCacheError, match=r"zarr.json: .* more than the 64 bytes a metadata file may hold"):
        kdcache.open_cache(cache)


def test_a_remote_metadata_file_is_read_within_its_bound(s3_server, s3_bucket, monkeypatch):
    from kdcache.cache import store as store_module

    url = f"s3://{s3_bucket}/big.kdcache"
    _small_cache(CacheStore(url, s3_server.options))
    assert kdcache.open_cache(url, storage_options=s3_server.options).split_attrs["complete"] is True
    fs = s3fs.S3FileSystem(**s3_server.options, skip_instance_cache=True)
    fs.pipe_file(f"{s3_bucket}/big.kdcache/train/zarr.json", b" " * 4096 + fs.cat_file(
        f"{s3_bucket}/big.kdcache/train/zarr.json"))
    monkeypatch.setattr(store_module, "MAX_METADATA_BYTES", 4096)
    with pytest.raises(KDCacheError, match=r"big.kdcache/train/zarr.json: .* more than the 4,096 bytes"):
        kdcache.open_cache(url, storage_options=s3_server.options)
