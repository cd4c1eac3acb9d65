"""The reconstruction epoch's shape: units and steps from Lightning's batch index, and one loader per process."""

from __future__ import annotations

import functools
import math
import re

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from cimq_pl.datamodules.with_train_loader import WithTrainLoader
from cimq_pl.objectives import BlockReconstruction, UnitSchedule, UnitSteps
from cimq_pl.objectives.reconstruction import _kind_factor
from conftest import preset_resnet20


def test_units_start_and_end_at_their_batch_indices():
    schedule = UnitSchedule.uniform(units=2, steps_per_unit=3)
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
    assert objective.schedule == UnitSchedule.uniform(4, 3)
    dataset = objective.train_dataloader().dataset
    assert isinstance(dataset, UnitSteps) and len(dataset) == 4 * 3 * 2
    for rank in (0, 1):
        sampler = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=False)
        assert [int(batch) for batch in DataLoader(dataset, sampler=sampler)] == list(range(12))
    objective.attach(objective.blocks)  # one process: all 5 steps
    assert objective.schedule == UnitSchedule.uniform(4, 5) and len(objective.train_dataloader()) == 20


def test_units_of_their_own_step_counts():
    """Units of 2, 4 and 1 steps: batch indices map to (unit, step) as a loop over the units would number them."""
    schedule = UnitSchedule((2, 4, 1))
    expected = [(unit, step) for unit, count in enumerate(schedule.steps) for step in range(count)]
    assert schedule.total == 7 and schedule.describe() == "3 units of 1-4 steps"
    assert [(schedule.unit(b), schedule.step(b)) for b in range(7)] == expected
    assert [b for b in range(7) if schedule.starts_unit(b)] == [0, 2, 6]
    assert [b for b in range(7) if schedule.ends_unit(b)] == [1, 5, 6]
    assert UnitSchedule.uniform(11, 400).describe() == "11 units x 400 steps"


def test_unit_iters_give_matching_units_their_steps_per_process():
    """The last matching glob wins; under DDP each process runs ceil(steps / 2); the cosine and the rounding
    schedule of a unit span its own steps."""
    names = ["conv1", "layer1.0", "layer1.1", "layer2.0", "fc"]
    objective = BlockReconstruction(iters_per_block=5, unit_iters={"layer*": 9, "layer1.1": 3})
    objective.attach([(name, torch.nn.Identity()) for name in names], world_size=2)
    assert objective.schedule.steps == (3, 5, 2, 5, 3)
    assert "layer1.0 9, layer1.1 3, layer2.0 9 steps of their own" in objective.describe()
    objective.current = 1
    assert objective.unit_steps == 5 and objective.rounding_schedule.steps == 5
    assert objective.lr_factor(3 + 5 - 1) == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 5)))  # layer1.0's last
    assert objective.lr_factor(3 + 5) == 1.0  # layer1.1's first


def test_every_batch_runs_at_its_own_units_cosine_rate():
    """The scheduler sets batch b + 1's rate after batch b: the first batch of every unit runs at the full rate
    (not at the previous unit's last, ~0) and step s of a unit at cosine(s / steps)."""
    objective = BlockReconstruction(iters_per_block=3, lr_rounding=1.0, unit_iters={"b": 2})
    objective.attach([(name, torch.nn.Identity()) for name in ("a", "b")])
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([{"params": [param], "lr": 1.0, "name": "rounding"}])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(_kind_factor, objective, "rounding"))
    seen = []
    for _ in range(objective.schedule.total):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    cosine = lambda s, n: 0.5 * (1 + math.cos(math.pi * s / n))  # noqa: E731
    assert seen == pytest.approx([1.0, cosine(1, 3), cosine(2, 3), 1.0, cosine(1, 2)])


