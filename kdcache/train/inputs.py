"""The student's inputs by row, and the proof that they are the rows the teacher saw.

Row r of a cache split is row r of the dataset split: `StudentInputs` fetches a batch of model inputs by row
position, and `check_alignment` refuses to train unless every re-read row has the cached fingerprint and label.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kdcache.data.base import Batch, SplitData
from kdcache.errors import KDCacheError
from kdcache.fingerprint import labels_equal

class StudentInputs:
    """The model inputs of one split, fetched by row: the student sees row r of the cache as row r of the data.

    Images and feature vectors are decoded once and kept as one uint8/float tensor (on the training device when
    it is a GPU, so a batch is a gather); tokenised text keeps its rows and pads each batch to its longest row.
    Reading the split once also collects every row's fingerprint and label, for the alignment check.
    """

    def __init__(self, split: SplitData, device: torch.device, *, decode_batch: int = 512) -> None:
        self.split, self.device = split, device
        # text rows are kept as items; read them once and collate those (not the dataset a second time)
        items = [split.dataset[i] for i in range(len(split.dataset))] if split.modality == "text" else None
        loader = torch.utils.data.DataLoader(items if items is not None else split.dataset, batch_size=decode_batch,
                                             shuffle=False, collate_fn=split.collate, num_workers=0)
        fingerprints, labels, inputs = [], [], []
        for batch in loader:
            fingerprints.append(np.asarray(batch.fingerprint, dtype=np.uint64))
            labels.append(batch.labels)
            if split.modality != "text":
                inputs.append(batch.inputs)
        self.fingerprints = np.concatenate(fingerprints) if fingerprints else np.zeros(0, np.uint64)
        self.labels = torch.cat(labels) if labels else torch.zeros(0)
        self._items = items
        self._inputs = None
        if items is None and inputs:
            self._inputs = torch.cat(inputs).to(device if device.type == "cuda" else "cpu")

    def __len__(self) -> int:
        return len(self.fingerprints)

    def batch(self, rows: torch.Tensor) -> Any:
        """Model input for these rows (CPU row positions), on the training device."""
        if self._items is not None:
            return self.split.prepare(self.split.collate([self._items[int(r)] for r in rows]), self.device)
        index = rows.to(self._inputs.device)
        batch = Batch(inputs=self._inputs[index], labels=self.labels[rows], index=rows, fingerprint=None)
        return self.split.prepare(batch, self.device)


def check_alignment(inputs: StudentInputs, cache: Any, source: str) -> None:
    """Refuse to train unless the data re-read now is, row for row, the data the teacher saw: the same inputs (by
    fingerprint) with the same labels (a relabelled row would silently teach the student another answer)."""
    where = f"{cache.path}/{cache.split}"
    if len(inputs) != len(cache):
        raise KDCacheError(f"{source}: has {len(inputs)} rows for split {cache.split!r} but the cache {where} has "
                           f"{len(cache)}; the data changed since the teacher was cached")
    stored = np.asarray(cache.read("fingerprint"), dtype=np.uint64)  # checked read: damage names its chunk file
    bad = np.flatnonzero(stored != inputs.fingerprints)
    if len(bad):
        row = int(bad[0])
        index = int(cache.read("index", row, row + 1)[0])
        raise KDCacheError(f"{source}: row {row} (source index {index}) does not match the cache {where} "
                           f"(fingerprint {int(inputs.fingerprints[row]):016x} vs {int(stored[row]):016x}; "
                           f"{len(bad)} of {len(stored)} rows differ); the data changed since the teacher was cached")
    stored_labels = cache.read("labels")
    fresh = inputs.labels.numpy().astype(stored_labels.dtype)
    wrong = np.flatnonzero(~labels_equal(stored_labels, fresh))
    if len(wrong):
        row = int(wrong[0])
        index = int(cache.read("index", row, row + 1)[0])
        raise KDCacheError(f"{source}: row {row} (source index {index}) has label {fresh[row]} but the cache {where} "
                           f"holds {stored_labels[row]} ({len(wrong)} of {len(stored)} labels differ); the labels "
                           "changed since the teacher was cached")



# --- the splits of one run ------------------------------------------------------------------------------------

@dataclass
class RunSplit:
    """One split as the loop sees it: inputs by row, labels, and (distill) the cache it is checked against."""

    name: str
    inputs: StudentInputs
    labels: np.ndarray
    cache: Any = None  # kdcache.cache.TeacherCache


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
                  device: torch.device) -> RunData:
    """The cache's own dataset, re-read and checked row by row against the cache (inputs and labels)."""
    from kdcache.cache import Cache
    from kdcache.data import load_split, modality_of, recorded_options

    cache = Cache(cache_location, storage_options=storage_options)
    task_info = cache.header.task
    task, kind = task_info.name, task_info.kind
    modality = task_info.modality or modality_of(task)
    tokenizer = cache.tokenizer() if modality == "text" else None
    splits = cache.header.splits
    if "train" not in splits:
        raise KDCacheError(f"{cache.store}: no 'train' split to distil from (splits: {', '.join(splits) or 'none'})")
    val_name = _val_split_name(val_split, splits, str(cache.store))
    loaded = {}
    for name in ["train"] + ([val_name] if val_name else []):
        split_cache = cache.split(name)
        dataset = split_cache.split_attrs.get("dataset") or {}
        options = recorded_options(dataset, task_info.to_attrs())
        split = load_split(task, data if data is not None else dataset.get("source"), name, tokenizer=tokenizer,
                           options=options)
        inputs = StudentInputs(split, device)
        check_alignment(inputs, split_cache, split.source)
        loaded[name] = RunSplit(name, inputs, split_cache.read("labels"), split_cache)
    return RunData(task, kind, modality, task_info.label_names, loaded["train"], loaded.get(val_name), tokenizer,
                   cache.header.teacher)


