"""The CIM simulation asks the host for no tensor value: a ResNet-20 evaluation and a reconstruction unit's forward
and backward (the work CUDA graphs would record) count no host syncs on the eager path (`HostSyncCounter`)."""

from __future__ import annotations

import pytest
import torch

from cimq_pl.models import create_model
from cimq_pl.quant import CIMSpec, QuantizerOptions, calibrate_, cim_layers, convert_to_cim, iter_quantizers
from cimq_pl.quant.fold import fold_batchnorm_
from cimq_pl.quant.host_syncs import HostSyncCounter
from cimq_pl.quant.reconstruction import capture_block_input
from cimq_pl.quant.techniques import (ArraywiseWeightConfig, BitSparseActivationConfig, PartialSumClippingConfig,
                                      QuantDroppingConfig, quantize_)
from conftest import CIFAR10, RESNET20


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
    """A CIM call that does read the host is found and named: the compiled path's evaluation reads each layer's
    largest partial sum (`fused.cycle_pack`) to choose the cycle-pair factor. Its kernels run uncompiled inside the
    counter (Dynamo compiles nothing under a dispatch mode), and compile again after it."""
    from cimq_pl.quant import fused

    saved = fused.COMPILE_KERNELS
    model = _preset_resnet20(images, dropping=False)  # (QDrop on the ADC convolves cycle by cycle)
    fused.set_simulation(model, "compiled")
    with torch.no_grad(), HostSyncCounter() as syncs:
        model(images[:2])
    assert syncs.total > 0 and all(where.startswith("quant/fused.py") for _, where in syncs.calls), syncs.describe()
    assert fused.COMPILE_KERNELS == saved and fused.compiled_simulation_available()


@pytest.fixture(scope="module")
def images():
    from cimq_pl.datamodules import CIFAR10DataModule

    dm = CIFAR10DataModule(root=str(CIFAR10), num_workers=0, calibration_size=32, eval_batch_size=32)
    return next(iter(dm.calibration_dataloader()))[0]


def _preset_resnet20(images: torch.Tensor, dropping: bool = True) -> torch.nn.Module:
    """The pretrained ResNet-20 with the PTQ preset's techniques (AdaRound, bit-sparse inputs, arraywise weights,
    learned ADC clips, QDrop everywhere unless not ``dropping``), calibrated on ``images``, eager path, eval mode."""
    model = create_model("cifar_resnet20", 10, str(RESNET20)).eval()
    fold_batchnorm_(model)
    convert_to_cim(model, CIMSpec(rows=128, cols=128, weight_bits=4, input_bits=4, adc_bits=4),
                   options=QuantizerOptions(weight_rounding="adaround"))
    for config in (BitSparseActivationConfig(max_ones=None, step_scale=2.0), ArraywiseWeightConfig(),
                   PartialSumClippingConfig(), *([QuantDroppingConfig()] if dropping else [])):
        quantize_(model, config)
    calibrate_(model, [images])
    return model.eval()  # the quantizers the techniques added too


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
