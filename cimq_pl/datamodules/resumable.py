"""A training order and augmentation that a resumed fit reproduces exactly (QAT and FP fine-tuning).

* `ResumableSampler`: the permutation of an epoch is seeded by ``(seed, epoch)`` (a `DistributedSampler`, so
  Lightning shards it across DDP processes as it is), it can start part-way into an epoch (the batches a
  checkpoint already consumed), and it yields ``(epoch, index)`` keys.
* `SeededAugmentation`: ``dataset[(epoch, index)]`` runs the sample's random transform under RNGs seeded by
  ``(seed, epoch, index)`` (torch and Python's `random`, restored afterwards), so augmentation does not depend
  on worker seeds or on what ran before.
"""

from __future__ import annotations

import random
from typing import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler

from cimq_pl.seeding import derive_seed

__all__ = ["ResumableSampler", "SeededAugmentation"]


class ResumableSampler(DistributedSampler):
    """Shuffled ``(epoch, index)`` keys, ``seed + epoch`` seeded, this process's share, from ``skip`` on.

    Args:
        dataset: the dataset to draw from.
        seed: base seed of the permutations.
    """

    def __init__(self, dataset: Dataset, seed: int):
        distributed = dist.is_available() and dist.is_initialized()
        super().__init__(dataset, num_replicas=dist.get_world_size() if distributed else 1,
                         rank=dist.get_rank() if distributed else 0, shuffle=True, seed=seed)
        self._skip = 0

    def start_at(self, epoch: int, skip: int) -> None:
        """Make the next iteration epoch ``epoch``, leaving out its first ``skip`` keys (a resumed epoch);
        Lightning's ``set_epoch`` moves the epoch on afterwards."""
        self.epoch, self._skip = epoch, skip

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(super().__iter__())
        skip, self._skip = self._skip, 0
        return iter([(self.epoch, index) for index in indices[skip:]])


class SeededAugmentation(Dataset):
    """``dataset[(epoch, index)]`` with the random transforms seeded by ``(seed, epoch, index)``."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        seed = derive_seed(self.seed, epoch, index)
        state = random.getstate()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                random.seed(seed)
                return self.dataset[index]
        finally:
            random.setstate(state)