def test_unit_learning_rates_scale_their_kinds_in_their_units_only():
    """``lr_step`` halved in layer1's units: the step group's factor there is cosine x 0.5, the other groups' and
    the other units' the cosine; the optimizer's rates follow through the scheduler."""
    objective = BlockReconstruction(iters_per_block=4, lr_step=4e-5, unit_iters={"layer1.*": 8},
                                    unit_learning_rates={"layer1.*": {"lr_step": 2e-5, "lr_clip": 1e-3}})
    objective.attach([(name, torch.nn.Identity()) for name in ("conv1", "layer1.0", "fc")])
    assert "learning rates of their own: layer1.0 lr_step 2e-05, lr_clip 0.001" in objective.describe()
    assert objective.lr_factor(4, "step") == 0.5 and objective.lr_factor(4, "clip") == 1.0  # layer1.0's first
    assert objective.lr_factor(4, "rounding") == 1.0
    assert objective.lr_factor(4 + 4, "step") == pytest.approx(0.25)  # half of layer1.0's 8 steps
    assert objective.lr_factor(4 + 8, "step") == 1.0  # fc's first
    params = {kind: torch.nn.Parameter(torch.zeros(1)) for kind in ("rounding", "step", "clip")}
    optimizer = torch.optim.Adam([{"params": [p], "lr": objective.learning_rates[k], "name": k}
                                  for k, p in params.items()])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, [functools.partial(_kind_factor, objective, g["name"]) for g in optimizer.param_groups])
    for _ in range(4):  # conv1's 4 steps (no gradients: the parameters do not change)
        optimizer.step()
        scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-3, 2e-5, 1e-3])  # layer1.0's first
    assert scheduler.state_dict()["lr_lambdas"] == [{}, {}, {}]  # nothing of the objective in a checkpoint


@pytest.mark.parametrize("rates, message", [
    ({"layer1.*": {"lr_steps": 1e-5}}, "unit_learning_rates['layer1.*']['lr_steps']=1e-05 is invalid: expected "
                                       "lr_rounding, lr_step, lr_clip or lr_offset"),
    ({"layer1.*": {"lr_step": -1.0}}, "unit_learning_rates['layer1.*']['lr_step']=-1.0 is invalid"),
    ({"layer1.*": {"lr_offset": 1e-3}}, "lr_offset is 0, so that kind learns in no unit"),
])
def test_unit_learning_rates_refuse_unknown_kinds_and_bad_rates(rates, message):
    from cimq_pl.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        BlockReconstruction(iters_per_block=4, unit_learning_rates=rates)
    objective = BlockReconstruction(iters_per_block=4, unit_learning_rates={"layer9": {"lr_step": 1e-5}})
    with pytest.raises(ConfigError, match="unit_learning_rates: 'layer9' matches no reconstruction unit"):
        objective.attach([(name, torch.nn.Identity()) for name in ("conv1", "fc")])


@pytest.mark.parametrize("unit_iters, message", [
    ({"layer9.*": 800}, "'layer9.*' matches no reconstruction unit (did you mean 'layer1.0'?); the units are: "
                       "conv1, layer1.0, fc"),
    ({"layer1.0": 0}, "unit_iters['layer1.0']=0 is invalid: expected a unit name or glob mapped to an integer >= 1"),
    ({"layer1.0": 2.5}, "unit_iters['layer1.0']=2.5 is invalid"),
])
def test_unit_iters_refuse_bad_globs_and_counts(unit_iters, message):
    from cimq_pl.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        objective = BlockReconstruction(iters_per_block=4, unit_iters=unit_iters)
        objective.attach([(name, torch.nn.Identity()) for name in ("conv1", "layer1.0", "fc")])
    with pytest.raises(ConfigError, match="iters_per_block=0 reconstructs none"):
        BlockReconstruction(iters_per_block=0, unit_iters={"layer1.0": 4})


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


def test_a_unit_fed_by_the_previous_one_is_cached_from_its_cache_bit_for_bit():
    """Units of a residual stage take their inputs from the previous unit's cache (the finished unit run once)
    instead of from the images through the network: the same (x_fp, y_fp, x_q) bit for bit, so a resumed fit,
    which caches from the images, repeats an uninterrupted one; units after a stem activation or before a
    pooling are cached from the images."""
    from cimq_pl.quant import iter_quantizers
    from cimq_pl.quant.layers import _CIMLayerBase
    from cimq_pl.quant.reconstruction import chained_units, eval_mode, find_blocks

    torch.manual_seed(3)
    images = torch.rand(40, 3, 32, 32)
    model = preset_resnet20(images)
    blocks = find_blocks(model, lambda m: isinstance(m, _CIMLayerBase))
    assert [name for name, _ in blocks][:3] == ["conv1", "layer1.0", "layer1.1"] and blocks[-1][0] == "fc"
    with eval_mode(model):
        assert chained_units(model, blocks, images[:4]) == [False, False] + [True] * 8 + [False]

    incremental, from_images = BlockReconstruction(iters_per_block=2), BlockReconstruction(iters_per_block=2)
    incremental.attach(blocks)
    from_images.attach(blocks)
    for unit in range(4):  # conv1 (from the images), layer1.0 (after the stem's ReLU: from the images), 1.1, 1.2
        for objective in (incremental, from_images):
            objective.start_unit(unit)
        incremental.cache_block_io(model, images, chunk=16)
        from_images._previous = None  # as after a resume
        from_images.cache_block_io(model, images, chunk=16)
        for mine, reference in zip(incremental.cache, from_images.cache):
            assert mine.shape == reference.shape and torch.equal(mine, reference)
        _, block = blocks[unit]
        for *_, quantizer in iter_quantizers(block, ("weight",)):  # "reconstruct" it: other rounding decisions
            if quantizer.rounding_logits is not None:
                quantizer.rounding_logits.data.normal_()
        for objective in (incremental, from_images):
            objective.finish_unit(unit)
    assert incremental._chained == [False, False] + [True] * 8 + [False]
    assert incremental._previous is not None and incremental._previous[0] == 3


