"""Real devices on the Lightning side: ``model.device`` (chip on for evaluation, ideal for calibration and training),
noise-aware PTQ steps seeded by their position (exact resume), and the two callbacks' argument checks."""

from __future__ import annotations

import pytest
import torch

from cimq_pl.callbacks import MonteCarloDevices, NoiseAwareTraining
from cimq_pl.callbacks.monte_carlo import time_label
from cimq_pl.errors import ConfigError
from cimq_pl.module import CIMQModule
from cimq_pl.objectives import BlockReconstruction
from cimq_pl.quant import CIMSpec, DeviceSpec, calibrate_, cim_layers
from cimq_pl.quant.layers import _CIMLayerBase
from cimq_pl.quant.reconstruction import find_blocks
from cimq_pl.trainer import device_record

DEVICE = DeviceSpec(programming_sigma=0.1, stuck_on_prob=0.01, adc_offset_lsb=0.5)


@pytest.fixture(scope="module")
def calibrated():
    torch.manual_seed(0)
    module = CIMQModule(cim=CIMSpec(), device=DEVICE)
    images = torch.randn(16, 3, 32, 32)
    calibrate_(module.model, [images])
    return module, images


def _modes(module) -> set:
    return {layer.device_model.mode for _, layer in cim_layers(module.model)}


def test_the_chip_is_on_for_evaluation_only(calibrated):
    module, images = calibrated
    assert _modes(module) == {"ideal"}  # calibration and training see ideal cells
    with torch.no_grad():
        ideal = module(images[:2])
        module.on_test_start()
        assert _modes(module) == {"chip"}
        chip = module(images[:2])
        module.on_test_end()
        assert _modes(module) == {"ideal"} and torch.equal(module(images[:2]), ideal)
    assert not torch.equal(chip, ideal)


def _ptq_losses(module, images, steps: list[int]) -> list[float]:
    """Reconstruction losses of unit 2 (of 8 steps) at ``steps``, from a fresh objective (as after a resume)."""
    blocks = find_blocks(module.model, lambda m: isinstance(m, _CIMLayerBase))
    objective = BlockReconstruction(iters_per_block=8, batch_size=4)
    objective.attach(blocks, seed=0)
    objective.start_unit(2)
    objective.cache_block_io(module.model, images)
    module.objective = objective
    with pytest.warns(UserWarning, match="self.log"):  # no trainer: the objective's logging is skipped
        return [float(module.training_step(None, 2 * 8 + step).detach()) for step in steps]  # the epoch's batch index


def test_noise_aware_ptq_steps_draw_their_chip_from_the_step_seed(calibrated):
    """A resumed fit starts at step k with a fresh objective: it must draw the chip the uninterrupted run drew."""
    module, images = calibrated
    module.noise_aware = True
    try:
        uninterrupted = _ptq_losses(module, images, [0, 1, 2])
        resumed = _ptq_losses(module, images, [2])
    finally:
        module.noise_aware = False
    assert resumed == uninterrupted[2:]
    assert uninterrupted[0] != uninterrupted[1]  # another step, another chip (and other samples)
    assert _ptq_losses(module, images, [2]) != resumed  # without noise: another loss
    assert _modes(module) == {"ideal"}


def test_callbacks_need_a_device(calibrated):
    without = CIMQModule(cim=CIMSpec())
    for callback in (NoiseAwareTraining(), MonteCarloDevices(samples=2)):
        with pytest.raises(ConfigError, match=r"needs the device .*: set model.device"):
            callback.setup(None, without, "fit")
    module, _ = calibrated
    NoiseAwareTraining().setup(None, module, "fit")
    assert module.noise_aware
    NoiseAwareTraining().teardown(None, module, "fit")
    assert not module.noise_aware
    with pytest.raises(ConfigError, match=r"model.device needs the network on a CIM macro"):
        CIMQModule(device=DEVICE)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(samples=0), "samples=0"),
    (dict(times=[]), "times=[]"),
    (dict(times=[1, -3600]), "-3600 is not a time"),
    (dict(seed=-1), "seed=-1"),
    (dict(output_dir=""), "output_dir=''"),
    (dict(calibration_images=-1), "calibration_images=-1"),
    (dict(calibration_images=True), "calibration_images=True"),
])
def test_monte_carlo_arguments_are_checked(kwargs, needle):
    with pytest.raises(ConfigError, match="expected|is not a time") as error:
        MonteCarloDevices(**kwargs)
    assert needle in str(error.value)


def test_time_labels_and_the_export_device_record(calibrated):
    assert [time_label(t) for t in (0, 1, 90, 3600, 86400, 31536000, 0.5)] == ["0s", "1s", "90s", "1h", "1d", "1y",
                                                                              "0.5s"]
    module, _ = calibrated
    assert device_record(module) == {"spec": DEVICE.as_dict(), "noise_aware_training": False}
    trained = DEVICE.replace(programming_sigma=0.05).as_dict()
    module.checkpoint_record = {"device": trained, "noise_aware": True}
    try:
        assert device_record(module) == {"spec": trained, "noise_aware_training": True}
    finally:
        module.checkpoint_record = None
    assert device_record(CIMQModule(cim=CIMSpec())) is None


def test_qat_starts_from_a_ptq_checkpoint(calibrated, tmp_path):
    """`QuantizationAwareTraining(init_from=...)` reads a Lightning checkpoint of this module (noise-aware QAT
    starts from the noise-aware PTQ): every weight and quantizer tensor arrives, AdaRound decisions baked in."""
    from cimq_pl.callbacks.qat import load_ptq_checkpoint_

    from cimq_pl.quant.techniques import reconfigure_

    module, images = calibrated
    path = tmp_path / "ptq.ckpt"
    torch.save({"state_dict": module.state_dict(), "pytorch-lightning_version": "2.6.6"}, path)
    fresh = CIMQModule(cim=CIMSpec(), device=DEVICE)
    load_ptq_checkpoint_(fresh, str(path))
    adaround = CIMQModule(cim=CIMSpec())  # with AdaRound logits: every layer's decisions are baked, the fc's too
    calibrate_(adaround.model, [images])
    reconfigure_(adaround.model, weight_rounding="adaround")
    for _, layer in cim_layers(adaround.model):
        layer.weight_quantizer.rounding_logits.data.fill_(5.0)  # round every weight up
    with torch.no_grad():
        rounded_up = adaround(images[:2])
    torch.save({"state_dict": adaround.state_dict(), "pytorch-lightning_version": "2.6.6"}, path)
    plain = CIMQModule(cim=CIMSpec())
    calibrate_(plain.model, [images])
    load_ptq_checkpoint_(plain, str(path))
    with torch.no_grad():
        assert torch.allclose(plain(images[:2]), rounded_up, rtol=1e-5, atol=1e-5)
    loaded = fresh.state_dict()
    for key, value in module.state_dict().items():  # tensors, and the quantizers' extra state (initialized, ...)
        assert torch.equal(value, loaded[key]) if isinstance(value, torch.Tensor) else value == loaded[key], key
    with torch.no_grad():
        assert torch.equal(fresh(images[:2]), module(images[:2]))
