# SPDX-License-Identifier: Apache-2.0
"""Datasets for the distillation recipes, held as tensors in memory.

Fashion-MNIST (standard IDX files) and CIFAR-100 (the ``cifar-100-python``
pickle archive, unpacked) are small enough to live in memory as ``uint8``
``[N, C, H, W]`` tensors; augmentation (random crop with zero padding +
horizontal flip) runs on whole batches of tensors, which on a CPU is far faster
than per-image PIL transforms in worker processes. ImageFolder trees (ImageNet)
are decoded lazily per image through a ``torch.utils.data.DataLoader``.

Splits. ``train`` is the training set minus a validation split carved from it
with a fixed seed (``data.val_size`` images, ``data.split_seed``): select
models on ``val``, report ``test``, never tune on ``test``.

Batch order and augmentation draw from :class:`torch.Generator` objects owned by
the iterator, whose state goes into checkpoints, so that a resumed run sees the
very batches an uninterrupted one would. Sharding over ``rank``/``world_size``
follows ``torch.utils.data.DistributedSampler`` (pad by wrapping around to a
multiple of ``world_size``, rank ``r`` takes every ``world_size``-th index
starting at ``r``), so the same code serves DDP.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
CIFAR100_DIR = "/usr/share/datasets/cifar-100-python"

# Per-channel statistics of the training images in [0, 1].
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not where the configuration says."""


class DatasetFormatError(ValueError):
    """A dataset's files are there but not in the expected format."""


def _reason(e: BaseException) -> str:
    """``Type: first line of the message``, short: torch's and DataLoader's
    messages run to dozens of lines."""
    first = (str(e).strip().splitlines() or [""])[0].rstrip(".")
    return f"{type(e).__name__}: {first[:160]}" if first else type(e).__name__


@contextlib.contextmanager
def guard_read(path: str | os.PathLike, what: str, fix: str,
               error: type[Exception] = DatasetFormatError) -> Iterator[None]:
    """Read and decode a user's file inside ``with guard_read(...)``: any failure
    (truncated, corrupt, of another kind, unreadable) becomes one ``error``
    naming ``path``, saying it is not a readable ``what``, then ``fix`` (what to
    do). An ``error`` raised inside keeps its message and gains ``fix``. The
    cause stays chained (``CIFD_TRACEBACK=1`` shows it).

    The net is wide on purpose: decoders raise EOFError, OSError, zlib.error,
    pickle.UnpicklingError, RuntimeError, KeyError, ... on bad bytes, and
    inside the block every one of them means the file cannot be used."""
    try:
        yield
    except error as e:
        raise error(f"{e}. {fix}") from e
    except Exception as e:  # noqa: BLE001 - see the docstring
        why = "an empty file" if os.path.isfile(path) and os.path.getsize(path) == 0 \
            else _reason(e)
        raise error(f"{path} is not a readable {what} ({why}). {fix}") from e


# --------------------------------------------------------------------------- IDX
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


# ------------------------------------------------------------------ containers
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
        from .config import ConfigError
        raise ConfigError(f"data.val_size={val_size} must be in [0, {n}): the training "
                          f"split holds {n} images")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    val_pos = perm[:val_size].sort().values
    train_pos = perm[val_size:].sort().values
    return full.subset(train_pos), full.subset(val_pos)


# ---------------------------------------------------------------- loaders
_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


# The official release (zalandoresearch/fashion-mnist) and, per file, the sha256 and
# size of the *decompressed* IDX content: mirrors that recompress the .gz files
# (Debian's package does) still match. Computed from Debian's dataset-fashion-mnist.
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_SHA256 = {
    "train-images-idx3-ubyte": ("c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888", 47040016),
    "train-labels-idx1-ubyte": ("bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9", 60008),
    "t10k-images-idx3-ubyte": ("5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b", 7840016),
    "t10k-labels-idx1-ubyte": ("0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34", 10008),
}


def _gz_content_ok(path: Path, sha256: str, size: int) -> bool:
    h, n = hashlib.sha256(), 0
    try:
        with gzip.open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
                n += len(chunk)
    except (OSError, EOFError):
        return False
    return n == size and h.hexdigest() == sha256


