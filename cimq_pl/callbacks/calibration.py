"""Calibration of every quantizer on the datamodule's calibration subset, identical on every process."""

from __future__ import annotations

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from cimq_pl import preemption
from cimq_pl.checkpointing import save_checkpoint_atomic
from cimq_pl.errors import ConfigError
from cimq_pl.quant import calibrate_, cim_layers, iter_quantizers
from cimq_pl.quant.reconstruction import eval_mode
from cimq_pl.quant.techniques import GPTQRoundingConfig, applied_technique

__all__ = ["CALIBRATED_CHECKPOINT", "batch_images", "calibrate_module_", "calibration_batches", "calibration_images",
           "load_quantizer_state_", "quantizer_state"]

#: Written into the run's checkpoint folder when a SIGTERM arrives during calibration: resume from it.
CALIBRATED_CHECKPOINT = "calibrated.ckpt"


def quantizer_state(model: torch.nn.Module) -> dict[str, dict]:
    """State dicts of every quantizer of every CIM layer, keyed ``<layer>.<role>``."""
    return {f"{name}.{role}": quantizer.state_dict() for name, role, quantizer in iter_quantizers(model)}


def load_quantizer_state_(model: torch.nn.Module, state: dict[str, dict]) -> None:
    """Load what :func:`quantizer_state` returned (from another process) into ``model``'s quantizers."""
    for name, role, quantizer in iter_quantizers(model):
        quantizer.load_state_dict(state[f"{name}.{role}"])


def batch_images(batch) -> torch.Tensor:
    """The images of a dataloader batch (``(images, labels)`` or images alone)."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def calibration_batches(datamodule, device: torch.device, limit: int | None = None) -> list[torch.Tensor]:
    """The image batches of ``datamodule``'s calibration subset (train split, fixed order), the first ``limit``
    images (all when None), on ``device``."""
    if datamodule is None or not hasattr(datamodule, "calibration_dataloader"):
        raise ConfigError("calibration needs a cimq_pl datamodule (data.class_path: cimq_pl.datamodules....)")
    batches, seen = [], 0
    for batch in datamodule.calibration_dataloader():
        images = batch_images(batch)
        if limit is not None:
            images = images[: limit - seen]
        batches.append(images.to(device))
        seen += len(images)
        if limit is not None and seen >= limit:
            break
    return batches


def calibration_images(datamodule, device: torch.device) -> torch.Tensor:
    """All images of ``datamodule``'s calibration subset, in its fixed order, on ``device``."""
    return torch.cat(calibration_batches(datamodule, device))


@torch.no_grad()
def calibrate_module_(trainer: Trainer, pl_module: LightningModule, images: torch.Tensor, seed: int = 0,
                      batch_size: int = 256) -> None:
    """Initialise every quantizer of ``pl_module.model`` from the calibration ``images``.

    Every process calibrates on the same full calibration subset (train split, seeded) with the random
    generator seeded from ``seed`` (the datamodule's; observers subsample at random), then takes process 0's
    quantizer parameters: all processes hold bit-identical quantizers, equal to a one-process run's. GPTQ
    rounding (`GPTQRounding`, with its ``damp``) happens inside `calibrate_`; its wall time is logged.
    """
    rank_zero_info(f"[cimq] calibrating {len(cim_layers(pl_module.model))} CIM layers on {len(images)} train images")
    device = pl_module.device
    gptq = applied_technique(pl_module.model, GPTQRoundingConfig) or GPTQRoundingConfig()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), eval_mode(pl_module.model):
        torch.manual_seed(seed)
        report = calibrate_(pl_module.model, images.split(batch_size), gptq_damp=gptq.damp)
    if report is not None:
        rank_zero_info(f"[cimq] {report.describe()}")
    state = trainer.strategy.broadcast(quantizer_state(pl_module.model), src=0)
    load_quantizer_state_(pl_module.model, state)
    if trainer.state.fn == "fit" and trainer.strategy.broadcast(preemption.requested(), src=0):
        # SIGTERM while calibrating (before Lightning's own handler is in place): keep the work, then stop
        path = save_checkpoint_atomic(trainer, CALIBRATED_CHECKPOINT)
        rank_zero_info(f"[cimq] SIGTERM during calibration: calibrated quantizers saved to {path}")
        raise preemption.Preempted("calibration", path)
