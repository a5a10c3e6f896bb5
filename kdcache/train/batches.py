"""The rows of each epoch, and the teacher's targets for them, without ever making a training loop wait for storage.

An epoch's order is decided before its first step, from (seed, epoch) alone (`EpochOrder`), so the student's
inputs (decoded by a DataLoader, kdcache/train/inputs.py) and the teacher's targets (`TeacherTargets`) follow
the very same rows, and a resumed run replays exactly the epoch it stopped in. Two ways to hold the targets,
chosen by size against a host-memory budget (`mode="auto"`, default a quarter of this machine's RAM):

- memory: every target array of the split is read once (one Zarr read, chunks fetched concurrently) and kept in
  host memory as stored (float16 stays float16); each epoch is a full shuffle (`torch.randperm` seeded from
  (seed, epoch)) and a batch is a gather, converted to float32. On a GPU, arrays that also fit an eighth of its
  free memory are held there and gathered by the epoch's order, uploaded once; larger ones are gathered on the
  host into pinned memory and copied per batch, so the host budget never fills a GPU and no step waits on a copy
  from pageable memory.
- chunks: for caches larger than the budget. Each epoch shuffles the order of the stored chunks, takes them in
  windows of as many chunks as half the budget holds (two windows are in memory: one being read ahead on a
  thread, which starts on the next only once the loop has taken the last, and one in use), shuffles the rows
  within each window and cuts batches from the windows in turn. With a
  window of W chunks, a batch mixes rows from up to W chunks (docs/benchmarks.md measures the classes per
  batch on a class-sorted split). A read error (e.g. a checksum failure, a KDCacheError naming the chunk file)
  is re-raised in the training loop.

`LogitBatches` puts the two together for loops (and tests) that want (rows, targets, labels) per batch;
`LabelBatches` is the order alone, for `kdcache train`.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from kdcache.cache.reader import TeacherCache
from kdcache.errors import KDCacheError
from kdcache.names import DEFAULT_BUDGET_SHARE, parse_budget, total_memory  # noqa: F401 - re-exported

Batch = tuple[torch.Tensor, Any, torch.Tensor]
MODES = ("auto", "memory", "chunks")
def epoch_seed(seed: int, epoch: int) -> int:
    """One well-mixed 63-bit seed per (seed, epoch), so neighbouring epochs or seeds share no structure."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


@dataclass
class EpochPlan:
    """One epoch's order: its batches of row positions and, in chunk mode, the windows they are cut from."""

    batches: list[np.ndarray]
    windows: list[tuple[np.ndarray, np.ndarray]] | None = None  # (chunk numbers, row permutation within them)
    epoch: int = 0  # which epoch it orders (a views cache serves each row's view of that epoch)


