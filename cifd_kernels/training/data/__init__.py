# SPDX-License-Identifier: Apache-2.0
"""Datasets for the distillation recipes.

Fashion-MNIST (IDX files, :mod:`.idx`; :mod:`.download` fetches them) and
CIFAR-100 (the ``cifar-100-python`` pickles, :mod:`.cifar`) live in memory as
uint8 ``[N, C, H, W]`` tensors (:mod:`.splits`), augmented a whole batch at a
time (:mod:`.augment`) and batched by :mod:`.batches` in an order sharded over
ranks (:mod:`.samplers`). ImageFolder trees (ImageNet, :mod:`.imagefolder`) are
decoded per image through a ``torch.utils.data.DataLoader``. Unreadable files
raise the errors of :mod:`.errors`.

Splits. ``train`` is the training set minus a validation split carved from it
with a fixed seed (``data.val_size`` images, ``data.split_seed``): select
models on ``val``, report ``test``, never tune on ``test``.

Here: the two entries that choose by the kind of dataset (:func:`load_dataset`,
:func:`make_batches`), and every public name of the modules above."""
from __future__ import annotations

from .augment import apply_crop_flip, draw_crop_flip, normalize, random_crop_flip
from .batches import Batch, BatchIterator
from .cifar import (CIFAR100_DIR, CIFAR100_MEAN, CIFAR100_STD, load_cifar100,
                    write_synthetic_cifar100)
from .download import FASHION_MNIST_SHA256, FASHION_MNIST_URL, download_fashion_mnist
from .errors import DatasetFormatError, DatasetNotFoundError, guard_read
from .idx import (FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, FASHION_MNIST_MEAN, FASHION_MNIST_STD,
                  load_fashion_mnist, parse_idx, read_idx, write_idx, write_synthetic_fashion_mnist)
from .imagefolder import (IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD, FolderBatchIterator,
                          ImageFolderDataset, folder_transform, list_image_folder,
                          load_imagefolder, load_imagefolder_loader, open_rgb,
                          write_synthetic_imagefolder)
from .samplers import ShardedSampler, global_batches, pad_to_multiple, shard_indices
from .splits import Dataset, FolderSplit, Split, train_val_split

__all__ = [
    # errors
    "DatasetFormatError", "DatasetNotFoundError", "guard_read",
    # IDX, Fashion-MNIST
    "FASHION_MNIST_CLASSES", "FASHION_MNIST_DIR", "FASHION_MNIST_MEAN", "FASHION_MNIST_STD",
    "load_fashion_mnist", "parse_idx", "read_idx", "write_idx", "write_synthetic_fashion_mnist",
    "FASHION_MNIST_SHA256", "FASHION_MNIST_URL", "download_fashion_mnist",
    # CIFAR-100
    "CIFAR100_DIR", "CIFAR100_MEAN", "CIFAR100_STD", "load_cifar100", "write_synthetic_cifar100",
    # ImageFolder
    "IMAGE_EXTENSIONS", "IMAGENET_MEAN", "IMAGENET_STD", "FolderBatchIterator",
    "ImageFolderDataset", "folder_transform", "list_image_folder", "load_imagefolder",
    "load_imagefolder_loader", "open_rgb", "write_synthetic_imagefolder",
    # splits, augmentation, order, batches
    "Dataset", "FolderSplit", "Split", "train_val_split",
    "apply_crop_flip", "draw_crop_flip", "normalize", "random_crop_flip",
    "ShardedSampler", "global_batches", "pad_to_multiple", "shard_indices",
    "Batch", "BatchIterator",
    # the entries
    "DATASETS", "load_dataset", "make_batches",
]


DATASETS = ("fashion_mnist", "cifar100", "imagefolder")


def load_dataset(name: str, data_dir: str | None = None, *, val_size: int = 5000,
                 split_seed: int = 0, image_size: int = 224) -> Dataset:
    """A dataset by name: ``fashion_mnist``, ``cifar100`` (in memory) or
    ``imagefolder`` (decoded per batch; ``image_size`` is its crop size)."""
    if name == "fashion_mnist":
        return load_fashion_mnist(data_dir, val_size=val_size, split_seed=split_seed)
    if name == "cifar100":
        return load_cifar100(data_dir, val_size=val_size, split_seed=split_seed)
    if name == "imagefolder":
        return load_imagefolder(data_dir, val_size=val_size, split_seed=split_seed,
                                image_size=image_size)
    raise ValueError(f"unknown dataset {name!r}: expected one of {DATASETS}")


def make_batches(split: "Split | FolderSplit", batch_size: int, *, num_workers: int = 0,
                 **kw) -> BatchIterator:
    """A :class:`BatchIterator` for an in-memory split, a
    :class:`FolderBatchIterator` for an ImageFolder split (same arguments)."""
    if isinstance(split, FolderSplit):
        return FolderBatchIterator(split, batch_size, num_workers=num_workers, **kw)
    return BatchIterator(split, batch_size, **kw)
