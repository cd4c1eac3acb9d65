"""GPTQ rounding end to end: the `GPTQRounding` callback through the CLI (fit, then test of its checkpoint), and
`BlockReconstruction(rounding_init="gptq")` (AdaRound from GPTQ) with a resume that does not run GPTQ again."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint

from cimq_pl.callbacks import ArraywiseWeights, GPTQRounding, PostTrainingQuantization
from cimq_pl.errors import ConfigError
from cimq_pl.module import CIMQModule
from cimq_pl.objectives import BlockReconstruction
from cimq_pl.quant import CIMSpec, cim_layers
from conftest import CIFAR10, RESNET20
from .test_ptq import FAST, _datamodule, _trainer


def _compensations(model) -> dict:
    return {name: layer.weight_quantizer.compensation for name, layer in cim_layers(model)}


def test_cli_gptq_rounding_then_test_with_its_checkpoint(run_cli, caplog):
    caplog.set_level("INFO")
    fit = run_cli("fit", "--config", "configs/resnet20_cifar10.yaml", "--config", "configs/quant/ablation/gptq.yaml",
                  "--data.root", str(CIFAR10), "--model.pretrained", str(RESNET20), *FAST)
    model = fit.model.model
    compensations = _compensations(model)
    assert all(c is not None for c in compensations.values()) and len(compensations) == 20
    assert all(layer.options.weight_rounding == "gptq" for _, layer in cim_layers(model))
    assert not any(torch.equal(c, torch.zeros_like(c)) for c in compensations.values())
    assert "GPTQ rounding of 20 CIM layers in" in caplog.text
    ptq = next(cb for cb in fit.trainer.callbacks if isinstance(cb, PostTrainingQuantization))
    assert fit.trainer.global_step == 0  # calibration only
    fit.trainer.validate(fit.model, datamodule=fit.datamodule)
    val_acc = fit.trainer.callback_metrics["val/acc"].item()
    test = run_cli("test", "--config", "configs/resnet20_cifar10.yaml", "--config", "configs/quant/ablation/gptq.yaml",
                   "--data.root", str(CIFAR10), "--model.pretrained", str(RESNET20), *FAST,
                   "--ckpt_path", str(ptq.checkpoint_path))
    reloaded = _compensations(test.model.model)
    assert all(torch.equal(reloaded[name], compensation) for name, compensation in compensations.items())
    assert test.trainer.callback_metrics["test/acc"].item() == pytest.approx(val_acc, abs=1e-6)
    assert val_acc > 0.25  # W4A4, ADC 4, layerwise min-max steps, 64 calibration images: round-to-nearest gets ~0.34


class StopAfter(Callback):
    """Raises after training step ``step`` has been checkpointed (a crash mid-unit)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("stopped for the test")


def _ptq_fit(tmp_path, ckpt_path=None, stop=None, every=None):
    module = CIMQModule("cifar_resnet20", 10, str(RESNET20), cim=CIMSpec(),
                        objective=BlockReconstruction(iters_per_block=2, batch_size=8, rounding_init="gptq"))
    callbacks = [ArraywiseWeights(granularity="array_channel"), PostTrainingQuantization()]
    if every:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=every, save_top_k=-1))
    if stop:
        callbacks.append(StopAfter(stop))
    trainer = _trainer(tmp_path, callbacks, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=_datamodule(), ckpt_path=ckpt_path)
    return module


def test_adaround_from_gptq_runs_gptq_once_per_unit_also_across_a_resume(tmp_path, monkeypatch):
    from cimq_pl.objectives import reconstruction

    calls = []
    original = reconstruction.gptq_

    def counting(block, *args, **kwargs):
        report = original(block, *args, **kwargs)
        calls.append(report.layers)
        return report

    monkeypatch.setattr(reconstruction, "gptq_", counting)
    whole = _ptq_fit(tmp_path / "whole")
    assert len(calls) == 11 and calls[1] == ("conv1", "conv2")  # one GPTQ per unit: layer1.0 has two convs
    for name, layer in cim_layers(whole.model):
        quantizer = layer.weight_quantizer
        assert quantizer.compensated and quantizer.rounding == "adaround" and quantizer.hard, name

    calls.clear()
    with pytest.raises(RuntimeError, match="stopped for the test"):
        _ptq_fit(tmp_path / "cut", stop=3, every=3)  # unit 1 (layer1.0) has done 1 of its 2 steps
    assert len(calls) == 2
    (checkpoint,) = (tmp_path / "cut" / "ckpt").glob("*.ckpt")
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    calls.clear()
    resumed = _ptq_fit(tmp_path / "resumed", ckpt_path=str(checkpoint))
    assert len(calls) == 9  # units 2..10; unit 1 keeps the compensation and logits of its checkpoint
    key = "model.layer1.0.conv1.weight_quantizer._extra_state"
    assert torch.equal(saved[key]["compensation"], resumed.model.layer1[0].conv1.weight_quantizer.compensation)
    for (name, mine), (_, theirs) in zip(cim_layers(resumed.model), cim_layers(whole.model)):  # exact resume
        assert torch.equal(mine.weight_quantizer.compensation, theirs.weight_quantizer.compensation), name
        assert torch.equal(mine.weight_quantizer.rounding_logits, theirs.weight_quantizer.rounding_logits), name


@pytest.mark.parametrize("objective,message", [
    (BlockReconstruction(iters_per_block=2), r"GPTQRounding callback rounds the weights at calibration, but "
     r"BlockReconstruction \(adaround=True, rounding_init='nearest'\) would learn .*rounding_init: gptq"),
    (BlockReconstruction(iters_per_block=2, adaround=False, rounding_init="gptq"), r"would recompute that rounding"),
])
def test_gptq_rounding_with_a_reconstruction_that_replaces_it_is_refused(tmp_path, objective, message):
    module = CIMQModule("cifar_resnet20", 10, str(RESNET20), cim=CIMSpec(), objective=objective)
    trainer = _trainer(tmp_path, [GPTQRounding(), PostTrainingQuantization()], limit_val_batches=0)
    with pytest.raises(ConfigError, match=message):
        trainer.fit(module, datamodule=_datamodule())


@pytest.mark.parametrize("arguments,message", [
    (dict(rounding_init="optq"), r"rounding_init='optq' is invalid: expected one of \['nearest', 'gptq'\]"),
    (dict(rounding_init="gptq", iters_per_block=0), r"iters_per_block=0 reconstructs none: .*GPTQRounding"),
    (dict(gptq_damp=-1.0), r"gptq_damp=-1.0 is invalid: expected a number >= 0"),
])
def test_bad_rounding_init_values_name_what_is_allowed(arguments, message):
    with pytest.raises(ConfigError, match=message):
        BlockReconstruction(**arguments)
