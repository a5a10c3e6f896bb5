"""Random views of image batches for training: whole batches at once, on whatever device the batch is on.

- `cifar`: zero-pad by 4, a random crop of the original size, a random horizontal flip (He et al., 2016);
- `imagenet`: a random resized crop (area 8-100% of the image, aspect ratio 3/4-4/3) resized back to the
  batch's size, and a random horizontal flip (Szegedy et al., 2015), sampled for all images at once rather than
  torchvision's ten tries per image (a crop that does not fit is clamped to the image instead of retried).

Inputs are uint8 NCHW (as the loaders produce them, before normalisation); outputs are on the same scale (0-255),
float for `imagenet`, uint8 for `cifar`. The generator decides every random draw, so a run's views depend on its
seed and epoch alone. The cached teacher logits belong to the plain image: training a student on views against
them is inconsistent teaching (docs/methods.md) until views are cached.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np
import torch

from kdcache.errors import KDCacheError

AUGMENTS = ("none", "cifar", "imagenet")


def check_augment(name: str | None, modality: str) -> str | None:
    """The augmentation to apply, or None; one line when it cannot apply to this data."""
    if name in (None, "none"):
        return None
    if name not in AUGMENTS:
        raise KDCacheError(f"--augment {name!r} is not one of {', '.join(AUGMENTS)}")
    if modality != "image":
        raise KDCacheError(f"--augment {name} applies to images; this task's inputs are {modality}")
    return name


#: Views that mix two images, for views caches only (`cache-teacher --views V --augment cifar+mixup`): the row's
#: view and a partner row's view under the same crop and flip, mixed (mixup: a weighted sum of the pixels, Zhang et
#: al. 2018) or pasted (CutMix: a box of the partner's, Yun et al. 2019); the row keeps at least half of the image.
MIXES = ("mixup", "cutmix")
#: The augmentations a views cache can store.
VIEW_AUGMENTS = ("cifar", "imagenet", *(f"{base}+{mix}" for base in ("cifar", "imagenet") for mix in MIXES))
#: The version of each augmentation's parameters and of the code that applies them, recorded in a views cache: a
#: cache of another version is refused at replay rather than replayed differently.
VERSIONS = {name: 1 for name in VIEW_AUGMENTS}
_BASE_LAYOUTS = {"cifar": ["dy", "dx", "flip"],  # crop offsets into the image zero-padded by 4 (0..8), flip 0 or 1
                 "imagenet": ["x0", "y0", "x1", "y1", "flip"]}  # crop box in pixels (roi_align, aligned), flip 0/1
#: the partner row (its position in the split), the row's share lam of the pixels (mixup) or of the area (CutMix,
#: whose pasted box of the partner's is rows y0:y1, columns x0:x1)
_MIX_LAYOUTS = {"mixup": ["partner", "lam"], "cutmix": ["partner", "lam", "by0", "bx0", "by1", "bx1"]}
#: What the P numbers of one view are, per augmentation (a views cache's `view_params` [N, V, P], float32).
LAYOUTS = {name: _BASE_LAYOUTS[name.split("+")[0]] + (_MIX_LAYOUTS[name.split("+")[1]] if "+" in name else [])
           for name in VIEW_AUGMENTS}


def check_view_augment(name: str | None, modality: str) -> str:
    """The augmentation of a views cache's views; one line when it is unknown or the data are not images."""
    if name not in VIEW_AUGMENTS:
        raise KDCacheError(f"--augment {name!r} is not one of {', '.join(VIEW_AUGMENTS)}")
    if modality != "image":
        raise KDCacheError(f"--augment {name} applies to images; this task's inputs are {modality}")
    return name


def partner_column(name: str) -> int | None:
    """Where a mixing augmentation's parameters name the partner row (None: a view of the row alone)."""
    layout = LAYOUTS.get(name, [])
    return layout.index("partner") if "partner" in layout else None


def augment(images: torch.Tensor, name: str, generator: torch.Generator) -> torch.Tensor:
    """A random view of every image of an NCHW batch (see the module docstring)."""
    return apply_params(images, name, draw_params(name, len(images), images.shape[-2], images.shape[-1], generator,
                                                  images.device))


