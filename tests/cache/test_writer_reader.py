"""The cache format's promises at the writer/reader level, without any model."""

from __future__ import annotations

import errno
import json

import numpy as np
import pytest
import zarr

import kdcache
from kdcache.cache import codecs, schema as fmt
from kdcache.errors import KDCacheError
from kdcache.fingerprint import dataset_digest
from kdcache.cache.writer import BackgroundWriter, CacheWriter


def _rows(n: int, c: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, c)).astype(np.float32) * 4
    labels = rng.integers(0, c, size=n)
    index = np.arange(n, dtype=np.int64)
    fps = rng.integers(0, 2**63, size=n, dtype=np.uint64) * np.uint64(2)
    return logits, labels, index, fps


def _write(path, n=2500, c=3, chunk_rows=1024, batch=97, dtype="float16", finalize=True):
    logits, labels, index, fps = _rows(n, c)
    writer = CacheWriter(path, {"teacher": {"num_outputs": c}, "task": {"kind": "classification"}})
    split = writer.add_split("train", rows=n, num_outputs=c, kind="classification", dtype=dtype,
                             codec=codecs.DEFAULT_CODEC, chunk_rows=chunk_rows)
    with BackgroundWriter(split.write) as background:
        for start in range(0, n, batch):
            sl = slice(start, start + batch)
            background.put({"logits": logits[sl], "labels": labels[sl], "index": index[sl], "fingerprint": fps[sl]})
    split.close({"n": n, "source": "test"})
    if finalize:
        writer.finalize()
    return logits, labels, index, fps


def test_round_trip_in_ragged_batches(tmp_path):
    logits, labels, index, fps = _write(tmp_path / "c.kdcache")
    cache = kdcache.open_cache(tmp_path / "c.kdcache", split="train")
    assert len(cache) == 2500 and cache.num_outputs == 3
    np.testing.assert_array_equal(cache.logits[:], logits.astype(np.float16))
    np.testing.assert_array_equal(cache.labels[:], labels)
    np.testing.assert_array_equal(cache.index[:], index)
    np.testing.assert_array_equal(cache.fingerprint[:], fps)
    assert cache.split_attrs["dataset"]["digest"] == dataset_digest(fps)
    assert cache.logits.chunks == (1024, 3)
    # numpy-compatible and lazy: fancy slicing reads only what it needs
    assert np.asarray(cache.logits[5:7]).shape == (2, 3)


def test_float32_storage_is_exact(tmp_path):
    logits, *_ = _write(tmp_path / "c.kdcache", dtype="float32")
    np.testing.assert_array_equal(kdcache.open_cache(tmp_path / "c.kdcache").logits[:], logits)


def test_every_array_chunk_carries_a_crc32c(tmp_path):
    _write(tmp_path / "c.kdcache")
    group = zarr.open_group(str(tmp_path / "c.kdcache"), mode="r")
    for name in fmt.BASE_ARRAYS:
        meta = json.loads((tmp_path / "c.kdcache" / "train" / name / "zarr.json").read_text())
        assert meta["codecs"][-1]["name"] == "crc32c", name
        assert group["train"][name].nchunks_initialized == group["train"][name].nchunks


def test_all_zero_label_chunk_is_still_written(tmp_path):
    path = tmp_path / "c.kdcache"
    writer = CacheWriter(path, {})
    split = writer.add_split("train", rows=8, num_outputs=2, kind="classification", dtype="float16",
                             codec="zstd3", chunk_rows=4)
    split.write({"logits": np.zeros((8, 2), np.float32), "labels": np.zeros(8, np.int64), "index": np.zeros(8, np.int64),
                 "fingerprint": np.zeros(8, np.uint64)})
    split.close({"n": 8})
    writer.finalize()
    labels = zarr.open_group(str(path), mode="r")["train"]["labels"]
    assert labels.nchunks_initialized == 2


def test_incomplete_cache_is_refused(tmp_path):
    _write(tmp_path / "c.kdcache", finalize=False)
    with pytest.raises(KDCacheError, match="incomplete"):
        kdcache.open_cache(tmp_path / "c.kdcache")
    assert len(kdcache.open_cache(tmp_path / "c.kdcache", allow_incomplete=True)) == 2500


