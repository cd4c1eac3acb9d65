"""The CIM simulation asks the host for no tensor value: a ResNet-20 evaluation and a reconstruction unit's forward
and backward (the work CUDA graphs would record) count no host syncs on the eager path (`HostSyncCounter`)."""

from __future__ import annotations

import pytest
import torch

from cimq_pl.quant import cim_layers, iter_quantizers
from cimq_pl.quant.host_syncs import HostSyncCounter
from cimq_pl.quant.reconstruction import capture_block_input
from conftest import CIFAR10, RESNET20, preset_resnet20


@pytest.fixture(scope="module")
def images():
    from cimq_pl.datamodules import CIFAR10DataModule

    dm = CIFAR10DataModule(root=str(CIFAR10), num_workers=0, calibration_size=32, eval_batch_size=32)
    return next(iter(dm.calibration_dataloader()))[0]


def _preset_resnet20(images: torch.Tensor, dropping: bool = True) -> torch.nn.Module:
    """The pretrained ResNet-20 with the PTQ preset's quantizers (`conftest.preset_resnet20`), in eval mode."""
    return preset_resnet20(images, RESNET20, dropping).eval()


def test_the_counter_names_each_host_read_and_its_caller():
    x = torch.arange(6.0)
    with HostSyncCounter() as syncs:
        float(x.sum())
        x.nonzero()
        bool((x > 2).any())
        x * 2  # no sync
    assert syncs.total == 3  # bool(t) reads the scalar as float(t) does
    assert syncs.calls == {("_local_scalar_dense", "(outside cimq_pl)"): 2, ("nonzero", "(outside cimq_pl)"): 1}


def test_the_counter_finds_the_compiled_paths_cycle_pair_bound(images):
    """A CIM call that does read the host is found and named: the compiled path's evaluation reads each row-block
    part's largest column weight sum (`fused.cycle_pack`) to choose its cycle-pair factor. Its kernels run uncompiled inside the
    counter (Dynamo compiles nothing under a dispatch mode), and compile again after it."""
    from cimq_pl.quant import fused

    saved = fused.COMPILE_KERNELS
    model = _preset_resnet20(images, dropping=False)  # (QDrop on the ADC convolves cycle by cycle)
    fused.set_simulation(model, "compiled")
    with torch.no_grad(), HostSyncCounter() as syncs:
        model(images[:2])
    assert syncs.total > 0 and all(where.startswith("quant/fused.py") for _, where in syncs.calls), syncs.describe()
    assert fused.COMPILE_KERNELS == saved and fused.compiled_simulation_available()


def test_a_resnet20_evaluation_reads_nothing_on_the_host(images):
    model = _preset_resnet20(images)
    assert len(cim_layers(model)) == 20
    with torch.no_grad(), HostSyncCounter() as syncs:
        logits = model(images[:8])
    assert logits.shape == (8, 10)
    assert syncs.total == 0, syncs.describe()


def test_a_reconstruction_units_forward_and_backward_read_nothing_on_the_host(images):
    """The PTQ step's block work, QDrop masks included: what `torch.cuda.make_graphed_callables` would record."""
    model = _preset_resnet20(images)
    block = model.layer2[0]
    learned = []
    for _, role, quantizer in iter_quantizers(block):
        for name, parameter in quantizer.named_parameters(recurse=False):
            if (role, name) in (("weight", "rounding_logits"), ("input", "step"), ("psum", "theta")):
                learned.append(parameter.requires_grad_(True))
    assert len(learned) >= 6
    x = capture_block_input(model, block, images[:8])
    block.train()
    with HostSyncCounter() as syncs:
        loss = block(x).pow(2).mean() + sum(q.rounding_loss(4.0) for *_, q in iter_quantizers(block, ("weight",)))
        loss.backward()
    assert all(parameter.grad is not None for parameter in learned)
    assert syncs.total == 0, syncs.describe()