def draw_params(name: str, n: int, height: int, width: int, generator: torch.Generator,
                device: torch.device | None = None, rows: int | None = None) -> torch.Tensor:
    """The explicit parameters [n, P] (LAYOUTS) of n random views of images of this size, float32: what a views
    cache stores, so a replay never depends on how the draws are made. A mixing view draws its partner among the
    split's `rows` rows."""
    device = device or generator.device
    base, _, mix = name.partition("+")
    if mix:
        if mix not in MIXES or rows is None or rows < 1:
            raise KDCacheError(f"augmentation {name!r} is not one of {', '.join(VIEW_AUGMENTS)} (or no rows to mix)")
        return torch.cat([draw_params(base, n, height, width, generator, device),
                          _mix_params(mix, n, height, width, rows, generator, device)], dim=1)
    if name == "cifar":
        pad = 4
        dy = (_rand(n, generator, device) * (2 * pad + 1)).long().clamp(max=2 * pad)
        dx = (_rand(n, generator, device) * (2 * pad + 1)).long().clamp(max=2 * pad)
        flip = _rand(n, generator, device) < 0.5
        return torch.stack([dy, dx, flip.long()], dim=1).float()
    if name == "imagenet":
        box = _resized_box(n, height, width, generator, device)
        flip = _rand(n, generator, device) < 0.5
        return torch.cat([box, flip.float()[:, None]], dim=1)
    raise KDCacheError(f"--augment {name!r} is not one of {', '.join(AUGMENTS)}")


def apply_params(images: torch.Tensor, name: str, params: torch.Tensor,
                 partners: torch.Tensor | None = None) -> torch.Tensor:
    """The views of an NCHW batch that `params` [N, P] describe (draw_params), on the images' device: one code path
    for fresh views, capture and replay. A mixing view needs the partner rows' decoded images (`partners`)."""
    params = params.to(images.device)
    base, _, mix = name.partition("+")
    if mix:
        if partners is None or mix not in MIXES:
            raise KDCacheError(f"augmentation {name!r} mixes each view with a partner row: its images are needed")
        width = len(_BASE_LAYOUTS[base])
        mine = apply_params(images, base, params[:, :width])
        theirs = apply_params(partners.to(images.device), base, params[:, :width])
        lam = params[:, width + 1][:, None, None, None]
        if mix == "mixup":
            return lam * mine.float() + (1 - lam) * theirs.float()
        box = params[:, width + 2:width + 6].long()
        ys = torch.arange(mine.shape[-2], device=images.device)[None, :, None]
        xs = torch.arange(mine.shape[-1], device=images.device)[None, None, :]
        inside = ((ys >= box[:, 0, None, None]) & (ys < box[:, 2, None, None]) & (xs >= box[:, 1, None, None])
                  & (xs < box[:, 3, None, None]))
        return torch.where(inside[:, None], theirs, mine)
    if name == "cifar":
        out = _pad_crop(images, 4, params[:, 0].long(), params[:, 1].long())
    elif name == "imagenet":
        out = _resized_crop(images, params[:, :4])
    else:
        raise KDCacheError(f"augmentation {name!r} is not one of {', '.join(AUGMENTS[1:])}")
    flip = params[:, -1] > 0.5
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


def view_seed(seed: int, row: int) -> int:
    """The generator seed of one row's view parameters in a views cache: (seed, the row's position) only, so a
    resumed or multi-process capture draws the same views."""
    return int.from_bytes(hashlib.sha256(f"kdcache-views:{seed}:{row}".encode()).digest()[:8], "little") >> 1


def view_params(name: str, views: int, seed: int, first_row: int, rows: int, height: int, width: int,
                split_rows: int | None = None) -> torch.Tensor:
    """The parameters [rows, V, P] of the views of rows first_row.. of a split (a views cache), each row's drawn on
    the CPU from its own generator: the same whichever process, batch or resume computes them. `split_rows`: the
    split's length, among which a mixing view draws its partner."""
    return torch.stack([draw_params(name, views, height, width, torch.Generator().manual_seed(
        view_seed(seed, first_row + r)), rows=split_rows) for r in range(rows)])


