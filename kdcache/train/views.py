"""Replaying a views cache's augmented views: the exact pixels the teacher saw, for the student and for scripts.

A views cache (`cache-teacher --views V --augment cifar|imagenet`) stores per row the teacher's target on V
augmented views and each view's explicit parameters (`view_params` [N, V, P]). Replay decodes the row as capture
did and applies the stored parameters with the code capture used (`kdcache.data.augment.view_input`), on the
training device after the batch is moved there. Which view a row trains on in epoch e (`ViewChoice`): view
e mod V (`cycle`, the default), one drawn per row from (seed, e) (`random`), or the plain image (`plain`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from kdcache.data import augment as views_augment
from kdcache.errors import KDCacheError
from kdcache.names import VIEW_ORDERS
from kdcache.train.batches import by_batch, epoch_seed


@dataclass
class ViewChoice:
    """Which of V views each row trains on in each epoch: fixed by (order, seed, epoch), so the student's pixels and
    the teacher's targets (chosen apart, in the inputs and in the batches) always name the same view."""

    views: int
    order: str
    seed: int
    rows: int
    _tables: dict[int, torch.Tensor] = field(default_factory=dict)

    def of(self, rows: np.ndarray | torch.Tensor, epoch: int) -> torch.Tensor:
        """The view (int64) of each of these row positions in `epoch`, on the CPU."""
        rows = torch.as_tensor(np.asarray(rows.cpu() if isinstance(rows, torch.Tensor) else rows, dtype=np.int64))
        if self.order == "cycle":
            return torch.full((len(rows),), epoch % self.views, dtype=torch.int64)
        if epoch not in self._tables:  # one draw per row and epoch (the last epoch's table only is kept)
            generator = torch.Generator().manual_seed(epoch_seed(self.seed + 104729, epoch))
            self._tables = {epoch: torch.randint(self.views, (self.rows,), generator=generator)}
        return self._tables[epoch][rows]


class ViewReplay:
    """A views cache's training split, replayed: the stored parameters of every view (on the host; each epoch's
    are uploaded to the training device at once) and the choice of view per row and epoch."""

    def __init__(self, augment: str, params: np.ndarray, choice: ViewChoice) -> None:
        self.augment, self.choice = augment, choice
        self.params = np.ascontiguousarray(params, dtype=np.float32)  # N, V, P
        column = views_augment.partner_column(augment)
        #: a mixing augmentation: each view's partner row [N, V], on the host (the rows to decode beside the batch)
        self.partner_rows = params[..., column].astype(np.int64) if column is not None else None

    def partners(self, rows: np.ndarray, epoch: int) -> np.ndarray | None:
        """The partner rows of these rows' views in `epoch` (None: views of the rows alone)."""
        if self.partner_rows is None:
            return None
        return self.partner_rows[np.asarray(rows, dtype=np.int64), self.choice.of(rows, epoch).numpy()]

    def epoch_params(self, batches: list[np.ndarray], epoch: int, device: torch.device) -> Iterator[torch.Tensor]:
        """The view parameters [B, P] of each batch of rows in `epoch`, on `device`: the epoch's gathered on the host
        and uploaded once, so no step waits on a copy."""
        every = np.concatenate(batches).astype(np.int64) if batches else np.zeros(0, dtype=np.int64)
        flat = torch.from_numpy(self.params[every, self.choice.of(every, epoch).numpy()])
        return by_batch(flat, batches, device)

    def apply(self, images: torch.Tensor, params: torch.Tensor, device: torch.device,
              partners: torch.Tensor | None = None) -> torch.Tensor:
        """The views `params` [B, P] (from `epoch_params`) of a batch of decoded uint8 images, made on `device` (a
        mixing view's partner images: `partners`, decoded alongside)."""
        if partners is not None:
            partners = partners.to(device, non_blocking=True)
        return views_augment.apply_params(images.to(device, non_blocking=True), self.augment, params, partners)

    def describe(self, epochs: int) -> dict[str, Any]:
        """What a run's summary records of its views: how many, in which order, and epochs / V (the passes over
        each view: above 1, views repeat)."""
        return {"augment": self.augment, "views": self.choice.views, "order": self.choice.order,
                "epochs_per_view": round(epochs / self.choice.views, 3)}


