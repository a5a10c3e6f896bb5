"""Feeds cached teacher logits to a training loop, batch by batch, without ever making it wait for the disk.

For each minibatch `LogitBatches.epoch(e)` yields `(rows, teacher_logits, labels)`: `rows` are positions in
the split (on the CPU, to fetch the matching inputs: row r of the cache is row r of the dataset split), the
others live on the training device, logits as float32. A cache may hold further float arrays of the same rows
(teacher checkpoints, hidden-state projections): `arrays=` names those to serve, and `epoch(e, arrays=...)`
picks some of them for one epoch; with one array the second element is its tensor, with several a dict
name -> tensor, every array cut from the very same rows. The order depends only on (seed, epoch), so a resumed
run replays exactly the epoch it stopped in. Two ways to read, chosen by size (`mode="auto"`):

- memory: both arrays are read once, in one Zarr read each, and kept as tensors on the device; each epoch is
  a `torch.randperm` seeded from (seed, epoch), and batches are gathered on the device.
- chunks: for caches larger than memory. Each epoch shuffles the order of the stored chunks, reads
  `buffer_chunks` of them at a time into a buffer, shuffles rows within it and cuts batches from it. A
  background thread reads the next buffer while the current one is consumed (at most two buffers ahead: one
  ready, one being read); its errors, e.g. a checksum failure (a KDCacheError naming the chunk file), are
  re-raised in the training loop. Rows left over at the end of a buffer are carried into the next, so every
  batch is full except perhaps the last, exactly as in memory mode. Shuffling is therefore local (within
  `buffer_chunks` chunks) but every row still comes exactly once per epoch.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Iterator

import numpy as np
import torch

from kdcache.cache.reader import TeacherCache

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
MODES = ("auto", "memory", "chunks")


def epoch_seed(seed: int, epoch: int) -> int:
    """One well-mixed 63-bit seed per (seed, epoch), so neighbouring epochs or seeds share no structure."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


