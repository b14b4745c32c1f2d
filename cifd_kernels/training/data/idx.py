# SPDX-License-Identifier: Apache-2.0
"""IDX files (LeCun's MNIST format: read, write, parse) and Fashion-MNIST, the
dataset stored in them (its loader and a synthetic look-alike for tests)."""
from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path
from typing import Optional

import torch

from .errors import DatasetFormatError, DatasetNotFoundError, guard_read
from .splits import Dataset, Split, train_val_split


FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

# Per-channel statistics of the training images in [0, 1].
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


# IDX (LeCun's MNIST format): two zero bytes, a type code, the number of
# dimensions, that many big-endian uint32 sizes, then the data, big-endian.
_IDX_TYPES = {
    0x08: (torch.uint8, 1), 0x09: (torch.int8, 1), 0x0B: (torch.int16, 2),
    0x0C: (torch.int32, 4), 0x0D: (torch.float32, 4), 0x0E: (torch.float64, 8),
}


def parse_idx(buf: bytes, name: str = "<bytes>") -> torch.Tensor:
    """Decode the bytes of an IDX file into a tensor of its type and shape."""
    if len(buf) < 4 or buf[0] != 0 or buf[1] != 0 or buf[2] not in _IDX_TYPES:
        raise DatasetFormatError(f"{name}: not an IDX file (bad magic {buf[:4].hex()})")
    dtype, size = _IDX_TYPES[buf[2]]
    ndim = buf[3]
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise DatasetFormatError(f"{name}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", buf[4:header])
    count = 1
    for s in shape:
        count *= s
    if len(buf) - header != count * size:
        raise DatasetFormatError(f"{name}: IDX header says {shape} ({count * size} bytes of "
                         f"data) but the file holds {len(buf) - header}")
    raw = torch.frombuffer(bytearray(buf[header:]), dtype=torch.uint8)
    if size > 1:  # big-endian on disk: reverse each element's bytes
        raw = raw.view(-1, size).flip(1).reshape(-1)
    return raw.view(dtype).reshape(shape).clone()


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """Read an IDX file, gzip-compressed when its name ends in ``.gz``."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        return parse_idx(f.read(), str(path))


def write_idx(t: torch.Tensor, path: str | os.PathLike) -> None:
    """Write ``t`` as an IDX file (gzip-compressed when ``path`` ends in .gz)."""
    codes = {dt: code for code, (dt, _) in _IDX_TYPES.items()}
    if t.dtype not in codes:
        raise ValueError(f"IDX cannot hold {t.dtype}")
    size = _IDX_TYPES[codes[t.dtype]][1]
    raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    if size > 1:
        raw = raw.view(-1, size).flip(1).reshape(-1)
    blob = (bytes([0, 0, codes[t.dtype], t.dim()]) + struct.pack(f">{t.dim()}I", *t.shape)
            + raw.numpy().tobytes())
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(blob)


def _find_idx(data_dir: Path, stem: str) -> Optional[Path]:
    # Accept the canonical "-idx3-ubyte" names and the ".idx3-ubyte" variant,
    # raw or gzipped.
    for name in (stem, stem.replace("-idx", ".idx")):
        for suffix in ("", ".gz"):
            p = data_dir / (name + suffix)
            if p.is_file():
                return p
    return None


_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def load_fashion_mnist(data_dir: str | os.PathLike | None = None, *,
                       val_size: int = 5000, split_seed: int = 0) -> Dataset:
    """Fashion-MNIST from its four IDX files (raw or ``.gz``) in ``data_dir``.

    ``data_dir`` defaults to ``/usr/share/datasets/fashion-mnist`` (the
    ``dataset-fashion-mnist`` package). Images: 28x28x1 uint8, 10 classes.
    """
    data_dir = Path(data_dir or FASHION_MNIST_DIR)
    found, missing = {}, []
    for split, stems in _FMNIST_FILES.items():
        for stem in stems:
            p = _find_idx(data_dir, stem) if data_dir.is_dir() else None
            if p is None:
                missing.append(stem + "[.gz]")
            found[stem] = p
    if missing:
        raise DatasetNotFoundError(
            f"Fashion-MNIST not found in {data_dir}: missing {', '.join(missing)}. "
            f"Install it with `apt-get install dataset-fashion-mnist` (files go to "
            f"{FASHION_MNIST_DIR}), or point --data-dir (data.dir=DIR) at a directory "
            f"holding the four IDX files (train-images-idx3-ubyte, "
            f"train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, "
            f"raw or .gz), or download them: `cifd download-data --data-dir DIR`.")
    fix = ("Replace it with a good copy: `apt-get install --reinstall dataset-fashion-mnist`"
           if data_dir == Path(FASHION_MNIST_DIR) else
           f"Replace it with a good copy: `cifd download-data --data-dir {data_dir}` "
           f"downloads the four files and verifies their checksums")
    splits = {}
    for split, (img_stem, lbl_stem) in _FMNIST_FILES.items():
        with guard_read(found[img_stem], "IDX file", fix):
            images = read_idx(found[img_stem])
            if images.dim() != 3 or images.dtype != torch.uint8:
                raise DatasetFormatError(f"{found[img_stem]}: expected uint8 [N, H, W] images, "
                                         f"got {images.dtype} {tuple(images.shape)}")
        with guard_read(found[lbl_stem], "IDX file", fix):
            labels = read_idx(found[lbl_stem])
            if labels.shape != images.shape[:1]:
                raise DatasetFormatError(f"{found[lbl_stem]}: {labels.shape[0]} labels for "
                                         f"{images.shape[0]} images")
        splits[split] = Split(images.unsqueeze(1).contiguous(), labels.long(),
                              torch.arange(images.shape[0]))
    train, val = train_val_split(splits["train"], val_size, split_seed)
    return Dataset("fashion_mnist", train, val, splits["test"], 10,
                   FASHION_MNIST_MEAN, FASHION_MNIST_STD, FASHION_MNIST_CLASSES)


def write_synthetic_fashion_mnist(data_dir: str | os.PathLike, n_train: int = 600,
                                  n_test: int = 200, *, seed: int = 0,
                                  gz: bool = True) -> Path:
    """Write a tiny Fashion-MNIST look-alike (the four IDX files) to ``data_dir``.

    Random dark 28x28 images with a bright 8x4 patch whose position encodes the
    label (10 classes), so a small CNN learns it in an epoch or two. For tests
    and smoke runs without the real dataset; returns ``data_dir``.
    """
    d = Path(data_dir)
    d.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        y = torch.randint(0, 10, (n,), generator=g)
        x = (torch.rand(n, 28, 28, generator=g) * 60).to(torch.uint8)
        for i, label in enumerate(y.tolist()):
            r, c = (label // 5) * 10 + 4, (label % 5) * 5 + 1
            x[i, r:r + 8, c:c + 4] = 250
        sfx = ".gz" if gz else ""
        write_idx(x, d / f"{prefix}-images-idx3-ubyte{sfx}")
        write_idx(y.to(torch.uint8), d / f"{prefix}-labels-idx1-ubyte{sfx}")
    return d
