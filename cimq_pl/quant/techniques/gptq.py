"""GPTQ weight rounding (Frantar et al., ICLR 2023): round-to-nearest of weights compensated along the inverse
input Hessian, computed at calibration from each layer's quantized calibration inputs (`cimq_pl.quant.gptq`).

Not one of the four CIMQ techniques: a rounding to compare with AdaRound (and to start it from, see
`BlockReconstruction(rounding_init="gptq")`). It uses the weight steps of whatever granularity is configured
(`ArraywiseWeightConfig`): one per tile, per tile column, per channel or per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from cimq_pl.errors import ConfigError
from cimq_pl.quant.gptq import DEFAULT_DAMP
from cimq_pl.quant.techniques.base import reconfigure_, register_technique

__all__ = ["GPTQRoundingConfig"]


@register_technique("gptq_rounding")
@dataclass(frozen=True)
class GPTQRoundingConfig:
    """Weight rounding by GPTQ at calibration (``QuantizerOptions.weight_rounding="gptq"``).

    Attributes:
        damp: Hessian dampening, a fraction of the mean of its diagonal added to the diagonal (GPTQ's percdamp,
            0.01).

    Raises:
        ConfigError: a negative or non-finite damp.
    """

    damp: float = DEFAULT_DAMP

    def __post_init__(self) -> None:
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not 0 <= self.damp < float("inf"):
            raise ConfigError(f"damp={self.damp!r} is invalid: expected a number >= 0 (GPTQ's default: {DEFAULT_DAMP})")

    def apply_(self, model: nn.Module) -> None:
        """Make every CIM layer's weights GPTQ-rounded at its next calibration (`calibrate_`)."""
        reconfigure_(model, weight_rounding="gptq")
