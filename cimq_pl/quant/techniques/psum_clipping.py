"""Partial-sum quantization with a reparametrized clipping function (SPEC 4.3).

Every partial sum is read by a b_p-bit ADC over [-alpha, alpha] (or [0, alpha]). alpha = alpha0 x exp(theta):
alpha0 from calibration statistics of the partial sums (by default MSE-optimal for narrow ADCs, min-max for wide
ones: `AUTO_MINMAX_ADC_BITS`), theta learned, with the gradient reaching alpha from clipped and unclipped values
alike (APoT's reparameterized clipping function, not PACT's). One alpha per array (default), per layer or per
column (every bitline has its own ADC, so each may have its own range, as in ColumnQuant). The conventional ADC is
min-max, per layer, fixed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

from torch import nn

from cimq_pl.errors import ConfigError
from cimq_pl.quant.psum import (PSUM_ASYMMETRIC, PSUM_GRANULARITIES, PSUM_OBSERVERS, is_psum_asymmetric_choice,
                                resolve_psum_asymmetric, resolve_psum_observer)
from cimq_pl.quant.techniques.base import reconfigure_, register_technique

__all__ = ["PartialSumClippingConfig"]


@register_technique("psum_clipping")
@dataclass(frozen=True)
class PartialSumClippingConfig:
    """ADC clipping range: granularity, initialisation and whether it learns.

    Attributes:
        granularity: ``"column"`` (default: one per bitline, per array and output column, weight slice or
            reference column, as every column has its own ADC; measured best under the full PTQ, issue 15),
            ``"array"`` (CIMQ's: one alpha per array and weight slice) or ``"layer"`` (one per weight slice).
        observer: alpha0 from the calibration partial sums: ``"auto"`` (default: ``"minmax"`` for ADCs of
            `AUTO_MINMAX_ADC_BITS` bits and more, ``"mse"`` below; each layer by its own ADC bits; measured, issue 15),
            ``"mse"``, ``"percentile"`` or ``"minmax"``.
        learn_clip: learn theta during PTQ/QAT (False keeps the calibrated range).
        asymmetric: each range [lo, hi] placed where its partial sums lie, by a learned offset in steps (an ADC with
            a programmable reference start; calibrated by a least-squares grid search, `observers.mse_range`);
            False: signed columns [-alpha - step, alpha], unsigned [0, alpha]; ``"auto"``: for ADCs of at most
            `AUTO_ASYMMETRIC_MAX_ADC_BITS` bits, each layer by its own ADC bits (the CIMQ presets' choice: +4.0
            points at a 2-bit ADC, level at 3; measured, issue 15).

    Raises:
        ConfigError: on an unknown granularity, observer or asymmetric.
    """

    granularity: Literal["layer", "array", "column"] = "column"
    observer: Literal["auto", "minmax", "percentile", "mse"] = "auto"
    learn_clip: bool = True
    asymmetric: Union[bool, Literal["auto"]] = False

    def __post_init__(self) -> None:
        if self.granularity not in PSUM_GRANULARITIES:
            raise ConfigError(f"granularity={self.granularity!r} is invalid: expected one of {list(PSUM_GRANULARITIES)}")
        if self.observer not in PSUM_OBSERVERS:
            raise ConfigError(f"observer={self.observer!r} is invalid: expected one of {list(PSUM_OBSERVERS)}")
        if not is_psum_asymmetric_choice(self.asymmetric):
            raise ConfigError(f"asymmetric={self.asymmetric!r} is invalid: expected one of {list(PSUM_ASYMMETRIC)}")

    def apply_(self, model: nn.Module) -> None:
        """Give every CIM layer's ADC quantizer this granularity, initialisation, range shape (each ``"auto"``
        resolved by the layer's own ADC bits, so the layer records what it uses) and learnability."""
        reconfigure_(model, psum_granularity=self.granularity, psum_learn_clip=self.learn_clip,
                     psum_asymmetric=lambda layer: resolve_psum_asymmetric(self.asymmetric, layer.spec.adc_bits),
                     psum_observer=lambda layer: resolve_psum_observer(self.observer, layer.spec.adc_bits))
