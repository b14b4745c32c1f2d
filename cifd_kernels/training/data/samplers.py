# SPDX-License-Identifier: Apache-2.0
"""The order of an epoch's samples over ranks: ``torch.utils.data.DistributedSampler``'s
sharding (pad by wrapping around to a multiple of ``world_size``, rank ``r``
takes every ``world_size``-th index starting at ``r``), global batches, and a
resumable sampler for DataLoaders."""
from __future__ import annotations

import torch


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
