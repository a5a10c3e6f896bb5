"""The student's inputs by row, and the proof that they are the rows the teacher saw.

Row r of a cache split is row r of the dataset split. `StudentInputs` decodes the rows of each batch when they
are needed (in DataLoader worker processes with `workers`, pinned for the GPU, a few batches ahead), never the
whole split at once; a split whose decoded inputs fit `keep_bytes` is kept decoded after its first epoch (on the
GPU when training there), an optimisation, not a requirement. Every row is compared with the cache as it is
decoded the first time (`RowCheck`: its fingerprint and its label), so an epoch proves the data is the teacher's
without a separate pass; `check_alignment` is that pass, for `--check-first`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch

from kdcache.data.augment import augment
from kdcache.data.base import Batch, SplitData, row_labels
from kdcache.errors import KDCacheError, SplitMissing
from kdcache.fingerprint import labels_equal
from kdcache.train.batches import epoch_index

#: Decoded inputs of a split are kept (after their first decode) while they take at most this many bytes.
DEFAULT_KEEP_BYTES = 2 * 1024**3


class RowCheck:
    """Fingerprints and labels a split's rows must have, against which every decoded row is compared once: the
    cache's (distill), or those a `train` run recorded in its first epoch (a resumed run)."""

    def __init__(self, fingerprints: np.ndarray, labels: np.ndarray, source: str, what: str, since: str) -> None:
        self.fingerprints = np.asarray(fingerprints, dtype=np.uint64)
        self.labels = np.asarray(labels)
        self.source, self.what, self.since = source, what, since
        self.seen = np.zeros(len(self.fingerprints), dtype=bool)

    @classmethod
    def of_cache(cls, cache: Any, source: str) -> "RowCheck":
        """The rows the teacher saw, from a cache split (checked reads)."""
        return cls(cache.read("fingerprint"), cache.read("labels"), source, f"the cache {cache.path}/{cache.split}",
                   "since the teacher was cached")

    @property
    def done(self) -> bool:
        return bool(self.seen.all())

    def __call__(self, rows: np.ndarray, batch: Batch) -> None:
        """Refuse the batch unless its rows have the expected fingerprints and labels (the first bad row named)."""
        fresh = np.asarray(batch.fingerprint, dtype=np.uint64)
        bad = np.flatnonzero(fresh != self.fingerprints[rows])
        if len(bad):
            row = int(rows[bad[0]])
            raise KDCacheError(f"{self.source}: row {row} (source index {int(batch.index[bad[0]])}) does not match "
                               f"{self.what} (fingerprint {int(fresh[bad[0]]):016x} vs {int(self.fingerprints[row]):016x})"
                               f"; the data changed {self.since}")
        labels = batch.labels.numpy().astype(self.labels.dtype)
        wrong = np.flatnonzero(~labels_equal(self.labels[rows], labels))
        if len(wrong):
            row = int(rows[wrong[0]])
            raise KDCacheError(f"{self.source}: row {row} (source index {int(batch.index[wrong[0]])}) has label "
                               f"{labels[wrong[0]]} but {self.what} holds {self.labels[row]}; the labels changed "
                               f"{self.since}")
        self.seen[rows] = True


class RowRecord:
    """`kdcache train` has no cache to check against: the fingerprint of every row is recorded as it is first
    decoded, kept in last.pt, and a resumed run checks its rows against it (`RowCheck`)."""

    recording = True  # its fingerprints are what was read (under torchrun, merged from the rank that read each row)

    def __init__(self, rows: int) -> None:
        self.fingerprints = np.zeros(rows, dtype=np.uint64)
        self.seen = np.zeros(rows, dtype=bool)

    @property
    def done(self) -> bool:
        return bool(self.seen.all())

    def __call__(self, rows: np.ndarray, batch: Batch) -> None:
        self.fingerprints[rows] = np.asarray(batch.fingerprint, dtype=np.uint64)
        self.seen[rows] = True


