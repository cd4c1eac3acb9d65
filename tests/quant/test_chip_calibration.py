"""Chip calibration (`chip_calibration.py`): the identity on ideal cells, a known per-channel distortion undone by
hand, and a noisy chip brought closer to the ideal network on images it was not calibrated on."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import CIFAR10, RESNET20
from cimq_pl.quant import (ChannelAffine, CIMSpec, DeviceSpec, attach_device_, calibrate_, channel_affine, cim_layers,
                           device_mode, fit_chip_calibration, output_statistics)


@pytest.fixture(scope="module")
def network():
    """The pretrained ResNet-20 on the arrays (W4A4, ADC 4), calibrated on 32 CIFAR-10 train images; two batches of
    16 of them to calibrate chips on, and 16 other train images to check on."""
    from cimq_pl.callbacks.calibration import calibration_images
    from cimq_pl.datamodules import CIFAR10DataModule
    from cimq_pl.module import CIMQModule

    images = calibration_images(CIFAR10DataModule(root=str(CIFAR10), num_workers=0, calibration_size=48),
                                torch.device("cpu"))
    model = CIMQModule(pretrained=str(RESNET20), cim=CIMSpec()).model.eval()
    torch.manual_seed(0)
    calibrate_(model, [images[:32]])
    return model, [images[:16], images[16:32]], images[32:]


def test_statistics_are_the_per_channel_mean_and_population_std(network):
    model, batches, _ = network
    name, layer = cim_layers(model)[3]
    outputs = []
    handle = layer.register_forward_hook(lambda _m, _i, out: outputs.append(out.detach().clone()))  # before relu_
    with torch.no_grad():
        for images in batches:
            model(images)
    handle.remove()
    flat = torch.cat(outputs).transpose(0, 1).reshape(outputs[0].shape[1], -1).double()
    stats = output_statistics(model, batches, [name])[name]
    assert torch.allclose(stats.mean.double(), flat.mean(1), atol=1e-5)
    assert torch.allclose(stats.std.double(), flat.std(1, unbiased=False), atol=1e-5)


def test_ideal_cells_get_the_identity_and_the_same_logits(network):
    model, batches, held_out = network
    target = output_statistics(model, batches)
    corrections = fit_chip_calibration(model, batches, target)
    assert set(corrections) == {name for name, _ in cim_layers(model)}
    for correction in corrections.values():
        assert torch.equal(correction.gain, torch.ones_like(correction.gain))
        assert torch.equal(correction.offset, torch.zeros_like(correction.offset))
    with torch.no_grad(), channel_affine(model, corrections):
        calibrated = model(held_out)
    with torch.no_grad():
        assert torch.equal(calibrated, model(held_out))


def test_a_known_channel_distortion_is_undone(network):
    """A 'chip' whose layer 5 output is a_c y + b_c: the fit returns 1/a_c and -b_c/a_c there, ~identity elsewhere."""
    model, batches, held_out = network
    target = output_statistics(model, batches)
    name, layer = cim_layers(model)[5]
    channels = layer.weight.shape[0]
    a = torch.linspace(0.5, 2.0, channels)
    b = torch.linspace(-1.0, 1.0, channels)
    handle = layer.register_forward_hook(lambda _m, _i, out: out * a.view(1, -1, 1, 1) + b.view(1, -1, 1, 1))
    try:
        corrections = fit_chip_calibration(model, batches, target)
        live = target[name].std > 0  # a channel constant on these images keeps gain 1 and gets its offset back
        assert int(live.sum()) > channels // 2
        assert torch.allclose(corrections[name].gain[live], 1 / a[live], rtol=1e-4)
        assert torch.allclose(corrections[name].offset[live], -b[live] / a[live], atol=1e-4)
        assert torch.equal(corrections[name].gain[~live], torch.ones(int((~live).sum())))
        for other, correction in corrections.items():
            if other != name:
                assert torch.allclose(correction.gain, torch.ones_like(correction.gain), atol=1e-4)
        with torch.no_grad(), channel_affine(model, corrections):
            calibrated = model(held_out)
    finally:
        handle.remove()
    with torch.no_grad():
        assert torch.allclose(calibrated, model(held_out), atol=1e-3)


def test_a_noisy_chip_is_brought_closer_to_the_ideal_network_on_other_images(network):
    model, batches, held_out = network
    chip = copy.deepcopy(model)
    attach_device_(chip, DeviceSpec(programming_sigma=0.1, stuck_on_prob=0.005, stuck_off_prob=0.005, seed=4))
    with torch.no_grad():
        ideal = model(held_out)
        with device_mode(chip, "ideal"):
            target = output_statistics(chip, batches)
        raw = chip(held_out)
        corrections = fit_chip_calibration(chip, batches, target)
        with channel_affine(chip, corrections):
            calibrated = chip(held_out)
    raw_error, calibrated_error = (raw - ideal).pow(2).mean(), (calibrated - ideal).pow(2).mean()
    assert calibrated_error < 0.5 * raw_error  # the chip's channel shifts are the bulk of its error


def test_bad_names_are_refused(network):
    model, batches, _ = network
    with pytest.raises(ValueError, match="not CIM layers"):
        with channel_affine(model, {"nope": ChannelAffine(torch.ones(1), torch.zeros(1))}):
            pass
    with pytest.raises(ValueError, match="no CIM layer"):
        output_statistics(model, batches, ["nope"])
    with pytest.raises(ValueError, match="no target statistics"):
        fit_chip_calibration(model, batches, {})