def load_dataset_only(task: str | None, data: str | None, options: Any, *, tokenizer_source: str | None,
                      val_split: str | None, device: torch.device) -> RunData:
    """`kdcache train`: the dataset alone, no cache; the validation split when the dataset has one."""
    from kdcache.data import load_split, modality_of

    if task is None:
        raise KDCacheError("kdcache train needs --task")
    modality = modality_of(task)
    tokenizer = _train_tokenizer(task, tokenizer_source) if modality == "text" else None
    split = load_split(task, data, "train", tokenizer=tokenizer, options=options)
    inputs = StudentInputs(split, device)
    train = RunSplit("train", inputs, inputs.labels.numpy())
    name, val = val_split or "validation", None
    if name != "none":
        try:
            val_data = load_split(task, data, name, tokenizer=tokenizer, options=options)
        except KDCacheError:
            if val_split is not None:
                raise
            val_data = None  # no validation split in this dataset: select on train, and say so in the summary
        if val_data is not None:
            val_inputs = StudentInputs(val_data, device)
            used = val_data.preprocess.get("split_used") or name  # e.g. CIFAR's validation is its test split
            val = RunSplit(str(used), val_inputs, val_inputs.labels.numpy())
    return RunData(task, split.kind, modality, split.label_names, train, val, tokenizer)


def _train_tokenizer(task: str, source: str | None) -> Any:
    from transformers import AutoTokenizer

    if source is None:
        raise KDCacheError(f"text task {task!r} needs a tokenizer: pass --tokenizer DIR")
    try:
        return AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise KDCacheError(f"{source}: cannot load a tokenizer ({exc})".splitlines()[0]) from exc


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
    return inputs.batch(torch.arange(min(2, len(inputs))))


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


__all__ = ["RunData", "RunSplit", "StudentInputs", "check_alignment", "check_student", "has_labels",
           "load_dataset_only", "load_run_data", "probe_batch", "selection_note"]
