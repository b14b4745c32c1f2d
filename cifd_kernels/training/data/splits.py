# SPDX-License-Identifier: Apache-2.0
"""What a loader returns: a :class:`Dataset` of train/val/test splits, each an
in-memory :class:`Split` or an ImageFolder :class:`FolderSplit`, and
:func:`train_val_split`, which carves the validation split from the training
set with a fixed seed (select models on ``val``, report ``test``)."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch


@dataclass
class Split:
    """Images and labels of one split, in memory.

    ``images``: uint8 [N, C, H, W]; ``labels``: int64 [N]; ``source_index``:
    int64 [N], each image's position in the file it came from (stable across
    runs, used to key caches).
    """
    images: torch.Tensor
    labels: torch.Tensor
    source_index: torch.Tensor
    _fingerprint: Optional[str] = field(default=None, repr=False)

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def in_channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    def subset(self, positions: torch.Tensor) -> "Split":
        return Split(self.images[positions], self.labels[positions],
                     self.source_index[positions])

    def fingerprint(self) -> str:
        """sha256 of the images, labels and source indices (hex, 16 chars)."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for t in (self.images, self.labels, self.source_index):
                h.update(str((tuple(t.shape), t.dtype)).encode())
                h.update(t.contiguous().numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint


@dataclass
class FolderSplit:
    """One split of an ImageFolder tree, decoded per image when iterated
    (:class:`FolderBatchIterator`); the in-memory :class:`Split`'s interface
    (``labels``, ``source_index``, ``subset``, ``fingerprint``) without pixels."""
    root: Path
    samples: list[tuple[str, int]]
    image_size: int
    source_index: torch.Tensor
    in_channels: int = 3

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([lbl for _, lbl in self.samples], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.samples)

    def subset(self, positions: torch.Tensor) -> "FolderSplit":
        pos = positions.tolist()
        return FolderSplit(self.root, [self.samples[i] for i in pos], self.image_size,
                           self.source_index[positions], self.in_channels)

    def fingerprint(self) -> str:
        """sha256 over (relative path, size, label) of every sample and the image size."""
        h = hashlib.sha256(f"image_size={self.image_size}\n".encode())
        for path, label in self.samples:
            h.update(f"{os.path.relpath(path, self.root)}\0{os.path.getsize(path)}\0"
                     f"{label}\n".encode())
        return h.hexdigest()[:16]


@dataclass
class Dataset:
    """A dataset's train/val/test splits and what a model needs to know of it."""
    name: str
    train: "Split | FolderSplit"
    val: "Split | FolderSplit"
    test: "Split | FolderSplit"
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...] = ()

    @property
    def in_channels(self) -> int:
        return self.train.in_channels

    @property
    def image_size(self) -> int:
        return self.train.image_size

    def split(self, name: str) -> "Split | FolderSplit":
        if name not in ("train", "val", "test"):
            raise ValueError(f"unknown split {name!r}: expected train, val or test")
        return getattr(self, name)


def train_val_split(full: Split, val_size: int, seed: int) -> tuple[Split, Split]:
    """Carve ``val_size`` images out of ``full`` with a fixed-seed permutation.

    Both parts keep the file order, so the result depends only on
    (len(full), val_size, seed).
    """
    n = len(full)
    if not 0 <= val_size < n:
        from ..config import ConfigError
        raise ConfigError(f"data.val_size={val_size} must be in [0, {n}): the training "
                          f"split holds {n} images")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    val_pos = perm[:val_size].sort().values
    train_pos = perm[val_size:].sort().values
    return full.subset(train_pos), full.subset(val_pos)
