"""The reconstruction epoch's shape: units and steps from Lightning's batch index, and one loader per process."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, DistributedSampler

from cimq_pl.datamodules.with_train_loader import WithTrainLoader
from cimq_pl.objectives import BlockReconstruction, UnitSchedule, UnitSteps


def test_units_start_and_end_at_their_batch_indices():
    schedule = UnitSchedule(units=2, steps_per_unit=3)
    batches = range(schedule.total)
    assert schedule.total == 6
    assert [schedule.unit(b) for b in batches] == [0, 0, 0, 1, 1, 1]
    assert [schedule.step(b) for b in batches] == [0, 1, 2, 0, 1, 2]
    assert [b for b in batches if schedule.starts_unit(b)] == [0, 3]
    assert [b for b in batches if schedule.ends_unit(b)] == [2, 5]


def test_every_process_gets_its_own_steps_of_every_unit():
    """Under DDP Lightning shards the loader with a DistributedSampler: each of 2 processes runs ceil(5 / 2) = 3
    steps of each of 4 units, numbered as its own batch indices."""
    objective = BlockReconstruction(iters_per_block=5, batch_size=4)
    objective.attach([(f"unit{i}", torch.nn.Identity()) for i in range(4)], world_size=2)
    assert objective.schedule == UnitSchedule(4, 3)
    dataset = objective.train_dataloader().dataset
    assert isinstance(dataset, UnitSteps) and len(dataset) == 4 * 3 * 2
    for rank in (0, 1):
        sampler = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=False)
        assert [int(batch) for batch in DataLoader(dataset, sampler=sampler)] == list(range(12))
    objective.attach(objective.blocks)  # one process: all 5 steps
    assert objective.schedule == UnitSchedule(4, 5) and len(objective.train_dataloader()) == 20


def test_with_train_loader_delegates_everything_but_the_train_loader():
    from lightning.pytorch import LightningDataModule

    class Data(LightningDataModule):
        seed = 7

        def train_dataloader(self):
            return "images"

        def val_dataloader(self):
            return "validation"

    data = Data()
    wrapped = WithTrainLoader(data, lambda: "steps")
    assert wrapped.train_dataloader() == "steps" and wrapped.val_dataloader() == "validation"
    assert wrapped.seed == 7 and wrapped.hparams is data.hparams
    wrapped.trainer = "trainer"
    assert data.trainer == "trainer"
