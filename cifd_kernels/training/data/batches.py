# SPDX-License-Identifier: Apache-2.0
"""Batches of an in-memory split. Order and augmentation draw from
:class:`torch.Generator` objects owned by the iterator, whose state goes into
checkpoints, so that a resumed run sees the very batches an uninterrupted one
would; sharding over ``rank``/``world_size`` (:mod:`.samplers`) serves DDP."""
from __future__ import annotations

from typing import Iterator, NamedTuple, Sequence

import torch

from .augment import apply_crop_flip, draw_crop_flip, normalize, random_crop_flip
from .samplers import global_batches, shard_indices
from .splits import Split


class Batch(NamedTuple):
    """``x``: float32 [B, C, H, W] normalised; ``y``: int64 [B]; ``pos``: int64
    [B], each sample's position in its :class:`Split` (to look up caches);
    ``row0``: the first row of this batch within the global batch it is a
    slice of (0 in one process; see :mod:`cifd_kernels.training.distributed`)."""
    x: torch.Tensor
    y: torch.Tensor
    pos: torch.Tensor
    row0: int = 0


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
