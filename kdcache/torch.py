"""Cached teacher targets inside anyone's PyTorch loop: `with_targets(dataset, cache)` wraps a map-style dataset so
each item gains its teacher's targets, with the checks `kdcache distill` makes.

    from kdcache.torch import with_targets
    data = with_targets(rows, "sst2.kdcache")          # rows: a list of dicts of token ids, in the split's order
    loader = DataLoader(data, batch_size=32, shuffle=True, collate_fn=data.collate, num_workers=2)
    for batch in loader:  # the user's keys, padded and stacked, plus teacher_logits (or teacher_topk_*, ...)
        ...

- Rows are joined to the cache's rows by position (row i of the dataset is row i of the split: a user who reads the
  split's file in order needs nothing more), or by the cache's sample index (`index=` a column or a function).
- Each row is checked the first time it is read in a process, as `distill` checks it (`RowCheck`): its
  fingerprint (kdcache/fingerprint.py, the same function the cache writer used) and its label. A row that differs
  is one KDCacheError naming the row and what differs, also out of a DataLoader worker.
- The targets are typed as the cache stores them: `teacher_logits` (dense, (C,) float32), `teacher_topk_values`,
  `teacher_topk_indices`, `teacher_logsumexp` (top-k with the log-sum-exp over all outputs), `teacher_sampled_ids`,
  `teacher_sampled_counts`, `teacher_sampled_logprobs` (RS-KD), and any teacher checkpoint's or projection's array
  under its own name; `teacher_row` is the cache row. `kdcache.methods.get(...).loss` reads them.
- A language-model cache (`--task lm`): each item is a window (its unpadded `input_ids`, row r of the split), its
  targets carry the positions axis ([S, K], [S, C], [S]), `teacher_next_token` is the token after the window (which
  its last position predicts; -1 after the stream's end), and `collate` pads every window to S. The item's own
  `labels` are not compared (they are usually its ids, Hugging Face's causal-LM convention) unless `label_key`
  names them. `get(...).loss(kdcache.methods.tokens.token_output(model, batch), batch, batch["teacher_next_token"],
  ...)` is then `distill`'s chunked per-token loss (examples/lm_own_loop.py).
- A views cache (`cache-teacher --views V --augment ...`): item i of epoch e (`data.set_epoch(e)`, from 0, as a
  DistributedSampler counts; the Hugging Face Trainer calls it itself) is the view `distill` trains row i on in its
  epoch e + 1 (`view_order="cycle"`: view (e + 1) mod V; `"random"`: drawn per row from (`seed`, epoch) as
  `distill --view-order random --seed` draws it). The item's uint8 image (its model-input key, HWC or CHW) is
  replaced by that view's input, float32 [C, H, W] normalised as the cache recorded: bit for bit
  `kdcache.replay_view(cache, split, row, view)` (or kept, the view going under `view_key`); the `teacher_*`
  targets are that view's (`view_<array>`), and `teacher_view` names it. A mixing view's partner row is read from
  the dataset by position and checked too. `view_order="plain"`: the plain image, normalised likewise, and its
  plain targets. The view is chosen in the process that reads the item, DataLoader workers included (the epoch is
  in shared memory, so persistent workers follow `set_epoch`).

The split's target arrays are read once (checked reads) and held in host memory as stored; a DataLoader's forked
workers share them. A split larger than memory is `kdcache distill`'s job (it streams windows of chunks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from kdcache.cache.reader import TeacherCache
from kdcache.cache.schema import VIEW_PARAMS, VIEW_PREFIX
from kdcache.data import augment as views_augment
from kdcache.data.base import Batch
from kdcache.errors import KDCacheError
from kdcache.fingerprint import fingerprint_features, fingerprint_pixels, fingerprint_tokens
from kdcache.methods.plain import TEACHER_PREFIX
from kdcache.train.inputs import RowCheck

#: The model-input keys looked for by default, per modality; the first one present is fingerprinted.
TEXT_KEYS = ("input_ids", "token_type_ids", "attention_mask")
IMAGE_KEYS = ("pixels", "image", "img", "pixel_values")
FEATURE_KEYS = ("features", "x", "pixels", "image", "inputs")
LABEL_KEYS = ("labels", "label")


class RowMismatch(KDCacheError):
    """A row that is not the one the teacher saw. Raised in a DataLoader worker, torch re-raises it in the loop as
    'Caught RowMismatch in DataLoader worker ... Original Traceback ...'; the constructor keeps the one line."""

    def __init__(self, message: str = "") -> None:
        lines = [line for line in message.strip().splitlines() if line.strip()]
        if lines and lines[0].startswith("Caught ") and "RowMismatch: " in lines[-1]:
            message = lines[-1].split("RowMismatch: ", 1)[1]
        super().__init__(message)


def open_split(cache: Any, split: str = "train", storage_options: dict[str, Any] | None = None) -> TeacherCache:
    """A TeacherCache as given, or the split opened from a path or URL (a missing split is one line naming those
    there are)."""
    if isinstance(cache, TeacherCache):
        if cache.split != split:
            raise KDCacheError(f"{cache.path}: the TeacherCache given is split {cache.split!r}, not {split!r}")
        return cache
    if not isinstance(cache, (str, Path)):
        raise KDCacheError(f"cache must be a path, a URL or a TeacherCache, not {type(cache).__name__}")
    return TeacherCache(cache, split, storage_options=storage_options)


class TargetDataset(torch.utils.data.Dataset):
    """A user's dataset whose items carry their teacher's targets (see the module docstring); `collate` pads and
    stacks a list of its items."""

    def __init__(self, dataset: Any, cache: TeacherCache, *, index: str | Callable[[Any, int], int] | None = None,
                 inputs: Sequence[str] | None = None, label_key: str | None = None,
                 arrays: Sequence[str] | None = None, pad_id: int = 0, view_order: str | None = None,
                 view_key: str | None = None, seed: int = 0) -> None:
        self.dataset, self.cache, self.index = dataset, cache, index
        self.task = cache.header.task.name
        self.modality = cache.header.task.modality or _modality(self.task)
        self.input_keys = tuple(inputs) if inputs is not None else None
        self.label_key = label_key
        self.where = f"{cache.path}/{cache.split}"
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise KDCacheError(f"with_targets needs a map-style dataset (len and [i]), not {type(dataset).__name__}")
        n, rows = len(dataset), len(cache)
        if index is None and n != rows:
            raise KDCacheError(f"the dataset has {n} rows but the cache {self.where} has {rows}; join them by the "
                               "cache's sample index (index='column' or a function) when the dataset holds other "
                               "rows or another order")
        self.arrays = tuple(arrays) if arrays is not None else (*cache.target.arrays, *cache.extra_widths)
        self.row_of: dict[int, int] | None = None
        if index is not None:
            stored = cache.read("index").astype(np.int64)
            self.row_of = {int(v): r for r, v in enumerate(stored)}
        self.check = RowCheck.of_cache(cache, _describe(dataset))  # distill's check, against this split
        self.positions = getattr(cache.target, "positions", None)  # a language-model cache: S, the window
        self.collate = TargetCollate(pad_id, width=self.positions)
        self.kind = cache.task_kind
        #: a views cache replayed: the views, their parameters and the epoch (shared with DataLoader workers)
        self.views = _Views.of(self, view_order, view_key, seed)
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self.twins: frozenset[str] = frozenset()
        if self.views is not None and self.views.choice is not None:  # each target array is served as the item's
            self.twins = frozenset(n for n in self.arrays if VIEW_PREFIX + n in self.views.stored)  # view's [N, V, ...]
        # each array read once, as served (a replayed view's [N, V, ...] twin); checked reads: damage is one line
        self.held = {name: cache.read(VIEW_PREFIX + name if name in self.twins else name) for name in self.arrays}

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next items are read in, counted from 0 as DistributedSampler and accelerate count it (the
        Hugging Face Trainer calls this itself): on a views cache, the view each item replays is the one `distill`
        trains on in its epoch `epoch + 1` (cycle: view (epoch + 1) mod V). Workers of a DataLoader see it too,
        persistent ones included."""
        self._epoch.fill_(int(epoch))

    @property
    def epoch(self) -> int:
        """The epoch set by `set_epoch` (0 until it is called)."""
        return int(self._epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def row(self, item: Any, position: int) -> int:
        """The cache row of the dataset's item at `position`."""
        if self.index is None:
            return position
        if callable(self.index):
            value = self.index(item, position)
        else:
            if not isinstance(item, dict) or self.index not in item:
                raise KDCacheError(f"{self.check.source}: item {position} has no column {self.index!r} for the "
                                   "cache's sample index")
            value = item[self.index]
        value = int(value.item() if hasattr(value, "item") else value)
        if value not in self.row_of:
            raise KDCacheError(f"{self.check.source}: item {position} has sample index {value}, which the cache "
                               f"{self.where} does not hold")
        return self.row_of[value]

    def __getitem__(self, position: int) -> dict[str, Any]:
        item = self.dataset[position]
        if not isinstance(item, dict):
            raise KDCacheError(f"{self.check.source}: item {position} is a {type(item).__name__}; with_targets "
                               "needs items that are dicts of named fields")
        row = self.row(item, position)
        self.check_row(item, position, row)
        out = dict(item)
        if self.views is not None and self.views.choice is None:  # view_order plain: the teacher's plain input
            out[self.views.key or self.input_key(item, position)] = self.views.plain(self, item, position)
        if self.views is not None and self.views.choice is not None:  # this epoch's view: its input and targets
            view = int(self.views.choice.of(np.array([row]), self.epoch + 1)[0])
            out[self.views.key or self.input_key(item, position)] = self.views.replay(self, item, position, row, view)
            for name, array in self.held.items():
                out[TEACHER_PREFIX + name] = torch.from_numpy(np.asarray(array[row, view] if name in self.twins
                                                                         else array[row]))
            out[TEACHER_PREFIX + "view"] = view
        else:
            for name, array in self.held.items():
                out[TEACHER_PREFIX + name] = torch.from_numpy(np.asarray(array[row]))
        out[TEACHER_PREFIX + "row"] = row
        if self.positions:  # the token after the window, which its last position predicts (-1 after the stream)
            out[TEACHER_PREFIX + "next_token"] = int(self.check.labels[row])
        return out

    def check_row(self, item: dict[str, Any], position: int, row: int) -> None:
        """`distill`'s check of a row the first time this process reads it: its fingerprint and its label."""
        if not self.check.seen[row]:
            fingerprint = self.fingerprint(item, position)
            # a window's label is the token after it; an LM item's `labels` are usually its own ids (HF's causal-LM
            # convention), so they are compared only when label_key names them
            label = None if self.positions and self.label_key is None else \
                _label(item, self.label_key, self.check.labels.dtype)
            labels = torch.as_tensor([label if label is not None else self.check.labels[row]])
            batch = Batch(None, labels, torch.tensor([position]), np.array([fingerprint], dtype=np.uint64))
            try:
                self.check(np.array([row]), batch)
            except KDCacheError as exc:
                message = str(exc).replace(f"(source index {position})", f"(dataset item {position})")
                raise RowMismatch(message) from None

    def input_key(self, item: dict[str, Any], position: int) -> str:
        """The item's model-input key: the first of `inputs=` (else the modality's usual keys) that it has."""
        keys = self.input_keys or {"text": TEXT_KEYS, "image": IMAGE_KEYS}.get(self.modality, FEATURE_KEYS)
        key = next((k for k in keys if k in item), None)
        if key is None:
            raise KDCacheError(f"{self.check.source}: item {position} has none of the model-input keys "
                               f"{', '.join(keys)} (its keys: {', '.join(map(str, item))}); name them with inputs=")
        return key

    def fingerprint(self, item: dict[str, Any], position: int) -> int:
        """The row's fingerprint as the cache writer made it: unpadded token ids, uint8 pixels (HWC) or float32
        features, from the model-input key found."""
        key = self.input_key(item, position)
        value = item[key]
        if self.modality == "text":
            ids = _numpy(value).reshape(-1).astype(np.int64)
            mask = item.get("attention_mask")
            if mask is not None:  # padded rows: the fingerprint hashes the ids the teacher saw, unpadded
                ids = ids[_numpy(mask).reshape(-1).astype(bool)]
            return fingerprint_tokens(ids)
        if self.modality == "image" or self.task == "digits":
            pixels = _numpy(value)
            if pixels.dtype != np.uint8:
                raise KDCacheError(f"{self.check.source}: item {position}: {key!r} is {pixels.dtype}, but the cache "
                                   "fingerprints the uint8 pixels before normalisation; give the uint8 image "
                                   "(inputs=['image']) and normalise in the model or the loop")
            if self.modality == "image" and pixels.ndim == 3 and pixels.shape[0] in (1, 3) and pixels.shape[-1] not in (1, 3):
                pixels = np.ascontiguousarray(pixels.transpose(1, 2, 0))  # CHW (torch) -> HWC, as fingerprinted
            return fingerprint_pixels(pixels)
        return fingerprint_features(_numpy(value).reshape(-1))


class _Views:
    """A views cache's views, replayed for `with_targets`'s items: the stored parameters of every view, which view
    each row reads in each epoch (`kdcache.train.views.ViewChoice`, as distill chooses) and the split's
    normalisation, applied by the code capture, distill and `replay_view` use (`kdcache.data.augment.view_input`)."""

    def __init__(self, augment: str, params: np.ndarray, choice: Any, key: str | None, prepare: Any,
                 stored: frozenset[str]) -> None:
        self.augment, self.params, self.choice, self.key = augment, params, choice, key
        self.prepare, self.stored = prepare, stored  # `prepare`: view_input's `split.prepare`
        self.column = views_augment.partner_column(augment)

    @classmethod
    def of(cls, data: "TargetDataset", order: str | None, key: str | None, seed: int) -> "_Views | None":
        """The replay for a views cache (view_order None or cycle / random; plain: no choice of view, the plain
        image normalised), None for a cache without views; one line for an order that cannot apply."""
        from kdcache.data.images import _Prepare
        from kdcache.names import VIEW_ORDERS
        from kdcache.train.views import ViewChoice, check_views

        cache = data.cache
        if order is not None and order not in VIEW_ORDERS:
            raise KDCacheError(f"view_order {order!r} is not one of {', '.join(VIEW_ORDERS)}")
        if cache.header.views is None:
            if order not in (None, "plain"):
                raise KDCacheError(f"view_order={order!r}: {data.where} stores no augmented views (cache the teacher "
                                   "with --views V --augment cifar|imagenet)")
            return None
        info = check_views(cache.header, data.where)
        stored = frozenset(cache.arrays)
        if VIEW_PARAMS not in stored:
            raise KDCacheError(f"{data.where}: a views cache whose split has no {VIEW_PARAMS}; the split was edited")
        if views_augment.partner_column(info.augment) is not None and data.index is not None and order != "plain":
            raise KDCacheError(f"{data.where}: {info.augment} views mix each row with a partner row named by its "
                               "position in the split; give the dataset in the split's order (no index=)")
        pre = (cache.split_attrs.get("dataset") or {}).get("preprocess") or {}
        mean, std = pre.get("mean"), pre.get("std")
        prepare = _Prepare(tuple(mean) if mean is not None else None, tuple(std) if std is not None else None)
        choice = ViewChoice(int(info.count), order or "cycle", int(seed), len(cache)) if order != "plain" else None
        return cls(info.augment, np.ascontiguousarray(cache.read(VIEW_PARAMS), dtype=np.float32), choice, key,
                   prepare, stored)

    def replay(self, data: "TargetDataset", item: dict[str, Any], position: int, row: int, view: int) -> torch.Tensor:
        """The input [C, H, W] the teacher saw for view `view` of the item (its uint8 image; a mixing view's
        partner item read from the dataset and checked too), as `kdcache.replay_view` returns it."""
        images = self.pixels(data, item, position)
        params = torch.from_numpy(self.params[row, view])[None]
        partners = None
        if self.column is not None:
            partner = int(self.params[row, view, self.column])
            other = data.dataset[partner]
            if not isinstance(other, dict):
                raise KDCacheError(f"{data.check.source}: item {partner} is a {type(other).__name__}; with_targets "
                                   "needs items that are dicts of named fields")
            data.check_row(other, partner, partner)
            partners = self.pixels(data, other, partner)
        return views_augment.view_input(self, self.augment, images, params, torch.device("cpu"), partners)[0]

    def plain(self, data: "TargetDataset", item: dict[str, Any], position: int) -> torch.Tensor:
        """The item's plain image as the teacher saw it (the split's normalisation; `view_order="plain"`)."""
        images = self.pixels(data, item, position)
        empty = torch.zeros(1)
        return self.prepare(Batch(images, empty, empty, np.zeros(0, dtype=np.uint64)), torch.device("cpu"))[0]

    @staticmethod
    def pixels(data: "TargetDataset", item: dict[str, Any], position: int) -> torch.Tensor:
        """The item's uint8 image as a batch of one [1, C, H, W] (from HWC, as fingerprinted, or CHW)."""
        key = data.input_key(item, position)
        pixels = _numpy(item[key])
        if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3):
            raise KDCacheError(f"{data.check.source}: item {position}: {key!r} is {pixels.dtype} of shape "
                               f"{tuple(pixels.shape)}, but a views cache replays the teacher's views of the uint8 "
                               "image (HWC or CHW) before normalisation; give the uint8 image (inputs=['image'])")
        if pixels.ndim == 2:
            pixels = pixels[None]
        elif not (pixels.shape[0] in (1, 3) and pixels.shape[-1] not in (1, 3)):  # HWC -> CHW
            pixels = pixels.transpose(2, 0, 1)
        return torch.from_numpy(np.ascontiguousarray(pixels))[None]