def download_fashion_mnist(dest: str | os.PathLike, *, base_url: str = FASHION_MNIST_URL,
                           timeout: float = 60.0,
                           checksums: Optional[dict[str, tuple[str, int]]] = None) -> Path:
    """Download the four Fashion-MNIST ``.gz`` files from ``base_url`` into ``dest``.

    Each file is fetched to ``<name>.part`` and moved into place only once the
    sha256 and size of its decompressed content match ``checksums`` (default
    :data:`FASHION_MNIST_SHA256`), so ``dest`` never holds a partial or wrong
    file; files already there and valid are kept. Raises
    :class:`DatasetNotFoundError` when the server cannot be reached and
    :class:`DatasetFormatError` on a checksum mismatch (the download is
    discarded). Returns ``dest``, ready for ``--data-dir``.
    """
    import shutil
    import urllib.error
    import urllib.request

    sums = FASHION_MNIST_SHA256 if checksums is None else checksums
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for stem, (sha, size) in sums.items():
        final = dest / f"{stem}.gz"
        if final.exists() and _gz_content_ok(final, sha, size):
            continue
        url = base_url.rstrip("/") + f"/{stem}.gz"
        part = final.with_name(final.name + ".part")
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r, open(part, "wb") as f:
                shutil.copyfileobj(r, f)
        except (urllib.error.URLError, OSError, ValueError) as e:
            part.unlink(missing_ok=True)
            raise DatasetNotFoundError(
                f"could not download {url} ({e}). Without network, install "
                f"`apt-get install dataset-fashion-mnist` or pass --data-dir with the IDX files.") from e
        if not _gz_content_ok(part, sha, size):
            part.unlink(missing_ok=True)
            raise DatasetFormatError(
                f"{url}: checksum mismatch (the decompressed file is not {size} bytes with sha256 "
                f"{sha}); the download was discarded")
        os.replace(part, final)
    return dest


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


# ------------------------------------------------------------ augmentation
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


# ----------------------------------------------------------------- iteration
class Batch(NamedTuple):
    """``x``: float32 [B, C, H, W] normalised; ``y``: int64 [B]; ``pos``: int64
    [B], each sample's position in its :class:`Split` (to look up caches);
    ``row0``: the first row of this batch within the global batch it is a
    slice of (0 in one process; see :mod:`.distributed`)."""
    x: torch.Tensor
    y: torch.Tensor
    pos: torch.Tensor
    row0: int = 0


def shard_indices(order: torch.Tensor, rank: int, world_size: int, *,
                  pad: bool = True) -> torch.Tensor:
    """DistributedSampler's sharding: wrap-pad to a multiple of ``world_size``
    (unless ``pad`` is False), then rank ``r`` takes ``order[r::world_size]``."""
    if world_size == 1:
        return order
    order = pad_to_multiple(order, world_size) if pad else order
    return order[rank::world_size]