def view_input(split: Any, name: str, images: torch.Tensor, params: torch.Tensor, device: torch.device,
               partners: torch.Tensor | None = None) -> Any:
    """The model input of one view of a batch: `params` [B, P] applied to the decoded uint8 images on `device` (and
    a mixing view's partner images), then the split's normalisation (`split.prepare`). Capture, replay and verify
    all call this."""
    from kdcache.data.base import Batch

    viewed = apply_params(images.to(device), name, params, partners)
    empty = torch.zeros(len(viewed))
    return split.prepare(Batch(viewed, empty, empty, np.zeros(0, dtype=np.uint64)), device)


def partner_images(split: Any, rows: Any) -> torch.Tensor:
    """The decoded uint8 images of the partner rows a mixing view names (row positions of `split`)."""
    return split.collate([split.dataset[int(r)] for r in rows]).inputs


def _mix_params(mix: str, n: int, h: int, w: int, rows: int, generator: torch.Generator,
                device: torch.device) -> torch.Tensor:
    """partner, lam (at least 1/2: the row dominates, so its own label stays the right hard label) and, for
    CutMix, the pasted box (side sqrt(1 - lam) of the image's, centred uniformly, clipped; lam is then the share
    of the area the row keeps)."""
    partner = (_rand(n, generator, device) * rows).long().clamp(max=rows - 1).float()
    u = _rand(n, generator, device)
    lam = torch.maximum(u, 1 - u)
    if mix == "mixup":
        return torch.stack([partner, lam], dim=1)
    cut = torch.sqrt(1 - lam)
    ch, cw = (cut * h).long(), (cut * w).long()
    cy = (_rand(n, generator, device) * h).long().clamp(max=h - 1)
    cx = (_rand(n, generator, device) * w).long().clamp(max=w - 1)
    y0, y1 = (cy - ch // 2).clamp(0, h), (cy + ch // 2).clamp(0, h)
    x0, x1 = (cx - cw // 2).clamp(0, w), (cx + cw // 2).clamp(0, w)
    kept = 1 - ((y1 - y0) * (x1 - x0)).float() / (h * w)
    return torch.stack([partner, kept, y0.float(), x0.float(), y1.float(), x1.float()], dim=1)


def _rand(n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=generator.device).to(device)


def _pad_crop(images: torch.Tensor, pad: int, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    n, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    ys = (dy[:, None] + torch.arange(h, device=images.device))[:, None, :, None]  # N, 1, H, 1
    xs = (dx[:, None] + torch.arange(w, device=images.device))[:, None, None, :]  # N, 1, 1, W
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    channel = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    return padded[batch, channel, ys, xs]


def _resized_box(n: int, h: int, w: int, generator: torch.Generator, device: torch.device,
                 scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    area = (scale[0] + (scale[1] - scale[0]) * _rand(n, generator, device)) * h * w
    log_ratio = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * _rand(n, generator, device)
    aspect = torch.exp(log_ratio)
    cw = torch.sqrt(area * aspect).clamp(1, w)
    ch = torch.sqrt(area / aspect).clamp(1, h)
    x0 = (w - cw) * _rand(n, generator, device)
    y0 = (h - ch) * _rand(n, generator, device)
    return torch.stack([x0, y0, x0 + cw, y0 + ch], dim=1).float()


def _resized_crop(images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    from torchvision.ops import roi_align

    n, _, h, w = images.shape
    boxes = torch.cat([torch.arange(n, device=images.device, dtype=torch.float32)[:, None], boxes.float()], dim=1)
    return roi_align(images.float(), boxes, output_size=(h, w), spatial_scale=1.0, sampling_ratio=2, aligned=True)


__all__ = ["AUGMENTS", "LAYOUTS", "VERSIONS", "apply_params", "augment", "check_augment", "draw_params", "view_input",
           "view_params", "view_seed",
           "MIXES", "VIEW_AUGMENTS", "check_view_augment", "partner_column", "partner_images"]