class EpochOrder:
    """The batches of each epoch as row positions, fixed by (seed, epoch): a full shuffle, or windows of chunks
    (`window_chunks` chunks of `chunk_rows` rows) shuffled within, for targets streamed chunk by chunk."""

    def __init__(self, rows: int, batch_size: int, *, seed: int, shuffle: bool = True, drop_last: bool = False,
                 chunk_rows: int | None = None, window_chunks: int | None = None) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if seed < 0:
            raise ValueError("seed must be non-negative")
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.chunk_rows, self.window_chunks = chunk_rows, window_chunks

    def __len__(self) -> int:
        """Batches per epoch."""
        full, rest = divmod(self.rows, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def plan(self, epoch: int) -> EpochPlan:
        if self.window_chunks is None:
            if self.shuffle:
                generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
                order = torch.randperm(self.rows, generator=generator).numpy()
            else:
                order = np.arange(self.rows)
            return EpochPlan(self._cut(order), epoch=epoch)
        rng = np.random.default_rng(epoch_seed(self.seed, epoch))
        nchunks = -(-self.rows // self.chunk_rows)
        chunks = rng.permutation(nchunks) if self.shuffle else np.arange(nchunks)
        windows = []
        for i in range(0, nchunks, self.window_chunks):
            group = chunks[i:i + self.window_chunks]
            size = sum(min((c + 1) * self.chunk_rows, self.rows) - c * self.chunk_rows for c in group)
            windows.append((group, rng.permutation(size) if self.shuffle else np.arange(size)))
        order = np.concatenate([_window_rows(g, self.chunk_rows, self.rows)[p] for g, p in windows])
        return EpochPlan(self._cut(order), windows, epoch)

    def _cut(self, order: np.ndarray) -> list[np.ndarray]:
        stop = len(self) * self.batch_size
        return [order[a:min(a + self.batch_size, stop, len(order))] for a in range(0, stop, self.batch_size)]


def _window_rows(chunks: np.ndarray, chunk_rows: int, rows: int) -> np.ndarray:
    return np.concatenate([np.arange(c * chunk_rows, min((c + 1) * chunk_rows, rows)) for c in chunks])


class TeacherTargets:
    """A split's teacher arrays (and labels, and fingerprints) served by row: see the module docstring."""

    def __init__(self, cache: TeacherCache, arrays: tuple[str, ...] = ("logits",), *,
                 device: torch.device | str = "cpu", mode: str = "auto", budget_bytes: int | None = None,
                 window_chunks: int | None = None, device_bytes: int | None = None, views: Any = None) -> None:
        """`views` (kdcache.train.views.ViewChoice): a views cache, whose target arrays are served as the view each
        row trains on in the plan's epoch (`view_<array>` [N, V, ...] read under the plain array's name)."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        self.cache, self.arrays, self.device = cache, tuple(arrays), torch.device(device)
        if not self.arrays:
            raise ValueError("arrays must name at least one float array")
        self.views = views
        self._stored = {n: stored_name(cache, n, views) for n in self.arrays}
        for name in self._stored.values():
            if name not in cache.arrays:
                cache.read(name, 0, 0)  # raises the one-line error naming the arrays the split has
        self.rows, self.chunk_rows = len(cache), cache.chunk_rows
        self.mode, self.window_chunks = self.choose(cache, tuple(self._stored.values()), mode, budget_bytes,
                                                    window_chunks)
        self.on_device = False
        if self.mode == "memory":
            # host memory, as stored (float16 stays float16); every read is checked
            self._floats = {n: torch.from_numpy(cache.read(self._stored[n])) for n in self.arrays}
            self._labels = torch.from_numpy(cache.read("labels"))
            held = sum(t.nbytes for t in self._floats.values()) + self._labels.nbytes
            if held <= (device_room(self.device) if device_bytes is None else device_bytes):
                # on the training device when they fit (CIFAR-10's logits: 1 MB): a batch is then a gather there,
                # with no copy from the host per step
                self._floats = {n: t.to(self.device) for n, t in self._floats.items()}
                self._labels, self.on_device = self._labels.to(self.device), True

    @staticmethod
    def choose(cache: TeacherCache, arrays: tuple[str, ...], mode: str = "auto", budget_bytes: int | None = None,
               window_chunks: int | None = None) -> tuple[str, int | None]:
        """(mode, window_chunks) these arrays would be held in under this budget, without reading them: the
        batch order depends on it, so a sweep groups by it and torchrun decides it once, on rank 0."""
        budget = parse_budget(budget_bytes) if budget_bytes is None else int(budget_bytes)
        split_bytes = sum(cache.arrays[n].nbytes for n in arrays) + cache.labels.nbytes
        if mode == "auto":
            mode = "memory" if split_bytes <= budget else "chunks"
        if mode != "chunks":
            return mode, None
        rows = len(cache)
        chunk_bytes = max(1, split_bytes // max(1, -(-rows // cache.chunk_rows)))
        fits = window_chunks if window_chunks is not None else budget // 2 // chunk_bytes
        if fits < 1:
            raise KDCacheError(f"a memory budget of {budget:,} bytes holds no chunk of {cache.path}/{cache.split} "
                               f"(two windows of at least {chunk_bytes:,} bytes each are needed); raise "
                               "--memory-budget")
        return mode, int(fits)

    def order(self, batch_size: int, *, seed: int, shuffle: bool = True, drop_last: bool = False) -> EpochOrder:
        """The epoch order these targets can serve (windows of chunks in chunk mode)."""
        return EpochOrder(self.rows, batch_size, seed=seed, shuffle=shuffle, drop_last=drop_last,
                          chunk_rows=self.chunk_rows, window_chunks=self.window_chunks)

    def epoch(self, plan: EpochPlan, arrays: tuple[str, ...] | None = None) -> Iterator[tuple[Any, torch.Tensor]]:
        """(targets, labels) on the device for each batch of `plan`: one tensor with one array, else a dict."""
        picked = tuple(arrays) if arrays is not None else self.arrays
        unknown = [name for name in picked if name not in self.arrays]
        if unknown or not picked:
            raise ValueError(f"arrays {unknown or picked} are not among those served ({', '.join(self.arrays)})")
        parts = self._memory(plan, picked) if self.window_chunks is None else self._streamed(plan, picked)
        views = None
        if self.views is not None:  # each row's view of this epoch, chosen for the whole epoch and uploaded once
            every = np.concatenate(plan.batches) if plan.batches else np.zeros(0, dtype=np.int64)
            views = by_batch(self.views.of(every, plan.epoch), plan.batches, self.device)
        for floats, labels in parts:
            if views is not None:  # of the arrays stored per view, that view's
                view = next(views)
                at = torch.arange(len(view), device=view.device)
                floats = [f[at, view] if self._stored[n] != n else f for n, f in zip(picked, floats)]
            yield (floats[0] if len(picked) == 1 else dict(zip(picked, floats))), labels

    def _memory(self, plan: EpochPlan, picked: tuple[str, ...]) -> Iterator[tuple[list, torch.Tensor]]:
        if self.on_device:
            for index in epoch_index(plan.batches, self.device):
                yield [self._floats[n].index_select(0, index).float() for n in picked], \
                    self._labels.index_select(0, index)
            return
        for rows in plan.batches:
            index = torch.from_numpy(rows)
            yield self._batch(pinned([self._floats[n][index] for n in picked] + [self._labels[index]], self.device))

    def _streamed(self, plan: EpochPlan, picked: tuple[str, ...]) -> Iterator[tuple[list, torch.Tensor]]:
        """Batches cut from the windows in turn; a batch that straddles two windows is the only copy made, and
        the rows left over are copied out, so a window's memory goes as soon as the next one is taken."""
        carry: list | None = None
        sizes = iter(len(rows) for rows in plan.batches)
        want = next(sizes, None)
        for buffer in _prefetch(lambda window: self._read_window(window, picked), plan.windows or []):
            start, end = 0, len(buffer[-1])
            if carry is not None:
                need = want - len(carry[-1])
                if need > end:  # a window smaller than what the batch still needs
                    carry = [torch.cat(pair) for pair in zip(carry, buffer)]
                    continue
                yield self._batch([torch.cat((c, t[:need])) for c, t in zip(carry, buffer)])
                start, carry, want = need, None, next(sizes, None)
            while want is not None and start + want <= end:
                yield self._batch([t[start:start + want] for t in buffer])
                start += want
                want = next(sizes, None)
            carry = [t[start:].clone() for t in buffer] if start < end else None
        if want is not None and carry is not None:  # the short last batch (unless it was dropped)
            yield self._batch([t[:want] for t in carry])

    def _batch(self, parts: list[torch.Tensor]) -> tuple[list, torch.Tensor]:
        """(float32 targets, labels) of one batch on the device, from host rows as stored."""
        moved = [t.to(self.device, non_blocking=True) for t in parts]
        return [t.float() for t in moved[:-1]], moved[-1]

    def _read_window(self, window: tuple[np.ndarray, np.ndarray], picked: tuple[str, ...]) -> list[torch.Tensor]:
        """Runs on the prefetch thread: read whole chunks (checked), each row put straight into its place in the
        window's order (one window-sized array per array, plus one chunk)."""
        chunks, perm = window
        spans = [(int(c) * self.chunk_rows, min((int(c) + 1) * self.chunk_rows, self.rows)) for c in chunks]
        place = np.empty_like(perm)
        place[perm] = np.arange(len(perm))  # row k of the chunks read goes to position place[k]
        tensors = []
        for name in (*picked, "labels"):
            out, k = None, 0
            for a, b in spans:
                part = self.cache.read(self._stored.get(name, name), a, b)
                if out is None:
                    out = np.empty((len(perm), *part.shape[1:]), dtype=part.dtype)
                out[place[k:k + len(part)]] = part
                k += len(part)
            tensors.append(torch.from_numpy(out))
        if self.device.type == "cuda":  # pinned host memory makes the non_blocking upload truly asynchronous
            tensors = [t.pin_memory() for t in tensors]
        return tensors

    def describe(self) -> dict[str, Any]:
        """How the targets are held, which decides the batch order: recorded in last.pt so a resume (on another
        machine, with another budget) replays the same batches."""
        return {"mode": self.mode, "window_chunks": self.window_chunks}


_DONE = object()


def stored_name(cache: TeacherCache, name: str, views: Any) -> str:
    """The array that serves `name`: in a views cache replayed (`views` given), a target array's per-view twin."""
    target = getattr(cache, "target", None)
    if views is not None and target is not None and name in target.dtypes:
        from kdcache.cache.schema import VIEW_PREFIX

        return VIEW_PREFIX + name
    return name


def device_room(device: torch.device) -> int:
    """Bytes of the training device that teacher targets may take: an eighth of what is free on a GPU, none
    elsewhere (host memory already is the device)."""
    if device.type != "cuda":
        return 0
    free, _ = torch.cuda.mem_get_info(device)
    return free // 8


def epoch_index(batches: list[np.ndarray], device: torch.device) -> Iterator[torch.Tensor]:
    """Each batch's row positions as a tensor on `device`, the epoch's order uploaded once: an index copied from
    pageable host memory every step makes the host wait for the device (CUDA runs such a copy in stream order),
    so a launch-bound student would lose the host's running ahead of the device."""
    flat = torch.from_numpy(np.concatenate(batches).astype(np.int64)) if batches else torch.zeros(0, dtype=torch.int64)
    if device.type == "cuda":
        flat = flat.pin_memory().to(device, non_blocking=True)
    else:
        flat = flat.to(device)
    start = 0
    for rows in batches:
        yield flat[start:start + len(rows)]
        start += len(rows)


def by_batch(flat: torch.Tensor, batches: list[np.ndarray], device: torch.device) -> Iterator[torch.Tensor]:
    """A host tensor of the whole epoch (one entry per row of `batches`, in order), uploaded once and cut into the
    batches' slices on `device`: no step copies from pageable host memory (see `epoch_index`)."""
    flat = flat.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else flat.to(device)
    start = 0
    for rows in batches:
        yield flat[start:start + len(rows)]
        start += len(rows)


def pinned(parts: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Host tensors about to be copied to a GPU, in pinned memory, so that the non_blocking copy does not wait."""
    return [t.pin_memory() for t in parts] if device.type == "cuda" else parts


def _prefetch(read, items: list) -> Iterator[Any]:
    """Yield `read(item)` for each item, the next one read on a thread while the caller uses the current one; the
    thread starts on an item only once the caller has taken the one before, so at most two are alive (the one in
    use, the one being read). Errors of `read` are re-raised here."""
    ready: queue.Queue = queue.Queue(maxsize=1)
    taken = threading.Semaphore(1)  # the thread may read one item ahead of what the caller has taken
    stop = threading.Event()

    def wait_turn() -> bool:
        while not stop.is_set():
            if taken.acquire(timeout=0.1):
                return True
        return False

    def work() -> None:
        try:
            for item in items:
                if not wait_turn():
                    return
                ready.put(read(item))
            if wait_turn():
                ready.put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            ready.put(exc)

    thread = threading.Thread(target=work, name="kdcache-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            taken.release()
            yield item
            del item
    finally:  # also reached when the consumer stops early: release the thread
        stop.set()
        thread.join()


class LogitBatches:
    """Minibatches of (rows, teacher targets, labels) of one cache split, reproducible per (seed, epoch)."""

    def __init__(self, cache: TeacherCache, batch_size: int, *, seed: int, device: torch.device | str = "cpu",
                 mode: str = "auto", memory_limit_bytes: int | None = None, buffer_chunks: int | None = None,
                 drop_last: bool = False, shuffle: bool = True, arrays: tuple[str, ...] = ("logits",)) -> None:
        if batch_size < 1 or (buffer_chunks is not None and buffer_chunks < 1):
            raise ValueError("batch_size and buffer_chunks must be at least 1")
        self.targets = TeacherTargets(cache, arrays, device=device, mode=mode, budget_bytes=memory_limit_bytes,
                                      window_chunks=buffer_chunks)
        self.mode, self.arrays, self.cache = self.targets.mode, self.targets.arrays, cache
        self.order = self.targets.order(batch_size, seed=seed, shuffle=shuffle, drop_last=drop_last)

    def __len__(self) -> int:
        return len(self.order)

    def epoch(self, e: int, arrays: tuple[str, ...] | None = None) -> Iterator[Batch]:
        """The batches of epoch `e`, in an order fixed by (seed, e) whatever `arrays` are picked."""
        plan = self.order.plan(e)
        for rows, (targets, labels) in zip(plan.batches, self.targets.epoch(plan, arrays)):
            yield torch.from_numpy(rows), targets, labels


class LabelBatches:
    """Shuffled minibatches of (rows, None, labels) without a cache: `kdcache train`'s twin of LogitBatches."""

    def __init__(self, labels: torch.Tensor, batch_size: int, *, seed: int, device: torch.device) -> None:
        self.labels = labels.to(device)
        self.order = EpochOrder(len(labels), batch_size, seed=seed)

    def __len__(self) -> int:
        return len(self.order)

    def epoch(self, e: int, arrays: tuple[str, ...] | None = None) -> Iterator[tuple[torch.Tensor, None, torch.Tensor]]:
        """The batches of epoch `e` (no teacher arrays: `arrays` must be empty)."""
        for rows in self.order.plan(e).batches:
            rows = torch.from_numpy(rows)
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


__all__ = ["EpochOrder", "EpochPlan", "LabelBatches", "LogitBatches", "MODES", "TeacherTargets", "epoch_seed",
           "parse_budget", "read_throughput", "total_memory", "DEFAULT_BUDGET_SHARE"]