class LogitBatches:
    """Minibatches of (rows, teacher logits, labels) of one cache split, reproducible per (seed, epoch)."""

    def __init__(
        self,
        cache: TeacherCache,
        batch_size: int,
        *,
        seed: int,
        device: torch.device | str = "cpu",
        mode: str = "auto",
        memory_limit_bytes: int = 2 * 1024**3,
        buffer_chunks: int = 8,
        drop_last: bool = False,
        shuffle: bool = True,
        arrays: tuple[str, ...] = ("logits",),
    ) -> None:
        if batch_size < 1 or buffer_chunks < 1:
            raise ValueError("batch_size and buffer_chunks must be at least 1")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        if seed < 0:
            raise ValueError("seed must be non-negative")
        self.cache, self.batch_size, self.seed = cache, batch_size, seed
        self.device = torch.device(device)
        self.buffer_chunks, self.drop_last, self.shuffle = buffer_chunks, drop_last, shuffle
        self.rows = len(cache)
        self.chunk_rows = int(cache.logits.chunks[0])
        self.arrays = tuple(arrays)
        if not self.arrays:
            raise ValueError("arrays must name at least one float array")
        for name in self.arrays:
            if name not in cache.arrays:
                cache.read(name, 0, 0)  # raises the one-line error naming the arrays the split has
        if mode == "auto":
            size = sum(cache.arrays[name].nbytes for name in self.arrays) + cache.labels.nbytes
            mode = "memory" if size <= memory_limit_bytes else "chunks"
        self.mode = mode
        if mode == "memory":
            # upload as stored (float16 halves the transfer), convert on the device
            # checked reads: a damaged or missing chunk is a one-line error naming its file (TeacherCache.read)
            self._floats = {name: torch.from_numpy(cache.read(name)).to(self.device).float() for name in self.arrays}
            self._labels = torch.from_numpy(cache.read("labels")).to(self.device)

    def __len__(self) -> int:
        """Batches per epoch."""
        full, rest = divmod(self.rows, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def epoch(self, e: int, arrays: tuple[str, ...] | None = None) -> Iterator[Batch]:
        """The batches of epoch `e`, in an order fixed by (seed, e) whatever `arrays` are picked."""
        picked = tuple(arrays) if arrays is not None else self.arrays
        unknown = [name for name in picked if name not in self.arrays]
        if unknown or not picked:
            raise ValueError(f"arrays {unknown or picked} are not among those served ({', '.join(self.arrays)})")
        batches = self._memory_epoch(e, picked) if self.mode == "memory" else self._chunk_epoch(e, picked)
        for rows, floats, labels in batches:
            yield rows, (floats[0] if len(picked) == 1 else dict(zip(picked, floats))), labels

    def _memory_epoch(self, e: int, picked: tuple[str, ...]) -> Iterator[tuple]:
        if self.shuffle:
            order = torch.randperm(self.rows, generator=torch.Generator().manual_seed(epoch_seed(self.seed, e)))
        else:
            order = torch.arange(self.rows)
        on_device = order.to(self.device)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            idx = on_device[start : start + self.batch_size]
            yield order[start : start + self.batch_size], [self._floats[n][idx] for n in picked], self._labels[idx]

    def _chunk_epoch(self, e: int, picked: tuple[str, ...]) -> Iterator[tuple]:
        rng = np.random.default_rng(epoch_seed(self.seed, e))
        nchunks = -(-self.rows // self.chunk_rows)
        chunks = rng.permutation(nchunks) if self.shuffle else np.arange(nchunks)
        groups = [chunks[i : i + self.buffer_chunks] for i in range(0, nchunks, self.buffer_chunks)]
        carry: list | None = None
        read = lambda group, r: self._read_buffer(group, r, picked)  # noqa: E731
        for rows, floats, labels in _prefetch(read, groups, rng if self.shuffle else None):
            # upload as stored (from pinned memory, asynchronously), convert on the device
            to = self.device
            buffer = [rows, *(f.to(to, non_blocking=True).float() for f in floats), labels.to(to, non_blocking=True)]
            if carry is not None:
                buffer = [torch.cat(pair) for pair in zip(carry, buffer)]
            full = len(buffer[0]) - len(buffer[0]) % self.batch_size
            for start in range(0, full, self.batch_size):
                cut = [t[start : start + self.batch_size] for t in buffer]
                yield cut[0], cut[1:-1], cut[-1]
            carry = [t[full:] for t in buffer] if full < len(buffer[0]) else None
        if carry is not None and not self.drop_last:
            yield carry[0], carry[1:-1], carry[-1]

    def _read_buffer(self, chunks: np.ndarray, rng: np.random.Generator | None, picked: tuple[str, ...]) -> tuple:
        """Runs on the prefetch thread: read whole chunks, shuffle their rows, pin them for a fast upload."""
        spans = [(c * self.chunk_rows, min((c + 1) * self.chunk_rows, self.rows)) for c in chunks]
        rows = np.concatenate([np.arange(a, b) for a, b in spans])
        floats = [np.concatenate([self.cache.read(name, a, b) for a, b in spans]) for name in picked]
        labels = np.concatenate([self.cache.read("labels", a, b) for a, b in spans])
        if rng is not None:
            perm = rng.permutation(len(rows))
            rows, floats, labels = rows[perm], [f[perm] for f in floats], labels[perm]
        rows, labels = torch.from_numpy(np.ascontiguousarray(rows)), torch.from_numpy(np.ascontiguousarray(labels))
        floats = [torch.from_numpy(np.ascontiguousarray(f)) for f in floats]
        if self.device.type == "cuda":  # pinned host memory makes the non_blocking upload truly asynchronous
            floats, labels = [f.pin_memory() for f in floats], labels.pin_memory()
        return rows, floats, labels


_DONE = object()


def _prefetch(read, groups: list, rng) -> Iterator[Batch]:
    """Yield `read(group, rng)` for each group, computed one step ahead on a thread; re-raise its errors here."""
    ready: queue.Queue = queue.Queue(maxsize=1)  # one buffer ready + one being read = two in flight
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for group in groups:  # in order, so the rng (and thus the epoch) is deterministic
                if not put(read(group, rng)):
                    return
            put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            put(exc)

    thread = threading.Thread(target=work, name="kdcache-prefetch", daemon=True)
    thread.start()
    try:
        while (item := ready.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:  # also reached when the consumer stops early: release the thread
        stop.set()
        thread.join()


class LabelBatches:
    """Shuffled minibatches of (rows, None, labels) without a cache: `kdcache train`'s twin of LogitBatches."""

    def __init__(self, labels: torch.Tensor, batch_size: int, *, seed: int, device: torch.device) -> None:
        self.labels, self.batch_size, self.seed = labels.to(device), batch_size, seed
        self.rows = len(labels)

    def __len__(self) -> int:
        return -(-self.rows // self.batch_size)

    def epoch(self, e: int, arrays: tuple[str, ...] | None = None) -> Iterator[tuple[torch.Tensor, None, torch.Tensor]]:
        """The batches of epoch `e` (no teacher arrays: `arrays` must be empty)."""
        order = torch.randperm(self.rows, generator=torch.Generator().manual_seed(epoch_seed(self.seed, e)))
        for start in range(0, self.rows, self.batch_size):
            rows = order[start : start + self.batch_size]
            yield rows, None, self.labels[rows.to(self.labels.device)]


def read_throughput(cache: TeacherCache, batch_size: int, mode: str, device: torch.device | str = "cpu") -> float:
    """Rows per second over one shuffled epoch, counting the initial load of memory mode; for benchmarks."""
    start = time.perf_counter()
    batches = LogitBatches(cache, batch_size, seed=0, device=device, mode=mode)
    for _ in batches.epoch(0):
        pass
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return len(cache) / (time.perf_counter() - start)
