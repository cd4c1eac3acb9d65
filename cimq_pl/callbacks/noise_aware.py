"""Callback: noise-aware PTQ and QAT, every training step on a freshly drawn chip of ``model.device``.

With it, each PTQ reconstruction step (and each QAT step) runs its forward pass on a new chip: every cell's
programming error, stuck-at fault and drift exponent and every ADC's offset and gain are drawn anew (the
per-conversion read and ADC noise as well), so the learned rounding, step sizes and ADC clips suit the
device's distribution rather than one chip. The draws come from the global random generator right after the
objective seeds it from the step's position (``(data.seed, rank, unit, step)`` for PTQ, ``(data.seed, rank,
epoch, step)`` for QAT), so runs are deterministic and a resumed fit repeats an uninterrupted one exactly.
Calibration and the PTQ block caches stay on ideal cells (a compiler calibrates before the chip exists).
"""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from cimq_pl.callbacks.technique import require_cim
from cimq_pl.errors import ConfigError

__all__ = ["NoiseAwareTraining"]


class NoiseAwareTraining(Callback):
    """Draw a fresh chip of ``model.device`` in every training step (noise-aware PTQ with
    `PostTrainingQuantization`, noise-aware QAT with `QuantizationAwareTraining`).

    Raises:
        ConfigError: at setup, when the model has no CIM macro (``model.cim``) or no device (``model.device``).
    """

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        require_cim(pl_module, type(self).__name__)
        if getattr(pl_module, "device_spec", None) is None:
            raise ConfigError("NoiseAwareTraining needs the device to train for: set model.device, e.g. "
                              "--model.device.programming_sigma 0.05")
        if stage == "fit":
            pl_module.noise_aware = True
            rank_zero_info(f"[cimq] noise-aware training: a fresh chip per step ({pl_module.device_spec.describe()})")

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            pl_module.noise_aware = False
