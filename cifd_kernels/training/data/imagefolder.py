# SPDX-License-Identifier: Apache-2.0
"""ImageFolder trees (``root/<class>/<image>``, ImageNet's layout), decoded per
image: as a :class:`FolderSplit` of a :class:`Dataset` batched by
:class:`FolderBatchIterator`, or as a torch Dataset behind a DataLoader
(:func:`load_imagefolder_loader`)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .batches import Batch, BatchIterator
from .errors import DatasetFormatError, DatasetNotFoundError, guard_read
from .samplers import ShardedSampler
from .splits import Dataset, FolderSplit


# Per-channel statistics of ImageNet's training images in [0, 1].
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif",
                    ".tiff", ".JPEG")


class ImageFolderDataset(torch.utils.data.Dataset):
    """``root/<class>/<image>`` trees (ImageNet's layout), decoded per item.

    Classes are the sorted subdirectory names. ``train=True`` applies
    RandomResizedCrop(image_size) + horizontal flip, else Resize(image_size *
    8 / 7) + CenterCrop(image_size); both end normalised float32 [3, S, S].
    Augmentation draws from torch's global RNG, which DataLoader seeds per
    worker from its ``generator``.
    """

    def __init__(self, root: str | os.PathLike, *, train: bool, image_size: int = 224,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.root = Path(root)
        self.classes, self.samples = list_image_folder(self.root)
        self.transform = folder_transform(train, image_size, mean, std)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        return self.transform(open_rgb(path)), label

    def fingerprint(self) -> str:
        """sha256 over (relative path, size, label) of every sample: cheap, and
        changes when files are added, removed or rewritten with a new size."""
        h = hashlib.sha256()
        for path, label in self.samples:
            h.update(f"{os.path.relpath(path, self.root)}\0{os.path.getsize(path)}\0"
                     f"{label}\n".encode())
        return h.hexdigest()[:16]


def open_rgb(path: str | os.PathLike):
    """The image at ``path`` as an RGB PIL image, decoded now; a file that is
    not a readable image raises :class:`DatasetFormatError` naming it."""
    from PIL import Image  # torchvision.io's decoders are deprecated
    with guard_read(path, "image", "Replace or delete it (a class folder may hold any number "
                                   "of images)"):
        with Image.open(path) as img:
            return img.convert("RGB")


def folder_transform(train: bool, image_size: int, mean: Sequence[float] = IMAGENET_MEAN,
                     std: Sequence[float] = IMAGENET_STD):
    """ImageNet's transforms: RandomResizedCrop(image_size) + horizontal flip
    (``train``), else Resize(image_size * 8 / 7) + CenterCrop(image_size);
    both end normalised float32 [3, S, S]."""
    from torchvision.transforms import v2
    if train:
        geo = [v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()]
    else:
        geo = [v2.Resize(int(round(image_size * 8 / 7)), antialias=True),
               v2.CenterCrop(image_size)]
    return v2.Compose([v2.ToImage()] + geo + [v2.ToDtype(torch.float32, scale=True),
                                               v2.Normalize(list(mean), list(std))])


def list_image_folder(root: str | os.PathLike) -> tuple[tuple[str, ...], list[tuple[str, int]]]:
    """(sorted class names, [(path, label)] in class then path order) of ``root/<class>/...``."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetNotFoundError(
            f"ImageFolder root {root} is not a directory: point --data-dir (data.dir=DIR) "
            f"at a directory with train/ and val/ subdirectories of per-class image folders")
    classes = tuple(sorted(d.name for d in root.iterdir() if d.is_dir()))
    if not classes:
        raise DatasetNotFoundError(f"ImageFolder root {root} has no class subdirectories")
    samples: list[tuple[str, int]] = []
    for label, cls in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(root / cls)):
            for f in sorted(files):
                if f.endswith(IMAGE_EXTENSIONS) or f.lower().endswith(IMAGE_EXTENSIONS):
                    samples.append((os.path.join(dirpath, f), label))
    if not samples:
        raise DatasetNotFoundError(f"ImageFolder root {root} holds no images")
    return classes, samples


class _FolderItems(torch.utils.data.Dataset):
    """``(x, y, position)`` of a :class:`FolderSplit` under one transform."""

    def __init__(self, split: FolderSplit, transform):
        self.split, self.transform = split, transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        path, label = self.split.samples[i]
        return self.transform(open_rgb(path)), label, i


