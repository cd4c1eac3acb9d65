"""Calibration of every quantizer on the datamodule's calibration subset, identical on every process."""

from __future__ import annotations

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from cimq_pl.errors import ConfigError
from cimq_pl.quant import calibrate_, cim_layers
from cimq_pl.quant.reconstruction import eval_mode

__all__ = ["calibrate_module_", "quantizer_state", "load_quantizer_state_"]


def quantizer_state(model: torch.nn.Module) -> dict[str, dict]:
    """State dicts of every quantizer of every CIM layer, keyed ``<layer>.<role>``."""
    return {
        f"{name}.{role}": quantizer.state_dict()
        for name, layer in cim_layers(model)
        for role, quantizer in layer.quantizers().items()
    }


def load_quantizer_state_(model: torch.nn.Module, state: dict[str, dict]) -> None:
    """Load what :func:`quantizer_state` returned (from another process) into ``model``'s quantizers."""
    for name, layer in cim_layers(model):
        for role, quantizer in layer.quantizers().items():
            quantizer.load_state_dict(state[f"{name}.{role}"])


@torch.no_grad()
def calibrate_module_(trainer: Trainer, pl_module: LightningModule) -> int:
    """Initialise every quantizer of ``pl_module.model`` from the calibration subset; returns the image count.

    Every process calibrates on the same full calibration subset (train split, seeded), then takes process
    0's quantizer parameters, so all processes hold bit-identical quantizers whatever the world size.
    """
    datamodule = trainer.datamodule
    if datamodule is None or not hasattr(datamodule, "calibration_dataloader"):
        raise ConfigError("calibration needs a cimq_pl datamodule (data.class_path: cimq_pl.datamodules....)")
    batches = [batch[0].to(pl_module.device) for batch in datamodule.calibration_dataloader()]
    images = sum(len(b) for b in batches)
    rank_zero_info(f"[cimq] calibrating {len(list(cim_layers(pl_module.model)))} CIM layers on {images} train images")
    with eval_mode(pl_module.model):
        calibrate_(pl_module.model, batches)
    state = trainer.strategy.broadcast(quantizer_state(pl_module.model), src=0)
    load_quantizer_state_(pl_module.model, state)
    return images