class TargetCollate:
    """Pads and stacks a list of items: token keys right-padded to the longest row (input_ids with `pad_id`, the
    rest with 0), every other tensor, array or number stacked, anything else kept as a list. A class, so it pickles
    for DataLoader workers."""

    PADDED = ("input_ids", "token_type_ids", "attention_mask", "labels_mask")

    def __init__(self, pad_id: int = 0, width: int | None = None) -> None:
        self.pad_id, self.width = pad_id, width  # width: a language-model cache's S, every row padded to it

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in items[0]:
            values = [it[key] for it in items]
            if self.width and key == "labels" and np.ndim(_numpy(values[0])) >= 1:  # an LM window's own token labels
                out[key] = _pad([torch.as_tensor(_numpy(v)) for v in values], -100, self.width)  # (HF's ignore id)
            elif key in self.PADDED:
                out[key] = _pad([torch.as_tensor(_numpy(v)) for v in values], self.pad_id if key == "input_ids" else 0,
                                self.width)
            elif isinstance(values[0], (torch.Tensor, np.ndarray, int, float, np.number, bool)):
                try:
                    out[key] = torch.stack([torch.as_tensor(v) for v in values])
                except RuntimeError as exc:
                    raise KDCacheError(f"cannot stack {key!r} across the batch ({str(exc).splitlines()[0]})") from None
            else:
                out[key] = values
        if "input_ids" in out and "attention_mask" not in out:  # padded ids need their mask
            out["attention_mask"] = _pad([torch.ones(_numpy(it["input_ids"]).size, dtype=torch.int64)
                                          for it in items], 0, self.width)
        if "label" in out and "labels" not in out:  # Hugging Face models read `labels`
            out["labels"] = out["label"]
        return out