class FolderBatchIterator(BatchIterator):
    """:class:`BatchIterator` over a :class:`FolderSplit`: the same order,
    sharding and ``Batch`` objects, images decoded by a DataLoader
    (``num_workers`` processes). Augmentation is torchvision's per-image
    RandomResizedCrop + flip (:func:`folder_transform`), drawn in the workers
    from seeds that a generator owned here hands out each epoch (its state is
    in ``state_dict``), or from torch's global RNG with ``num_workers=0``;
    unlike the in-memory path, a sample's crop then depends on the number of
    ranks and workers."""

    def __init__(self, split: FolderSplit, batch_size: int, *, mean: Sequence[float],
                 std: Sequence[float], num_workers: int = 0, **kw):
        kw.pop("crop_padding", None), kw.pop("hflip", None)
        super().__init__(split, batch_size, mean=mean, std=std, **kw)
        self.num_workers = num_workers
        self.items = _FolderItems(split, folder_transform(self.augment, split.image_size,
                                                          mean, std))
        self.loader_gen = torch.Generator().manual_seed(
            int(self.order_gen.initial_seed()) * 7 + 3)

    def __iter__(self) -> Iterator[Batch]:
        n = len(self.split)
        order = torch.randperm(n, generator=self.order_gen) if self.shuffle \
            else torch.arange(n)
        plan = self._plan(order)
        loader = torch.utils.data.DataLoader(
            self.items, batch_sampler=[p.tolist() for p, _, _ in plan],
            num_workers=self.num_workers, generator=self.loader_gen,
            pin_memory=self.device.type == "cuda")
        try:
            for (pos, row0, _), (x, y, _) in zip(plan, loader):
                non_blocking = self.device.type == "cuda"
                yield Batch(x.to(self.device, non_blocking=non_blocking)
                            .contiguous(memory_format=self.memory_format),
                            y.to(self.device, non_blocking=non_blocking), pos, row0)
        except DatasetFormatError as e:
            # From a worker process the message is "Caught DatasetFormatError in
            # DataLoader worker ... Original Traceback ...": keep its last line.
            msg = str(e).rstrip().splitlines()[-1].split("DatasetFormatError: ", 1)[-1]
            raise DatasetFormatError(msg) from e

    def state_dict(self) -> dict:
        return {**super().state_dict(), "loader_gen": self.loader_gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.loader_gen.set_state(state["loader_gen"])


def load_imagefolder(data_dir: str | os.PathLike | None, *, val_size: int = 10000,
                     split_seed: int = 0, image_size: int = 224) -> Dataset:
    """An ImageNet-layout tree: ``data_dir/train/<class>/*`` (training; the
    validation split of ``val_size`` images is carved from it, as for every
    dataset here) and ``data_dir/val/<class>/*`` (reported as ``test``).
    Same class folders in both."""
    if not data_dir:
        raise DatasetNotFoundError(
            "data.name=imagefolder needs data.dir (--data-dir): a directory with train/ and "
            "val/ subdirectories of per-class image folders (ImageNet's layout)")
    root = Path(data_dir)
    classes, train = list_image_folder(root / "train")
    test_classes, test = list_image_folder(root / "val")
    if test_classes != classes:
        raise DatasetNotFoundError(
            f"{root}: train/ and val/ hold different class folders ({len(classes)} vs "
            f"{len(test_classes)}; first differing: "
            f"{next((a for a, b in zip(classes, test_classes) if a != b), '?')})")
    full = FolderSplit(root / "train", train, image_size, torch.arange(len(train)))
    n = len(full)
    if not 0 <= val_size < n:
        from ..config import ConfigError
        raise ConfigError(f"data.val_size={val_size} must be in [0, {n}): {root / 'train'} "
                          f"holds {n} images")
    g = torch.Generator().manual_seed(split_seed)
    perm = torch.randperm(n, generator=g)
    tr, va = full.subset(perm[val_size:].sort().values), full.subset(perm[:val_size].sort().values)
    te = FolderSplit(root / "val", test, image_size, torch.arange(len(test)))
    return Dataset("imagefolder", tr, va, te, len(classes), IMAGENET_MEAN, IMAGENET_STD, classes)


def write_synthetic_imagefolder(root: str | os.PathLike, n_classes: int = 3,
                                n_train: int = 8, n_val: int = 2, size: int = 40, *,
                                seed: int = 0) -> Path:
    """A tiny ImageNet-layout tree (``train/`` and ``val/``, ``n_classes`` class
    folders of PNGs whose colour encodes the class) for tests and smoke runs."""
    from PIL import Image
    root = Path(root)
    g = torch.Generator().manual_seed(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for c in range(n_classes):
            d = root / split / f"n{c:08d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                px = (torch.rand(size, size, 3, generator=g) * 60).to(torch.uint8)
                px[:, :, c % 3] += 150
                Image.fromarray(px.numpy()).save(d / f"{split}_{c}_{i}.png")
    return root


def load_imagefolder_loader(root: str | os.PathLike, *, train: bool, batch_size: int,
                            image_size: int = 224, num_workers: int = 4, seed: int = 0,
                            rank: int = 0, world_size: int = 1
                            ) -> torch.utils.data.DataLoader:
    """A DataLoader over ``root`` (one split's ImageFolder tree) with a
    :class:`ShardedSampler`; batches are ``(x [B,3,S,S] float32, y [B])``."""
    ds = ImageFolderDataset(root, train=train, image_size=image_size)
    sampler = ShardedSampler(len(ds), shuffle=train, seed=seed, rank=rank,
                             world_size=world_size)
    return torch.utils.data.DataLoader(
        ds, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
        drop_last=train, pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(seed + 1),
        persistent_workers=num_workers > 0)