def test_newer_format_version_is_refused(tmp_path):
    path = tmp_path / "c.kdcache"
    _write(path)
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["format_version"] = fmt.FORMAT_VERSION + 1
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(KDCacheError, match="newer than this kdcache"):
        kdcache.open_cache(path)


def test_hand_edited_row_count_is_refused(tmp_path):
    path = tmp_path / "c.kdcache"
    _write(path)
    meta_file = path / "train" / "zarr.json"
    meta = json.loads(meta_file.read_text())
    meta["attributes"]["rows"] = 2499
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(KDCacheError, match="row counts disagree"):
        kdcache.open_cache(path)


def test_unknown_split_and_foreign_folders(tmp_path):
    path = tmp_path / "c.kdcache"
    _write(path)
    with pytest.raises(KDCacheError, match="no split 'validation'.*splits: train"):
        kdcache.open_cache(path, split="validation")
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    with pytest.raises(KDCacheError, match="not a kdcache cache"):
        kdcache.open_cache(tmp_path / "plain.zarr")
    with pytest.raises(KDCacheError, match="no such cache"):
        kdcache.open_cache(tmp_path / "absent")


def test_cache_is_read_only(tmp_path):
    _write(tmp_path / "c.kdcache")
    cache = kdcache.open_cache(tmp_path / "c.kdcache")
    with pytest.raises(Exception):
        cache.logits[0] = 1.0


def test_existing_path_refused_and_overwrite_only_replaces_caches(tmp_path):
    path = tmp_path / "c.kdcache"
    _write(path)
    with pytest.raises(KDCacheError, match="already exists; pass --overwrite"):
        CacheWriter(path, {})
    CacheWriter(path, {}, overwrite=True)  # replaces the old cache
    other = tmp_path / "precious"
    other.mkdir()
    (other / "thesis.tex").write_text("do not delete")
    with pytest.raises(KDCacheError, match="not a kdcache cache"):
        CacheWriter(other, {}, overwrite=True)
    assert (other / "thesis.tex").exists()


def test_interrupted_cache_is_named_incomplete_on_rerun(tmp_path):
    path = tmp_path / "c.kdcache"
    _write(path, finalize=False)
    with pytest.raises(KDCacheError, match="incomplete cache"):
        CacheWriter(path, {})


def test_nan_and_float16_overflow_rejected_before_disk(tmp_path):
    writer = CacheWriter(tmp_path / "c.kdcache", {})
    split = writer.add_split("train", rows=4, num_outputs=2, kind="classification", dtype="float16",
                             codec="zstd3", chunk_rows=4)
    bad = np.array([[0, 1], [np.nan, 0], [0, 0], [0, 0]], np.float32)
    with pytest.raises(KDCacheError, match=r"row 1 \(source index 11\).*NaN or Inf"):
        split.write({"logits": bad, "labels": np.zeros(4), "index": np.arange(10, 14), "fingerprint": np.zeros(4, np.uint64)})
    huge = np.array([[0, 1e6]] * 4, np.float32)
    with pytest.raises(KDCacheError, match="float16 range; rerun with --dtype float32"):
        split.write({"logits": huge, "labels": np.zeros(4), "index": np.arange(4), "fingerprint": np.zeros(4, np.uint64)})


def test_disk_full_leaves_incomplete_cache_and_one_line_error(tmp_path, monkeypatch):
    path = tmp_path / "c.kdcache"
    writer = CacheWriter(path, {})
    split = writer.add_split("train", rows=8, num_outputs=2, kind="classification", dtype="float16",
                             codec="zstd3", chunk_rows=4)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(zarr.storage.LocalStore, "set", full)
    background = BackgroundWriter(split.write)
    background.put({"logits": np.zeros((8, 2), np.float32), "labels": np.zeros(8), "index": np.arange(8),
                    "fingerprint": np.zeros(8, np.uint64)})
    with pytest.raises(KDCacheError, match="disk full while writing split 'train'") as info:
        background.close()
    assert "\n" not in str(info.value)
    monkeypatch.undo()
    with pytest.raises(KDCacheError, match="incomplete"):
        kdcache.open_cache(path)


def test_default_chunk_rows_targets_half_a_mebibyte():
    assert fmt.default_chunk_rows(2, 2) == 65536  # capped
    assert fmt.default_chunk_rows(100, 2) == 2048  # 2048*100*2 = 400 KiB, a power of two under 512 KiB
    assert fmt.default_chunk_rows(1000, 4) == 1024  # floor