def with_targets(dataset: Any, cache: Any, split: str = "train", *, index: str | Callable[[Any, int], int] | None = None,
                 inputs: Sequence[str] | None = None, label_key: str | None = None, arrays: Sequence[str] | None = None,
                 pad_id: int = 0, view_order: str | None = None, view_key: str | None = None, seed: int = 0,
                 storage_options: dict[str, Any] | None = None) -> TargetDataset:
    """`dataset` (a torch Dataset, a Hugging Face datasets.Dataset, a list of dicts) with each item's teacher
    targets from split `split` of `cache` (a path, a URL or a TeacherCache), every row checked against the cache as
    first read; see the module docstring for the keys, the join (`index`), the model inputs (`inputs`) and a views
    cache's views (`view_order`, `view_key`, `seed`, `set_epoch`)."""
    opened = open_split(cache, split, storage_options)
    return TargetDataset(dataset, opened, index=index, inputs=inputs, label_key=label_key, arrays=arrays,
                         pad_id=pad_id, view_order=view_order, view_key=view_key, seed=seed)


def _modality(task: str | None) -> str:
    from kdcache.names import task_modality

    return task_modality(task) or "features"


def _describe(dataset: Any) -> str:
    """How messages name the user's dataset."""
    name = getattr(dataset, "source", None) or getattr(dataset, "name", None)
    return f"dataset {name}" if isinstance(name, str) else f"the dataset ({type(dataset).__name__})"


def _numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _label(item: dict[str, Any], key: str | None, dtype: np.dtype) -> Any:
    for name in ((key,) if key else LABEL_KEYS):
        if name in item and item[name] is not None:
            value = _numpy(item[name]).reshape(-1)
            return value[0].astype(dtype) if len(value) == 1 else None
    return None


def _pad(rows: list[torch.Tensor], value: int, width: int | None = None) -> torch.Tensor:
    rows = [r.reshape(-1).long() for r in rows]
    out = torch.full((len(rows), max([len(r) for r in rows] + [width or 0])), value, dtype=torch.int64)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


__all__ = ["RowMismatch", "TargetCollate", "TargetDataset", "open_split", "with_targets"]
