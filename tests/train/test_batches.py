"""What `LogitBatches` promises a training loop: every row once per epoch, aligned logits, replayable order."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import kdcache
from kdcache.cache import codecs, schema as fmt
from kdcache.errors import KDCacheError
from kdcache.train.batches import LogitBatches, read_throughput
from kdcache.cache.writer import CacheWriter

N, C, CHUNK, BATCH = 5000, 7, 1024, 96  # N is a multiple of neither the chunk nor the batch


def _write_cache(path, n=N, c=C, chunk_rows=CHUNK):
    rng = np.random.default_rng(0)
    writer = CacheWriter(path, {"teacher": {"num_outputs": c}, "task": {"kind": "classification"}})
    split = writer.add_split("train", rows=n, num_outputs=c, kind="classification", dtype="float16",
                             codec=codecs.DEFAULT_CODEC, chunk_rows=chunk_rows)
    split.write({"logits": rng.normal(size=(n, c)).astype(np.float32) * 4, "labels": rng.integers(0, c, size=n),
                 "index": np.arange(n), "fingerprint": rng.integers(0, 2**62, size=n, dtype=np.uint64)})
    split.close({"n": n})
    writer.finalize()
    return kdcache.open_cache(path)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return _write_cache(tmp_path_factory.mktemp("stream") / "c.kdcache")


def _rows(batches: LogitBatches, e: int = 0) -> np.ndarray:
    return np.concatenate([rows.numpy() for rows, _, _ in batches.epoch(e)])


MODES = [("memory", {}), ("chunks", {"buffer_chunks": 1}), ("chunks", {"buffer_chunks": 3}), ("chunks", {})]


@pytest.mark.parametrize("mode,extra", MODES)
def test_every_row_exactly_once_with_full_batches(cache, mode, extra):
    batches = LogitBatches(cache, BATCH, seed=1, mode=mode, **extra)
    assert batches.mode == mode
    sizes = [len(rows) for rows, _, _ in batches.epoch(0)]
    assert len(sizes) == len(batches) == -(-N // BATCH)
    assert set(sizes[:-1]) == {BATCH} and sizes[-1] == N % BATCH
    for e in (0, 1):
        assert np.array_equal(np.sort(_rows(batches, e)), np.arange(N))


@pytest.mark.parametrize("mode", ["memory", "chunks"])
def test_drop_last_drops_only_the_short_batch(cache, mode):
    batches = LogitBatches(cache, BATCH, seed=1, mode=mode, buffer_chunks=2, drop_last=True)
    rows = _rows(batches)
    assert len(batches) == N // BATCH and len(rows) == N // BATCH * BATCH == len(np.unique(rows))


@pytest.mark.parametrize("mode", ["memory", "chunks"])
def test_yielded_logits_and_labels_are_those_of_the_rows(cache, mode):
    stored_logits, stored_labels = cache.logits[:], cache.labels[:]
    for rows, logits, labels in LogitBatches(cache, BATCH, seed=3, mode=mode, buffer_chunks=2).epoch(0):
        assert rows.dtype == torch.int64 and rows.device.type == "cpu"
        assert logits.dtype == torch.float32 and logits.shape == (len(rows), C)
        np.testing.assert_array_equal(logits.numpy(), stored_logits[rows.numpy()].astype(np.float32))
        np.testing.assert_array_equal(labels.numpy(), stored_labels[rows.numpy()])


@pytest.mark.parametrize("mode", ["memory", "chunks"])
def test_order_depends_only_on_seed_and_epoch(cache, mode):
    a = LogitBatches(cache, BATCH, seed=7, mode=mode, buffer_chunks=2)
    b = LogitBatches(cache, BATCH, seed=7, mode=mode, buffer_chunks=2)  # a resumed run
    other_seed = LogitBatches(cache, BATCH, seed=8, mode=mode, buffer_chunks=2)
    assert np.array_equal(_rows(a, 3), _rows(b, 3))
    assert not np.array_equal(_rows(a, 3), _rows(a, 4))
    assert not np.array_equal(_rows(a, 3), _rows(other_seed, 3))


def test_chunks_mode_shuffles_chunk_order_and_mixes_chunks_within_a_batch(cache):
    rows, _, _ = next(iter(LogitBatches(cache, BATCH, seed=0, mode="chunks", buffer_chunks=3).epoch(0)))
    assert len(np.unique(rows.numpy() // CHUNK)) > 1
    one_chunk_buffers = LogitBatches(cache, BATCH, seed=0, mode="chunks", buffer_chunks=1)
    rows, _, _ = next(iter(one_chunk_buffers.epoch(0)))
    assert len(np.unique(rows.numpy() // CHUNK)) == 1  # one chunk per buffer: nothing to mix with
    chunks = _rows(one_chunk_buffers) // CHUNK
    visited = chunks[np.r_[True, chunks[1:] != chunks[:-1]]]
    assert sorted(visited) == list(range(5)) and list(visited) != sorted(visited)


def test_corrupt_chunk_is_raised_in_the_training_loop(tmp_path):
    cache = _write_cache(tmp_path / "c.kdcache")
    chunk_file = tmp_path / "c.kdcache" / "train" / "logits" / "c" / "3" / "0"
    data = bytearray(chunk_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk_file.write_bytes(bytes(data))
    seen = []
    with pytest.raises(KDCacheError, match="checksum") as excinfo:
        for rows, _, _ in LogitBatches(cache, BATCH, seed=0, mode="chunks", buffer_chunks=1).epoch(0):
            seen.append(rows)
    message = str(excinfo.value)  # one line naming split, array, chunk and file
    assert "\n" not in message and "split 'train', array 'logits', chunk 3 (rows 3072:4096)" in message
    assert str(chunk_file) in message
    assert 0 < len(seen) < -(-N // BATCH)  # healthy chunks came through first; the bad one stopped the epoch
    assert not any(t.name == "kdcache-prefetch" for t in threading.enumerate())


def test_stopping_early_releases_the_prefetch_thread(cache):
    epoch = LogitBatches(cache, BATCH, seed=0, mode="chunks", buffer_chunks=1).epoch(0)
    next(epoch)
    epoch.close()  # what happens when a loop breaks out and drops the generator
    assert not any(t.name == "kdcache-prefetch" for t in threading.enumerate())


def test_auto_picks_by_size_and_windows_fill_half_the_budget(cache):
    assert LogitBatches(cache, BATCH, seed=0).mode == "memory"  # a quarter of this machine's RAM by default
    split_bytes = N * (C * 2 + 8)  # float16 logits and int64 labels: 5 chunks
    streamed = LogitBatches(cache, BATCH, seed=0, memory_limit_bytes=split_bytes * 4 // 5)
    assert streamed.mode == "chunks" and streamed.targets.window_chunks == 2  # two windows of 2 chunks in 4
    with pytest.raises(KDCacheError, match="a memory budget of 1,000 bytes holds no chunk of .* raise --memory-budget"):
        LogitBatches(cache, BATCH, seed=0, memory_limit_bytes=1000)


@pytest.mark.parametrize("mode", ["memory", "chunks"])
def test_no_shuffle_is_row_order(cache, mode):
    batches = LogitBatches(cache, BATCH, seed=0, mode=mode, buffer_chunks=2, shuffle=False)
    assert np.array_equal(_rows(batches, 5), np.arange(N))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["memory", "chunks"])
def test_cuda_batches_live_on_the_device_and_match_the_cache(cache, mode):
    stored_logits, stored_labels = cache.logits[:], cache.labels[:]
    batches = LogitBatches(cache, BATCH, seed=3, device="cuda", mode=mode, buffer_chunks=2)
    seen = []
    for rows, logits, labels in batches.epoch(0):
        assert rows.device.type == "cpu" and logits.device.type == "cuda" and labels.device.type == "cuda"
        assert logits.dtype == torch.float32
        np.testing.assert_array_equal(logits.cpu().numpy(), stored_logits[rows.numpy()].astype(np.float32))
        np.testing.assert_array_equal(labels.cpu().numpy(), stored_labels[rows.numpy()])
        seen.append(rows)
    assert np.array_equal(np.sort(torch.cat(seen).numpy()), np.arange(N))


@pytest.mark.parametrize("device_bytes", [0, 1 << 30])
def test_targets_held_on_the_device_serve_what_the_host_gather_serves(cache, device_bytes):
    """Targets that fit the device's room are held there and gathered by an index uploaded once per epoch (no
    copy from the host per step); both ways serve every batch's own rows, in the epoch's order."""
    from kdcache.train.batches import TeacherTargets

    stored_logits, stored_labels = cache.logits[:], cache.labels[:]
    targets = TeacherTargets(cache, device="cpu", mode="memory", device_bytes=device_bytes)
    assert targets.on_device == bool(device_bytes)
    plan = targets.order(BATCH, seed=3).plan(2)
    served = list(targets.epoch(plan))
    assert len(served) == len(plan.batches)
    for rows, (logits, labels) in zip(plan.batches, served):
        assert logits.dtype == torch.float32 and logits.shape == (len(rows), C)
        np.testing.assert_array_equal(logits.numpy(), stored_logits[rows].astype(np.float32))
        np.testing.assert_array_equal(labels.numpy(), stored_labels[rows])


def test_read_throughput_is_positive(cache):
    assert read_throughput(cache, BATCH, "chunks") > 0


def test_a_class_sorted_split_is_mixed_by_the_full_shuffle_and_by_windows_as_wide_as_the_budget():
    """On ImageNet-like class-sorted rows (1000 classes of 128), a full shuffle puts about 226 classes in a batch
    of 256 (a uniform draw's expectation); windows of chunks hold fewer, more with a wider window, and every row
    still comes once per epoch."""
    from kdcache.train.batches import EpochOrder

    labels = np.repeat(np.arange(1000), 128)
    n = len(labels)

    def classes(order):
        plan = order.plan(1)
        assert np.array_equal(np.sort(np.concatenate(plan.batches)), np.arange(n))
        return np.mean([len(np.unique(labels[b])) for b in plan.batches])

    full = classes(EpochOrder(n, 256, seed=0))
    narrow = classes(EpochOrder(n, 256, seed=0, chunk_rows=1024, window_chunks=4))
    wide = classes(EpochOrder(n, 256, seed=0, chunk_rows=1024, window_chunks=64))
    assert 215 < full < 235
    assert narrow < 35 < wide < full