def pad_to_multiple(order: torch.Tensor, world_size: int) -> torch.Tensor:
    """``order`` wrapped around to a multiple of ``world_size`` (DistributedSampler's padding)."""
    n = order.numel()
    total = -(-n // world_size) * world_size
    if total > n:
        reps = -(-(total - n) // n)
        order = torch.cat([order] + [order] * reps)[:total]
    return order


def global_batches(order: torch.Tensor, batch_size: int, world_size: int
                   ) -> list[torch.Tensor]:
    """``order`` (padded to a multiple of ``world_size``) cut into global batches of
    ``batch_size`` (the last one shorter, still a multiple of ``world_size``)."""
    if batch_size % world_size:
        raise ValueError(f"data.batch_size={batch_size} is the global batch and must be a "
                         f"multiple of the number of processes ({world_size})")
    order = pad_to_multiple(order, world_size)
    return list(order.split(batch_size))


class BatchIterator:
    """Batches of a :class:`Split` in memory, optionally shuffled and augmented.

    One ``iter()`` is one epoch (of this rank's shard). The shuffle order comes
    from a generator seeded with ``seed`` (the same on every rank).
    ``channels_last`` lays ``x`` out NHWC (faster convolutions on CPUs).
    ``state_dict()`` holds the generators' states: saved after an epoch and
    loaded into a fresh iterator, the next epoch is the one an uninterrupted run
    would have seen.

    Two ways to shard over ``world_size`` ranks:

    - ``shard="batch"`` (training): ``batch_size`` is the global batch; the
      epoch's order, wrap-padded to a multiple of ``world_size``, is cut into
      global batches and rank ``r`` takes the r-th contiguous 1/W slice of each
      (``Batch.row0`` says where it starts). Augmentation is drawn for the whole
      global batch from a generator seeded alike on every rank and sliced, so
      a sample's crop does not depend on the number of ranks.
    - ``shard="sample"``: DistributedSampler's sharding of the samples (rank r
      takes every W-th) in batches of ``batch_size`` per rank; ``pad=False``
      leaves the shards unequal and duplicate-free (evaluation, whose sums are
      all-reduced); augmentation from a per-rank generator.
    """

    def __init__(self, split: Split, batch_size: int, *, mean: Sequence[float],
                 std: Sequence[float], shuffle: bool = False, augment: bool = False,
                 crop_padding: int = 0, hflip: bool = False, drop_last: bool = False,
                 seed: int = 0, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu", channels_last: bool = False,
                 shard: str = "sample", pad: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if shard not in ("sample", "batch"):
            raise ValueError(f"shard must be 'sample' or 'batch', got {shard!r}")
        if shard == "batch" and (drop_last or not pad):
            raise ValueError("shard='batch' pads and keeps the last batch")
        if shard == "batch" and batch_size % world_size:
            raise ValueError(f"data.batch_size={batch_size} is the global batch and must be "
                             f"a multiple of the number of processes ({world_size})")
        self.split, self.batch_size = split, batch_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.shuffle, self.augment = shuffle, augment
        self.crop_padding, self.hflip = crop_padding, hflip
        self.drop_last, self.shard, self.pad = drop_last, shard, pad
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.order_gen = torch.Generator().manual_seed(seed)
        aug_rank = 0 if shard == "batch" else rank
        self.aug_gen = torch.Generator().manual_seed(seed * 1000003 + 7919 * (aug_rank + 1))

    def _num_local(self) -> int:
        n = len(self.split)
        if self.world_size == 1:
            return n
        if not self.pad:
            return len(range(self.rank, n, self.world_size))
        return -(-n // self.world_size)

    def __len__(self) -> int:
        if self.shard == "batch":
            return -(-(self._num_local() * self.world_size) // self.batch_size)
        n = self._num_local()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _plan(self, order: torch.Tensor) -> list[tuple[torch.Tensor, int, int]]:
        """(local positions, row0, global batch size) per batch of the epoch."""
        if self.shard == "batch":
            out = []
            for g in global_batches(order, self.batch_size, self.world_size):
                m = g.numel() // self.world_size
                out.append((g[self.rank * m:(self.rank + 1) * m], self.rank * m, g.numel()))
            return out
        order = shard_indices(order, self.rank, self.world_size, pad=self.pad)
        return [(order[i * self.batch_size:(i + 1) * self.batch_size], 0, 0)
                for i in range(len(self))]

    def __iter__(self) -> Iterator[Batch]:
        n = len(self.split)
        order = torch.randperm(n, generator=self.order_gen) if self.shuffle \
            else torch.arange(n)
        for pos, row0, n_global in self._plan(order):
            images = self.split.images[pos]
            if self.augment:
                if self.shard == "batch":  # draws for the global batch, this rank's slice
                    off, flips = draw_crop_flip(n_global, self.crop_padding, self.hflip,
                                                self.aug_gen)
                    sl = slice(row0, row0 + pos.numel())
                    images = apply_crop_flip(images, self.crop_padding,
                                             None if off is None else off[sl],
                                             None if flips is None else flips[sl])
                else:
                    images = random_crop_flip(images, self.crop_padding, self.hflip,
                                              self.aug_gen)
            non_blocking = self.device.type == "cuda"
            x = normalize(images.to(self.device, non_blocking=non_blocking),
                          self.mean, self.std).contiguous(memory_format=self.memory_format)
            yield Batch(x, self.split.labels[pos].to(self.device, non_blocking=non_blocking),
                        pos, row0)

    def state_dict(self) -> dict:
        return {"order_gen": self.order_gen.get_state(),
                "aug_gen": self.aug_gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.order_gen.set_state(state["order_gen"])
        self.aug_gen.set_state(state["aug_gen"])


# --------------------------------------------------------------- ImageFolder
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


def make_batches(split: "Split | FolderSplit", batch_size: int, *, num_workers: int = 0,
                 **kw) -> BatchIterator:
    """A :class:`BatchIterator` for an in-memory split, a
    :class:`FolderBatchIterator` for an ImageFolder split (same arguments)."""
    if isinstance(split, FolderSplit):
        return FolderBatchIterator(split, batch_size, num_workers=num_workers, **kw)
    return BatchIterator(split, batch_size, **kw)


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
        from .config import ConfigError
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


class ShardedSampler(torch.utils.data.Sampler[int]):
    """Indices of one epoch for a DataLoader: shuffled by an owned generator and
    sharded like DistributedSampler; ``state_dict()`` for exact resume."""

    def __init__(self, n: int, *, shuffle: bool, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        self.n, self.shuffle, self.rank, self.world_size = n, shuffle, rank, world_size
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return -(-self.n // self.world_size)

    def __iter__(self):
        order = torch.randperm(self.n, generator=self.gen) if self.shuffle \
            else torch.arange(self.n)
        return iter(shard_indices(order, self.rank, self.world_size).tolist())

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["gen"])


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


# ------------------------------------------------------------------- entry
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
