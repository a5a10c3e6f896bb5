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

import math

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


def augment(images: torch.Tensor, name: str, generator: torch.Generator) -> torch.Tensor:
    """A random view of every image of an NCHW batch (see the module docstring)."""
    if name == "cifar":
        return _flip(_pad_crop(images, 4, generator), generator)
    if name == "imagenet":
        return _flip(_resized_crop(images, generator), generator)
    raise KDCacheError(f"--augment {name!r} is not one of {', '.join(AUGMENTS)}")


def _rand(n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=generator.device).to(device)


def _flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    flip = _rand(len(images), generator, images.device) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def _pad_crop(images: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    n, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    dy = (_rand(n, generator, images.device) * (2 * pad + 1)).long().clamp(max=2 * pad)
    dx = (_rand(n, generator, images.device) * (2 * pad + 1)).long().clamp(max=2 * pad)
    ys = (dy[:, None] + torch.arange(h, device=images.device))[:, None, :, None]  # N, 1, H, 1
    xs = (dx[:, None] + torch.arange(w, device=images.device))[:, None, None, :]  # N, 1, 1, W
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    channel = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    return padded[batch, channel, ys, xs]


def _resized_crop(images: torch.Tensor, generator: torch.Generator, scale: tuple[float, float] = (0.08, 1.0),
                  ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    from torchvision.ops import roi_align

    n, _, h, w = images.shape
    device = images.device
    area = (scale[0] + (scale[1] - scale[0]) * _rand(n, generator, device)) * h * w
    log_ratio = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * _rand(n, generator, device)
    aspect = torch.exp(log_ratio)
    cw = torch.sqrt(area * aspect).clamp(1, w)
    ch = torch.sqrt(area / aspect).clamp(1, h)
    x0 = (w - cw) * _rand(n, generator, device)
    y0 = (h - ch) * _rand(n, generator, device)
    boxes = torch.stack([torch.arange(n, device=device, dtype=cw.dtype), x0, y0, x0 + cw, y0 + ch], dim=1)
    return roi_align(images.float(), boxes.float(), output_size=(h, w), spatial_scale=1.0, sampling_ratio=2,
                     aligned=True)


__all__ = ["AUGMENTS", "augment", "check_augment"]
