"""Arraywise weight quantization granularity (SPEC 4.2): one weight scale per crossbar tile.

The scale of tile (r, c) is applied digitally to that array's ADC output before the shift-add across row
blocks, so a tile with small weights keeps fine resolution. ``layer``, ``channel`` and ``array_channel``
are offered for ablations. Scales start from an MSE-optimal clip search per group (refined by PTQ/QAT).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from cimq_pl.errors import ConfigError
from cimq_pl.quant.observers import OBSERVER_METHODS
from cimq_pl.quant.techniques.base import reconfigure_, register_technique
from cimq_pl.quant.weight import WEIGHT_GRANULARITIES

__all__ = ["ArraywiseWeightConfig"]


@register_technique("arraywise_weights")
@dataclass(frozen=True)
class ArraywiseWeightConfig:
    """Weight-scale granularity and initialisation.

    Attributes:
        granularity: ``"array_channel"`` (default: one scale per column of each array, free for the macro since
            every column's digital result is scaled anyway; measured best under the full PTQ, issue 15),
            ``"array"`` (CIMQ's one scale per crossbar tile), ``"channel"`` or ``"layer"``.
        observer: step initialisation, ``"mse"`` (default), ``"minmax"`` or ``"percentile"``.

    Raises:
        ConfigError: on an unknown granularity or observer.
    """

    granularity: Literal["layer", "channel", "array", "array_channel"] = "array_channel"
    observer: Literal["minmax", "percentile", "mse"] = "mse"

    def __post_init__(self) -> None:
        if self.granularity not in WEIGHT_GRANULARITIES:
            raise ConfigError(f"granularity={self.granularity!r} is invalid: expected one of {list(WEIGHT_GRANULARITIES)}")
        if self.observer not in OBSERVER_METHODS:
            raise ConfigError(f"observer={self.observer!r} is invalid: expected one of {list(OBSERVER_METHODS)}")

    def apply_(self, model: nn.Module) -> None:
        """Give every CIM layer's weight quantizer this granularity and observer."""
        reconfigure_(model, weight_granularity=self.granularity, weight_observer=self.observer)