class _Rows(torch.utils.data.Sampler):
    """A fixed list of batches of row positions, as a DataLoader batch sampler."""

    def __init__(self, batches: list[np.ndarray]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[list[int]]:
        return (rows.tolist() for rows in self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class StudentInputs:
    """Model inputs of one split by row (see the module docstring)."""

    def __init__(self, split: SplitData, device: torch.device, *, workers: int = 0,
                 keep_bytes: int = DEFAULT_KEEP_BYTES, augment: str | None = None, seed: int = 0,
                 check: RowCheck | None = None) -> None:
        self.split, self.device, self.workers = split, device, workers
        self.keep_bytes, self.augment, self.seed, self.check = keep_bytes, augment, seed, check
        self.replay: Any = None  # a views cache's training split: its views replayed (kdcache.train.views.ViewReplay)
        self.labels = row_labels(split.dataset)  # every row's label, without decoding a row
        self._kept: torch.Tensor | _KeptTokens | None = None  # decoded inputs, filled as rows are first decoded
        self._labels_there: torch.Tensor | None = None  # the labels on the kept inputs' device
        self._filled = np.zeros(len(split), dtype=bool)
        self._keep = True

    def __len__(self) -> int:
        return len(self.split)

    @property
    def complete(self) -> bool:
        """Whether every row is kept decoded (later epochs need no decoding at all)."""
        return self._kept is not None and bool(self._filled.all())

    def forget(self) -> None:
        """Back to a fresh pipeline's state: no row checked, nothing kept (a sweep's group that must count its own
        unchecked rows as its lone run would)."""
        if self.check is not None:
            self.check.seen[:] = False
        self._kept, self._keep = None, True
        self._filled[:] = False

    def batch(self, rows: torch.Tensor | np.ndarray) -> Any:
        """Model input for these rows, decoded in this process (for probes; unchecked, never augmented)."""
        rows = np.asarray(rows, dtype=np.int64)
        return self.split.prepare(self.split.collate([self.split.dataset[int(r)] for r in rows]), self.device)

    def epoch(self, batches: list[np.ndarray], *, epoch: int = 0, train: bool = False) -> Iterator[tuple]:
        """(rows, model input on the device, labels) for each batch of row positions, in the order given;
        training batches of images get this run's random views (`augment`), fixed by (seed, epoch), or a views
        cache's stored views, replayed on the device (`replay`)."""
        generator = None
        if train and self.augment and self.replay is None:
            generator = torch.Generator(self.device).manual_seed(_epoch_seed(self.seed + 1, epoch))
        replay = self.replay if train else None
        mixing = replay is not None and replay.partner_rows is not None
        if replay is not None:
            params = replay.epoch_params(batches, epoch, self.device)
        if mixing:  # mixing views: each batch's partner rows are decoded (and checked) with it, after its own rows
            batches = [np.concatenate([rows, replay.partners(rows, epoch)]) for rows in batches]
        for rows, batch in self._decoded(batches):
            if replay is not None:
                others = None
                if mixing:
                    n = len(rows) // 2
                    rows, others = rows[:n], batch.inputs[n:]
                    batch = Batch(batch.inputs[:n], batch.labels[:n], batch.index[:n],
                                  None if batch.fingerprint is None else batch.fingerprint[:n])
                batch = Batch(replay.apply(batch.inputs, next(params), self.device, others), batch.labels,
                              batch.index, batch.fingerprint)
            elif generator is not None:
                batch = Batch(augment(batch.inputs.to(self.device, non_blocking=True), self.augment, generator),
                              batch.labels, batch.index, batch.fingerprint)
            model_input = self.split.prepare(batch, self.device)
            if isinstance(model_input, torch.Tensor) and model_input.dim() == 4 and model_input.is_cuda:
                model_input = model_input.contiguous(memory_format=torch.channels_last)  # as the CNN's weights
            yield rows, model_input, batch.labels

    def _decoded(self, batches: list[np.ndarray], *, fresh: bool = False) -> Iterator[tuple[np.ndarray, Batch]]:
        """Decoded batches: gathered from the kept inputs once they are complete (unless `fresh`), else decoded."""
        if self.complete and not fresh:
            where = self._kept.device
            if self._labels_there is None or self._labels_there.device != where:  # every row's label, beside them
                self._labels_there = torch.as_tensor(np.array(self.labels)).to(where)  # (a writable copy)
            for rows, index in zip(batches, epoch_index(batches, where)):
                kept = self._kept.gather(rows, index) if isinstance(self._kept, _KeptTokens) else \
                    self._kept.index_select(0, index)
                yield rows, Batch(kept, self._labels_there.index_select(0, index), torch.from_numpy(rows), None)
            return
        loader = torch.utils.data.DataLoader(
            _Named(self.split.dataset, self.split.source), batch_sampler=_Rows(batches),
            collate_fn=self.split.collate, num_workers=self.workers, pin_memory=self.device.type == "cuda",
            prefetch_factor=4 if self.workers else None,
            # its own generator: the loader draws its workers' seed without touching the global random stream,
            # which stays the model's (dropout) alone, so students stepped together in a sweep see a lone run's
            generator=torch.Generator().manual_seed(self.seed))
        try:
            for rows, batch in zip(batches, loader):
                if self.check is not None and not self.check.done:
                    self.check(rows, batch)
                self._remember(rows, batch)
                yield rows, batch
        except KDCacheError as exc:  # raised in a worker, torch adds the worker's traceback: keep the one line
            raise KDCacheError(_worker_line(str(exc))) from None


    def _remember(self, rows: np.ndarray, batch: Batch) -> None:
        """Keep decoded inputs while the whole split fits `keep_bytes` (allocated at the first batch)."""
        if not self._keep:
            return
        where = self.device if self.device.type == "cuda" else torch.device("cpu")
        if isinstance(batch.inputs, dict):  # token ids: kept padded to max_length, gathered as the collate pads
            if self._kept is None:
                self._kept = _KeptTokens.make(self.split, batch, self.keep_bytes, where)
                if self._kept is None:
                    self._keep = False
                    return
            self._kept.put(rows, batch.inputs)
            self._filled[rows] = True
            return
        if not isinstance(batch.inputs, torch.Tensor):
            return
        if self._kept is None:
            shape = (len(self.split), *batch.inputs.shape[1:])
            size = int(np.prod(shape)) * batch.inputs.element_size()
            if size > self.keep_bytes:
                self._keep = False
                return
            self._kept = torch.empty(shape, dtype=batch.inputs.dtype, device=where)
        if batch.inputs.shape[1:] != self._kept.shape[1:]:
            self._keep, self._kept = False, None  # rows of different shapes: nothing to gather into
            return
        self._kept[torch.from_numpy(rows).to(self._kept.device)] = batch.inputs.to(self._kept.device)
        self._filled[rows] = True


class _KeptTokens:
    """A text split's token ids kept after their first decode (int32, padded to the split's max_length, on the
    training device): a batch gathered from them is the collate's own batch, right-padded to its longest row, so
    later epochs neither tokenise nor pad nor copy from the host."""

    def __init__(self, ids: dict[str, torch.Tensor], rows: int) -> None:
        self.ids, self.lengths = ids, np.zeros(rows, dtype=np.int64)
        self.device = next(iter(ids.values())).device
        self._lengths_there: torch.Tensor | None = None  # `lengths` on the device, once every row is put

    @classmethod
    def make(cls, split: SplitData, batch: Batch, keep_bytes: int, where: torch.device) -> "_KeptTokens | None":
        """Storage for every row, or None when the split has no fixed max_length or does not fit keep_bytes."""
        width = split.preprocess.get("max_length")
        names = [k for k in batch.inputs if k != "attention_mask"]
        if not names or not isinstance(width, int) or "attention_mask" not in batch.inputs or \
                len(split) * width * 4 * len(names) > keep_bytes:
            return None
        pad = int(getattr(split.collate, "pad_id", 0))
        ids = {k: torch.full((len(split), width), pad if k == "input_ids" else 0, dtype=torch.int32, device=where)
               for k in names}
        return cls(ids, len(split))

    def put(self, rows: np.ndarray, inputs: dict[str, torch.Tensor]) -> None:
        index = torch.from_numpy(rows)
        width = inputs["attention_mask"].shape[1]
        for k, kept in self.ids.items():
            kept[index.to(kept.device), :width] = inputs[k].to(kept.device, torch.int32)
        self.lengths[rows] = inputs["attention_mask"].sum(1).cpu().numpy()
        self._lengths_there = None

    def gather(self, rows: np.ndarray, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The batch of `rows`, `index` being the same positions already on the device (`epoch_index`)."""
        width = int(self.lengths[rows].max()) if len(rows) else 0  # from host memory: no wait for the device
        if self._lengths_there is None:
            self._lengths_there = torch.from_numpy(self.lengths).to(self.device)
        out = {k: kept[:, :width].index_select(0, index).long() for k, kept in self.ids.items()}
        out["attention_mask"] = (torch.arange(width, device=self.device)[None, :] <
                                 self._lengths_there.index_select(0, index)[:, None]).long()
        return out


class _Named(torch.utils.data.Dataset):
    """A split's rows, an unexpected error in reading one (in a worker process too) turned into one line that names
    the source and the row."""

    def __init__(self, dataset: torch.utils.data.Dataset, source: str) -> None:
        self.dataset, self.source = dataset, source

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        try:
            return self.dataset[i]
        except KDCacheError:
            raise
        except Exception as exc:  # noqa: BLE001 - a decoder or the file system failed on this row
            raise self._error(i, exc) from exc

    def __getitems__(self, rows: list[int]) -> list[Any]:
        """A batch's rows; in one call where the source reads batches (text is tokenised a batch at a time)."""
        batched = getattr(self.dataset, "__getitems__", None)
        if batched is None:
            return [self[i] for i in rows]
        try:
            return batched(rows)
        except KDCacheError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise self._error(rows[0], exc) from exc

    def _error(self, i: int, exc: Exception) -> KDCacheError:
        where = self.dataset.where(i) if hasattr(self.dataset, "where") else self.source
        return KDCacheError(f"{where}: row {i}: cannot read it ({type(exc).__name__}: {exc})".splitlines()[0])


def _worker_line(text: str) -> str:
    """The user's line out of a worker's error, which torch wraps as 'Caught KDCacheError in DataLoader worker
    process N. Original Traceback ...' ending in 'kdcache.errors.KDCacheError: LINE'."""
    marker = "KDCacheError: "
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if lines and lines[0].startswith("Caught ") and marker in lines[-1]:
        return lines[-1].split(marker, 1)[1]
    return text


def _epoch_seed(seed: int, epoch: int) -> int:
    from kdcache.train.batches import epoch_seed

    return epoch_seed(seed, epoch)


def check_alignment(inputs: StudentInputs, cache: Any, source: str, batch_size: int = 512) -> None:
    """The whole split compared with the cache before training (`--check-first`): every re-read row must have the
    cached fingerprint and label (a relabelled row would silently teach the student another answer). Decoding
    also fills the kept inputs, so the first epoch does not decode again."""
    where = f"{cache.path}/{cache.split}"
    stored = np.asarray(cache.read("fingerprint"), dtype=np.uint64)  # checked read: damage names its chunk file
    fresh = np.empty(len(inputs), dtype=np.uint64)
    batches = [np.arange(a, min(a + batch_size, len(inputs))) for a in range(0, len(inputs), batch_size)]
    checking, inputs.check = inputs.check, None
    try:
        for rows, batch in inputs._decoded(batches, fresh=True):
            fresh[rows] = np.asarray(batch.fingerprint, dtype=np.uint64)
    finally:
        inputs.check = checking
    bad = np.flatnonzero(stored != fresh)
    if len(bad):
        row = int(bad[0])
        index = int(cache.read("index", row, row + 1)[0])
        raise KDCacheError(f"{source}: row {row} (source index {index}) does not match the cache {where} "
                           f"(fingerprint {int(fresh[row]):016x} vs {int(stored[row]):016x}; "
                           f"{len(bad)} of {len(stored)} rows differ); the data changed since the teacher was cached")
    stored_labels = cache.read("labels")
    labels = inputs.labels.astype(stored_labels.dtype)
    wrong = np.flatnonzero(~labels_equal(stored_labels, labels))
    if len(wrong):
        row = int(wrong[0])
        index = int(cache.read("index", row, row + 1)[0])
        raise KDCacheError(f"{source}: row {row} (source index {index}) has label {labels[row]} but the cache {where} "
                           f"holds {stored_labels[row]} ({len(wrong)} of {len(stored)} labels differ); the labels "
                           "changed since the teacher was cached")
    if inputs.check is not None:
        inputs.check.seen[:] = True  # proven: nothing left to compare while training


# --- the splits of one run ------------------------------------------------------------------------------------

@dataclass
class InputOptions:
    """How a run reads its inputs: worker processes, what may stay decoded, training views, the up-front check."""

    workers: int | None = None  # None: by modality (images and text decode in workers), 0 for feature tables
    keep_bytes: int = DEFAULT_KEEP_BYTES
    augment: str | None = None  # for the training split only
    seed: int = 0
    check_first: bool = False
    view_order: str | None = None  # a views cache's training split: cycle | random | plain (train/views.py)

    def inputs(self, split: SplitData, device: torch.device, *, train: bool, check: RowCheck | None) -> StudentInputs:
        from kdcache.data.augment import check_augment

        view = check_augment(self.augment, split.modality) if train else None
        workers = self.workers
        if workers is None:  # decoding images and collating text in other processes frees the training loop
            workers = 0 if split.modality == "features" else max(0, min(4, usable_cores() - 1))
        return StudentInputs(split, device, workers=workers, keep_bytes=self.keep_bytes, augment=view,
                             seed=self.seed, check=check)


def usable_cores() -> int:
    """The CPU cores this process may run on (a container's share, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def input_options(cfg: Any, device: torch.device) -> InputOptions:
    """A run's input options from its config, bad values refused in one line."""
    from kdcache.names import parse_budget

    cores = usable_cores()
    if cfg.num_workers is not None and not 0 <= cfg.num_workers <= cores:
        raise KDCacheError(f"--num-workers {cfg.num_workers}: this machine has {cores} CPU cores (use 0 to {cores})")
    keep = DEFAULT_KEEP_BYTES if cfg.keep_inputs is None else parse_budget(cfg.keep_inputs, "--keep-inputs")
    return InputOptions(cfg.num_workers, keep, cfg.augment, cfg.seed, cfg.check_first,
                        getattr(cfg, "view_order", None))


@dataclass
class RunSplit:
    """One split as the loop sees it: inputs by row, labels, and (distill) the cache it is checked against."""

    name: str
    inputs: StudentInputs
    labels: np.ndarray
    cache: Any = None  # kdcache.cache.TeacherCache
    teacher_top: Any = None  # a token-level split's teacher argmax per position [N, S], read at its first evaluation


@dataclass
class RunData:
    """The data of one run: task, the train split and the one that selects the best checkpoint, the tokenizer."""

    task: str
    kind: str
    modality: str
    label_names: list[str] | None
    train: RunSplit
    val: RunSplit | None
    tokenizer: Any = None
    teacher: dict[str, Any] = field(default_factory=dict)  # what the cache records about its teacher
    report: RunSplit | None = None  # --report-split: scored every epoch, never selects (the test split)
    tokens: Any = None  # a token-level cache's TokenInfo (alignment, tokenizer hash, vocabulary, model width)

    @property
    def selection(self) -> RunSplit:
        """The split that selects the best checkpoint: validation, else the training data itself."""
        return self.val if self.val is not None else self.train

    @property
    def num_outputs(self) -> int:
        if self.train.cache is not None:
            return self.train.cache.num_outputs
        return 1 if self.kind == "regression" else len(self.label_names or [])


def load_run_data(cache_location: Any, *, storage_options: dict[str, Any], data: str | None, val_split: str | None,
                  device: torch.device, options: InputOptions | None = None,
                  report_split: str | None = None, trust_model_code: bool = False) -> RunData:
    """The cache's own dataset, each split checked row by row against the cache (inputs and labels) as its rows
    are first decoded, or up front with `check_first`; a split of another length is refused at once."""
    reading = options or InputOptions()
    from kdcache.cache import Cache
    from kdcache.data import load_split, modality_of, recorded_options

    cache = Cache(cache_location, storage_options=storage_options)
    task_info = cache.header.task
    task, kind = task_info.name, task_info.kind
    if kind == "lm":
        return _lm_run_data(cache, data=data, val_split=val_split, report_split=report_split, device=device,
                            reading=reading, trust_model_code=trust_model_code)
    modality = task_info.modality or modality_of(task)
    tokenizer = cache.tokenizer(trust_model_code=trust_model_code) if modality == "text" else None
    splits = cache.header.splits
    if "train" not in splits:
        raise KDCacheError(f"{cache.store}: no 'train' split to distil from (splits: {', '.join(splits) or 'none'})")
    val_name = _val_split_name(val_split, splits, str(cache.store))
    if report_split is not None:
        if report_split not in splits:
            raise KDCacheError(f"{cache.store}: no split {report_split!r} to report on (splits: {', '.join(splits)})")
        if report_split in ("train", val_name):
            raise KDCacheError(f"--report-split {report_split}: the split the run {'trains' if report_split == 'train' else 'selects'} "
                               "on; report on another one (the test split)")
    loaded = {}
    for name in ["train"] + ([val_name] if val_name else []) + ([report_split] if report_split else []):
        split_cache = cache.split(name)
        dataset = split_cache.split_attrs.get("dataset") or {}
        options = recorded_options(dataset, task_info.to_attrs())
        split = load_split(task, data if data is not None else dataset.get("source"), name, tokenizer=tokenizer,
                           options=options)
        if len(split) != len(split_cache):
            raise KDCacheError(f"{split.source}: has {len(split)} rows for split {name!r} but the cache "
                               f"{split_cache.path}/{name} has {len(split_cache)}; the data changed since the teacher "
                               "was cached")
        check = RowCheck.of_cache(split_cache, split.source)
        replay = None
        if name == "train":  # a views cache: the student sees the teacher's views (before any row is decoded)
            from kdcache.train.views import view_replay

            replay = view_replay(split_cache, reading.view_order, reading.augment, reading.seed)
        inputs = reading.inputs(split, device, train=name == "train", check=check)
        inputs.replay = replay
        if reading.check_first:
            check_alignment(inputs, split_cache, split.source)
        loaded[name] = RunSplit(name, inputs, check.labels, split_cache)
    return RunData(task, kind, modality, task_info.label_names, loaded["train"], loaded.get(val_name), tokenizer,
                   cache.header.teacher, loaded.get(report_split) if report_split else None)


def _lm_run_data(cache: Any, *, data: str | None, val_split: str | None, report_split: str | None,
                 device: torch.device, reading: InputOptions, trust_model_code: bool) -> RunData:
    """A token-level cache's splits as a causal-LM student's data: the windows it stores (`input_ids`, `lengths`),
    never the corpus tokenised again, each row checked against the cached fingerprint as it is first read."""
    from kdcache.data.lm import cached_windows_split

    where = str(cache.store)
    if data is not None:
        raise KDCacheError(f"--data {data}: a language-model cache holds its own token ids (input_ids), which the "
                           "student reads; leave --data out")
    splits = cache.header.splits
    if "train" not in splits:
        raise KDCacheError(f"{where}: no 'train' split to distil from (splits: {', '.join(splits) or 'none'})")
    val_name = _val_split_name(val_split, splits, where)
    if report_split is not None and (report_split not in splits or report_split in ("train", val_name)):
        raise KDCacheError(f"--report-split {report_split}: not a split of {where} other than the ones the run "
                           f"trains and selects on (splits: {', '.join(splits)})")
    tokenizer = cache.tokenizer(trust_model_code=trust_model_code)
    loaded = {}
    for name in ["train"] + ([val_name] if val_name else []) + ([report_split] if report_split else []):
        split_cache = cache.split(name)
        source = f"{where}/{name}"
        split = cached_windows_split(split_cache.read("input_ids"), split_cache.read("lengths"),
                                     split_cache.read("labels"), split=name, source=source,
                                     preprocess=(split_cache.split_attrs.get("dataset") or {}).get("preprocess"))
        check = RowCheck.of_cache(split_cache, source)
        inputs = reading.inputs(split, device, train=name == "train", check=check)
        if reading.check_first:
            check_alignment(inputs, split_cache, source)
        loaded[name] = RunSplit(name, inputs, check.labels, split_cache)
    return RunData("lm", "lm", "text", None, loaded["train"], loaded.get(val_name), tokenizer, cache.header.teacher,
                   loaded.get(report_split) if report_split else None, tokens=cache.header.tokens)


def check_lm_student(spec: str, tokens: Any, trust_model_code: bool = False) -> None:
    """A pre-trained causal-LM student folder that holds a tokenizer must hold the cache's (the same SHA-256 of its
    saved files as the cache records): otherwise its token ids mean other tokens. One line before the data is read."""
    import hashlib
    from pathlib import Path

    folder = Path(spec)
    if tokens is None or not folder.is_dir() or not any((folder / f).is_file() for f in TOKENIZER_FILES):
        return
    from kdcache.data.text import tokenizer_zip
    from kdcache.models.hf import load_tokenizer

    tokenizer = load_tokenizer(folder, trust_model_code=trust_model_code, what="the student's tokenizer")
    digest = hashlib.sha256(tokenizer_zip(tokenizer)[0]).hexdigest()
    if digest != tokens.tokenizer_sha256:
        raise KDCacheError(f"student {spec}: its tokenizer (sha256 {digest[:12]}..., {len(tokenizer)} tokens) is not "
                           f"the cache's (sha256 {tokens.tokenizer_sha256[:12]}..., {tokens.vocab_size} tokens); a "
                           "student must read the teacher's token ids as the same tokens")


#: The files whose presence says a model folder holds a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def load_dataset_only(task: str | None, data: str | None, options: Any, *, tokenizer_source: str | None,
                      val_split: str | None, device: torch.device, reading: InputOptions | None = None,
                      trust_model_code: bool = False) -> RunData:
    """`kdcache train`: the dataset alone, no cache; the validation split when the dataset has one."""
    reading = reading or InputOptions()
    from kdcache.data import check_distinct_splits, load_split, modality_of

    if task is None:
        raise KDCacheError("kdcache train needs --task")
    modality = modality_of(task)
    tokenizer = _train_tokenizer(task, tokenizer_source, trust_model_code) if modality == "text" else None
    split = load_split(task, data, "train", tokenizer=tokenizer, options=options)
    inputs = reading.inputs(split, device, train=True, check=None)
    train = RunSplit("train", inputs, inputs.labels)
    name, val = val_split or "validation", None
    if name != "none":
        try:
            val_data = load_split(task, data, name, tokenizer=tokenizer, options=options)
        except SplitMissing:
            if val_split is not None:
                raise
            val_data = None  # no validation split in this dataset: select on train, and say so in the summary
        if val_data is not None:
            check_distinct_splits([split, val_data], hint=", or pass --val-split none to select on the training rows")
            val_inputs = reading.inputs(val_data, device, train=False, check=None)
            used = val_data.preprocess.get("split_used") or name  # e.g. CIFAR's validation is its test split
            if options.holdout is not None and name == "validation":  # rows held out of train, not train itself
                used = name
            val = RunSplit(str(used), val_inputs, val_inputs.labels)
    return RunData(task, split.kind, modality, split.label_names, train, val, tokenizer)


def _train_tokenizer(task: str, source: str | None, trust_model_code: bool = False) -> Any:
    from kdcache.models.hf import load_tokenizer

    if source is None:
        raise KDCacheError(f"text task {task!r} needs a tokenizer: pass --tokenizer DIR")
    return load_tokenizer(source, trust_model_code=trust_model_code, what="a tokenizer")


def _val_split_name(wanted: str | None, splits: list[str], where: str) -> str | None:
    if wanted == "none":
        return None
    if wanted is not None:
        if wanted not in splits:
            raise KDCacheError(f"{where}: no split {wanted!r} to validate on (splits: {', '.join(splits)})")
        return wanted
    return next((name for name in ("validation", "test") if name in splits), None)


def has_labels(labels: np.ndarray, kind: str) -> bool:
    labels = np.asarray(labels)
    return bool(len(labels)) and bool((~np.isnan(labels)).any() if kind == "regression" else (labels != -1).any())


def selection_note(split: str) -> str | None:
    """Selecting on test or train data is legitimate but biased; every report says so next to the number."""
    if split.startswith("test"):
        return ("best checkpoint selected on the test split (the data has no validation split): "
                "the best score is optimistic; report the last-epoch score beside it")
    if split == "train":
        return "no validation split: best checkpoint selected on the training data"
    return None


def probe_batch(inputs: StudentInputs) -> Any:
    """Model input for the first two rows: to check a student runs on the data and to size extra modules."""
    return inputs.batch(np.arange(min(2, len(inputs))))


def check_student(student: Any, probe: Any, num_outputs: int) -> None:
    """A student that cannot run on this data, or has another width than the teacher, is one line before training."""
    try:
        with torch.inference_mode():
            student.model.eval()
            width = student(probe).shape[-1]
    except KDCacheError:
        raise
    except Exception as exc:  # noqa: BLE001 - any model error on this input is a user-facing mismatch
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise KDCacheError(f"student {student.spec} cannot run on this data: {message}") from exc
    if width != num_outputs:
        raise KDCacheError(f"student {student.spec} has {width} outputs but the cache's teacher has {num_outputs}")


__all__ = ["check_lm_student", "InputOptions", "input_options", "RowCheck", "RowRecord", "usable_cores", "RunData", "RunSplit", "StudentInputs", "check_alignment", "check_student",
           "has_labels",
           "load_dataset_only", "load_run_data", "probe_batch", "selection_note"]
