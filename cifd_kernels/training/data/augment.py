# SPDX-License-Identifier: Apache-2.0
"""Augmentation of whole batches of images at once (random crop with zero padding,
horizontal flip) and normalisation: on a CPU far faster than per-image PIL
transforms in worker processes."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def normalize(images: torch.Tensor, mean: Sequence[float],
              std: Sequence[float]) -> torch.Tensor:
    """uint8 [B, C, H, W] -> float32 ``(x / 255 - mean) / std``."""
    c = images.shape[1]
    m = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, c, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, c, 1, 1)
    return images.float().div_(255.0).sub_(m).div_(s)


def draw_crop_flip(n: int, padding: int, flip: bool, generator: torch.Generator
                   ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The random draws of :func:`random_crop_flip` for ``n`` images: crop
    offsets int64 [n, 2] in [0, 2*padding] (None without padding), then flip
    flags bool [n] (None without flips), in that order from ``generator``."""
    off = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator,
                        device=generator.device) if padding > 0 else None
    flips = (torch.rand(n, generator=generator, device=generator.device) < 0.5) \
        if flip else None
    return off, flips


def apply_crop_flip(images: torch.Tensor, padding: int, off: Optional[torch.Tensor],
                    flips: Optional[torch.Tensor]) -> torch.Tensor:
    """Crop [B, C, H, W] ``images`` (zero padding ``padding``) at offsets ``off``
    [B, 2] and flip where ``flips`` [B]: the draws of :func:`draw_crop_flip`."""
    b, c, h, w = images.shape
    dev = images.device
    if off is None and flips is None:
        return images
    if off is not None:
        off = off.to(dev)
        padded = F.pad(images, (padding, padding, padding, padding))
    else:
        off = torch.zeros(b, 2, dtype=torch.long, device=dev)
        padded = images
    rows = off[:, 0:1] + torch.arange(h, device=dev)               # [B, H]
    cols = off[:, 1:2] + torch.arange(w, device=dev)               # [B, W]
    if flips is not None:
        cols = torch.where(flips.to(dev)[:, None], cols.flip(1), cols)
    bi = torch.arange(b, device=dev).view(b, 1, 1, 1)
    ci = torch.arange(c, device=dev).view(1, c, 1, 1)
    return padded[bi, ci, rows.view(b, 1, h, 1), cols.view(b, 1, 1, w)]


def random_crop_flip(images: torch.Tensor, padding: int, flip: bool,
                     generator: torch.Generator) -> torch.Tensor:
    """Batched random crop (zero padding ``padding``) and horizontal flip.

    ``images``: [B, C, H, W], any dtype, on the generator's device. Each image
    gets its own offsets in [0, 2*padding] and a flip with probability 1/2,
    drawn from ``generator`` (offsets first, then flips) — the same per-image
    distribution as torchvision's RandomCrop(padding) + RandomHorizontalFlip.
    """
    off, flips = draw_crop_flip(images.shape[0], padding, flip, generator)
    return apply_crop_flip(images, padding, off, flips)
