"""A shuffling sampler whose order depends only on (seed, epoch), so resumed runs see the same batches."""
from __future__ import annotations

import torch
from torch.utils.data import Sampler


class EpochShuffleSampler(Sampler[int]):
    """Random permutation of ``range(n)`` seeded by ``seed + epoch``; Lightning calls ``set_epoch``.

    Under DDP each rank takes every ``world_size``-th index of the same permutation (the tail is
    dropped so ranks see equally many samples).
    """

    def __init__(self, n: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.seed, self.rank, self.world_size = n, seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n // self.world_size

    def __iter__(self):
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        usable = len(self) * self.world_size
        return iter(perm[:usable][self.rank::self.world_size].tolist())
