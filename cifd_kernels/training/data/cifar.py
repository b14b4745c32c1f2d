# SPDX-License-Identifier: Apache-2.0
"""CIFAR-100 from the unpacked ``cifar-100-python`` pickles, and a synthetic
directory in the same format for tests."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

from .errors import DatasetFormatError, DatasetNotFoundError, guard_read
from .splits import Dataset, Split, train_val_split


CIFAR100_DIR = "/usr/share/datasets/cifar-100-python"

# Per-channel statistics of the training images in [0, 1].
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


def load_cifar100(data_dir: str | os.PathLike | None = None, *,
                  val_size: int = 5000, split_seed: int = 0) -> Dataset:
    """CIFAR-100 from the unpacked ``cifar-100-python`` directory.

    Expects the pickles ``train`` and ``test`` (dicts with ``b"data"``: uint8
    [N, 3072], channel-major 32x32x3, and ``b"fine_labels"``) and optionally
    ``meta`` (``b"fine_label_names"``). 100 fine classes.
    """
    data_dir = Path(data_dir or CIFAR100_DIR)
    missing = [n for n in ("train", "test") if not (data_dir / n).is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"CIFAR-100 not found in {data_dir}: missing {', '.join(missing)}. "
            f"Download cifar-100-python.tar.gz from "
            f"https://www.cs.toronto.edu/~kriz/cifar.html, unpack it, and point "
            f"--data-dir (data.dir=DIR) at the cifar-100-python directory.")

    fix = (f"Replace {data_dir} with a fresh copy: download cifar-100-python.tar.gz from "
           f"https://www.cs.toronto.edu/~kriz/cifar.html and unpack it")

    def load(name):
        with guard_read(data_dir / name, "CIFAR-100 pickle", fix):
            with open(data_dir / name, "rb") as f:
                d = pickle.load(f, encoding="bytes")
            import numpy as np  # the pickles hold numpy arrays
            data = torch.from_numpy(np.ascontiguousarray(d[b"data"], dtype=np.uint8))
            labels = torch.as_tensor(list(d[b"fine_labels"]), dtype=torch.long)
            images = data.reshape(-1, 3, 32, 32).contiguous()
            if images.shape[0] != labels.shape[0]:
                raise DatasetFormatError(f"{data_dir / name}: {labels.shape[0]} labels for "
                                         f"{images.shape[0]} images")
        return Split(images, labels, torch.arange(labels.shape[0]))

    classes: tuple[str, ...] = ()
    if (data_dir / "meta").is_file():
        with guard_read(data_dir / "meta", "CIFAR-100 pickle", fix):
            with open(data_dir / "meta", "rb") as f:
                meta = pickle.load(f, encoding="bytes")
            classes = tuple(n.decode() for n in meta.get(b"fine_label_names", ()))
    full, test = load("train"), load("test")
    train, val = train_val_split(full, val_size, split_seed)
    return Dataset("cifar100", train, val, test, 100, CIFAR100_MEAN, CIFAR100_STD,
                   classes)


def write_synthetic_cifar100(data_dir: str | os.PathLike, n_train: int = 200,
                             n_test: int = 100, *, seed: int = 0) -> Path:
    """A tiny ``cifar-100-python`` directory (``train``, ``test``, ``meta``
    pickles in the real archive's format: uint8 [N, 3072] channel-major rows,
    ``fine_labels``, ``coarse_labels``) for tests and smoke runs."""
    import numpy as np
    d = Path(data_dir)
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, n in (("train", n_train), ("test", n_test)):
        fine = rng.integers(0, 100, n)
        x = rng.integers(0, 80, (n, 3, 32, 32), dtype=np.uint8)
        for i, c in enumerate(fine):  # a bright 4x4 patch whose place encodes the class
            r, col = (c // 10) * 3, (c % 10) * 3
            x[i, c % 3, r:r + 4, col:col + 4] = 250
        blob = {b"data": x.reshape(n, 3072), b"fine_labels": fine.tolist(),
                b"coarse_labels": (fine // 5).tolist(),
                b"filenames": [f"{name}_{i}.png".encode() for i in range(n)]}
        with open(d / name, "wb") as f:
            pickle.dump(blob, f)
    with open(d / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"class{i}".encode() for i in range(100)],
                     b"coarse_label_names": [f"super{i}".encode() for i in range(20)]}, f)
    return d