def test_unit_keep_prob_holds_while_its_unit_learns():
    """``unit_keep_prob``: layer1's units drop with p = 0.75 (their input and the dropping quantizers inside them)
    while they learn and get QuantDropping's 0.5 back when they finish; other units keep 0.5; the int8 edge
    layers, which do not drop, are left alone."""
    from cimq_pl.quant import cim_layers
    from cimq_pl.quant.layers import _CIMLayerBase
    from cimq_pl.quant.reconstruction import find_blocks

    model = preset_resnet20(torch.rand(8, 3, 32, 32))
    blocks = find_blocks(model, lambda m: isinstance(m, _CIMLayerBase))
    objective = BlockReconstruction(iters_per_block=2, unit_keep_prob={"layer1.*": 0.75, "conv1": 0.9})
    objective.attach(blocks, block_input_keep_prob=0.5)
    assert "QDrop keep probabilities of their own: conv1 0.9, layer1.0 0.75, layer1.1 0.75" in objective.describe()

    def input_keeps(unit: int) -> list:
        return [layer.input_quantizer.keep_prob for _, layer in cim_layers(blocks[unit][1])]

    objective.start_unit(0)  # conv1: an int8 edge layer, nothing drops inside it; its input does
    assert input_keeps(0) == [None] and objective.unit_block_input_keep_prob == 0.9
    objective.finish_unit(0)
    objective.start_unit(2)  # layer1.1
    assert input_keeps(2) == [0.75, 0.75] and input_keeps(1) == input_keeps(4) == [0.5, 0.5]
    assert all(layer.options.input_keep_prob == 0.75 for _, layer in cim_layers(blocks[2][1]))
    assert objective.unit_block_input_keep_prob == 0.75
    objective.finish_unit(2)
    assert input_keeps(2) == [0.5, 0.5]
    objective.start_unit(4)  # layer2.0: QuantDropping's
    assert input_keeps(4) == [0.5, 0.5] and objective.unit_block_input_keep_prob == 0.5
    objective.start_unit(3)  # a unit started without the last one finished (a resume) puts the last one's back
    objective.start_unit(1)
    assert input_keeps(3) == [0.5, 0.5] and input_keeps(1) == [0.75, 0.75]
    objective.attach(blocks, block_input_keep_prob=None)  # the unit input not a QDrop target: not dropped
    objective.start_unit(1)
    assert objective.unit_block_input_keep_prob is None


@pytest.mark.parametrize("keeps, message", [
    ({"layer1.*": 0.0}, "unit_keep_prob['layer1.*']=0.0 is invalid: expected a unit name or glob mapped to a "
                        "probability in (0, 1]"),
    ({"layer1.*": 1.5}, "unit_keep_prob['layer1.*']=1.5 is invalid"),
])
def test_unit_keep_prob_refuses_bad_probabilities_and_globs(keeps, message):
    from cimq_pl.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        BlockReconstruction(iters_per_block=4, unit_keep_prob=keeps)
    objective = BlockReconstruction(iters_per_block=4, unit_keep_prob={"layer9": 0.75})
    with pytest.raises(ConfigError, match=re.escape("unit_keep_prob: 'layer9' matches no reconstruction unit")):
        objective.attach([(name, torch.nn.Identity()) for name in ("conv1", "fc")])
