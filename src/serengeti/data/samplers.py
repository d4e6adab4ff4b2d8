"""Training samplers whose order depends only on (seed, epoch), so resumed runs see the same batches."""
from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Sampler


class ResumableSampler:
    """Mixin for training samplers: ``skip_next(n)`` drops the first ``n`` indices of the next epoch
    this rank iterates, so a run resumed mid-epoch continues with the batch it would have seen next
    (:mod:`serengeti.training.callbacks.exact_resume`)."""

    _skip = 0

    def skip_next(self, n: int) -> None:
        self._skip = int(n)

    def _resumed(self, indices: Sequence[int]) -> Iterator[int]:
        skip, self._skip = self._skip, 0
        return iter(indices[skip:])


def loader_samplers(loaders: Any) -> list:
    """The samplers of a loader or a list of loaders: each loader's ``sampler`` and its batch sampler's
    ``sampler``, each once (training loops look there for ``set_epoch`` and ``skip_next``)."""
    found = []
    for loader in loaders if isinstance(loaders, (list, tuple)) else [loaders]:
        for sampler in (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
            if sampler is not None and sampler not in found:
                found.append(sampler)
    return found


def seeded_loader(*args, **kwargs) -> DataLoader:
    """A ``DataLoader`` with its own generator: making its iterator (each epoch, each validation)
    then draws nothing from the global torch RNG, whose stream dropout uses and a resumed run
    restores (:mod:`serengeti.training.callbacks.exact_resume`)."""
    kwargs.setdefault("generator", torch.Generator().manual_seed(0))
    return DataLoader(*args, **kwargs)


class EpochShuffleSampler(ResumableSampler, Sampler[int]):
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
        return self._resumed(perm[:usable][self.rank::self.world_size].tolist())