def check_views(header: Any, where: str) -> Any:
    """The cache's views attribute (schema.ViewInfo) when this kdcache replays it exactly, else one line: an
    augmentation or version it does not know, or a parameter layout other than its own."""
    info = header.views
    if info is None:
        raise KDCacheError(f"{where}: stores no augmented views (cache the teacher with --views V --augment "
                           "cifar|imagenet)")
    known = ", ".join(f"{name} v{version}" for name, version in views_augment.VERSIONS.items())
    known = known.replace("cifar+mixup v1, cifar+cutmix v1, imagenet+mixup v1, imagenet+cutmix v1",
                          "and each with +mixup or +cutmix v1")
    if info.augment not in views_augment.VERSIONS or info.version != views_augment.VERSIONS[info.augment] or \
            list(info.params) != views_augment.LAYOUTS[info.augment]:
        raise KDCacheError(f"{where}: stores views of augmentation {info.augment!r} version {info.version} "
                           f"(parameters {info.params}), which this kdcache does not replay (it knows {known}); "
                           "use the kdcache that wrote the cache")
    return info


def view_replay(split_cache: Any, order: str | None, augment: str | None, seed: int) -> ViewReplay | None:
    """How distill feeds the training split: None for a cache without views (or `--view-order plain`), else the
    replay; `--view-order` against a cache without views, or a fresh `--augment` over replayed views, is one line."""
    header, where = split_cache.header, f"{split_cache.path}"
    if order is not None and order not in VIEW_ORDERS:
        raise KDCacheError(f"--view-order {order!r} is not one of {', '.join(VIEW_ORDERS)}")
    if header.views is None:
        if order is not None:
            raise KDCacheError(f"--view-order {order}: {where} stores no augmented views (cache the teacher with "
                               "--views V --augment cifar|imagenet)")
        return None
    if order == "plain":
        return None
    if augment not in (None, "none"):
        raise KDCacheError(f"--augment {augment}: {where} stores augmented views, which the student replays "
                           "exactly; drop --augment, or pass --view-order plain to train on fresh views of the plain "
                           "image instead")
    info = check_views(header, where)
    choice = ViewChoice(int(info.count), order or "cycle", int(seed), len(split_cache))
    return ViewReplay(info.augment, split_cache.read("view_params"), choice)


def replay_view(cache: Any, split: str, row: int, view: int, *, data: str | Path | None = None,
                device: str | torch.device = "cpu") -> torch.Tensor:
    """The exact input tensor [C, H, W] the teacher saw for view `view` of row `row` of a views cache's split: the
    row decoded from the cache's own data (or `data`), its fingerprint checked, the stored parameters applied by
    the code capture used, then the split's normalisation."""
    from kdcache.cache import Cache
    from kdcache.data import load_split, recorded_options

    opened = cache if isinstance(cache, Cache) else Cache(cache)
    info = check_views(opened.header, str(opened.store))
    split_cache = opened.split(split)
    if not 0 <= int(row) < len(split_cache) or not 0 <= int(view) < int(info.count):
        raise KDCacheError(f"{opened.store}: split {split!r} has rows 0-{len(split_cache) - 1} and views "
                           f"0-{info.count - 1}; asked for row {row}, view {view}")
    dataset = split_cache.split_attrs.get("dataset") or {}
    task = opened.header.task
    source = load_split(task.name, data if data is not None else dataset.get("source"), split,
                        options=recorded_options(dataset, task.to_attrs()))
    if len(source) != len(split_cache):
        raise KDCacheError(f"{source.source}: has {len(source)} rows for split {split!r} but the cache has "
                           f"{len(split_cache)}; the data changed since the teacher was cached")
    params = torch.from_numpy(split_cache.read("view_params", int(row), int(row) + 1)[0, int(view)])[None]
    column = views_augment.partner_column(info.augment)
    rows = [int(row)] + ([int(params[0, column])] if column is not None else [])  # a mixing view: its partner too
    batch = source.collate([source.dataset[r] for r in rows])
    stored = split_cache.read("fingerprint")
    fresh = np.asarray(batch.fingerprint, dtype=np.uint64)
    for k, r in enumerate(rows):
        if int(fresh[k]) != int(stored[r]):
            raise KDCacheError(f"{source.source}: row {r} does not match the cache {opened.store}/{split} "
                               f"(fingerprint {int(fresh[k]):016x} vs {int(stored[r]):016x}); the data changed since "
                               "the teacher was cached")
    partners = batch.inputs[1:] if column is not None else None
    return views_augment.view_input(source, info.augment, batch.inputs[:1], params, torch.device(device),
                                    partners)[0]


__all__ = ["VIEW_ORDERS", "ViewChoice", "ViewReplay", "check_views", "replay_view", "view_replay"]
