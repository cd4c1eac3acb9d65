"""A whole pretrained ResNet-20 on the CIM macro: exact with quantizers off, near FP at W8A8 / 8-bit ADC."""

from __future__ import annotations

import pytest
import torch

from cimq_pl.datamodules import CIFAR10DataModule
from cimq_pl.module import CIMQModule
from cimq_pl.quant import CIMSpec, calibrate_, cim_layers, set_quantizers_enabled
from cimq_pl.quant.reconstruction import eval_mode
from conftest import CIFAR10, RESNET20


@pytest.fixture(scope="module")
def data():
    dm = CIFAR10DataModule(root=str(CIFAR10), num_workers=0, eval_batch_size=500, calibration_size=256)
    test = [(x, y) for x, y in dm.test_dataloader()]
    calibration = [x for x, _ in dm.calibration_dataloader()]
    return test, calibration


@torch.no_grad()
def _accuracy(model, test) -> float:
    with eval_mode(model):
        correct = sum((model(x).argmax(1) == y).sum().item() for x, y in test)
    return correct / sum(len(y) for _, y in test)


def test_quantizers_off_is_the_float_network(data):
    test, _ = data
    module = CIMQModule("cifar_resnet20", 10, str(RESNET20), cim=CIMSpec(rows=64, cols=64))
    assert len(cim_layers(module.model)) == 20  # 19 convs + classifier, batch norms folded
    set_quantizers_enabled(module.model, False)
    assert _accuracy(module.model, test) == pytest.approx(0.915, abs=1e-9)


def test_w8a8_with_8bit_minmax_adc_stays_within_one_point(data):
    """On the first 500 test images (sized for CI), calibrated on 128 train images: within a point of FP there."""
    test, calibration = data
    first_500, first_128 = test[:1], [calibration[0][:128]]
    assert len(first_500[0][1]) == 500 and len(first_128[0]) == 128
    module = CIMQModule("cifar_resnet20", 10, str(RESNET20), cim=CIMSpec(weight_bits=8, input_bits=8, adc_bits=8))
    set_quantizers_enabled(module.model, False)
    float_accuracy = _accuracy(module.model, first_500)
    set_quantizers_enabled(module.model, True)
    with eval_mode(module.model):
        calibrate_(module.model, first_128)
    accuracy = _accuracy(module.model, first_500)
    print(f"\nW8A8, 8-bit ADC: {accuracy:.3f} against FP {float_accuracy:.3f} on 500 test images")
    assert accuracy >= float_accuracy - 0.01
