"""Callback: partial-sum (ADC) quantization with a reparametrized clipping function (SPEC 4.3)."""

from __future__ import annotations

from typing import Literal

from cimq_pl.callbacks.technique import TechniqueCallback
from cimq_pl.quant.techniques import PartialSumClippingConfig

__all__ = ["PartialSumClipping"]


class PartialSumClipping(TechniqueCallback):
    """Learned ADC clipping alpha = alpha0 x exp(theta), per array or per layer.

    The ADC resolution is the macro's (``model.cim.adc_bits``).

    Args:
        granularity: ``array`` (default) or ``layer``.
        init: alpha0 from calibration partial sums: ``mse`` (default), ``percentile`` or ``minmax``.
        learnable: learn theta during PTQ/QAT (False keeps the calibrated range).

    Raises:
        ConfigError: on an unknown granularity or init.
    """

    def __init__(
        self,
        granularity: Literal["layer", "array"] = "array",
        init: Literal["minmax", "percentile", "mse"] = "mse",
        learnable: bool = True,
    ):
        self.config = PartialSumClippingConfig(granularity, init, learnable)
