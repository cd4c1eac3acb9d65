"""Callback: arraywise weight quantization granularity (SPEC 4.2)."""

from __future__ import annotations

from typing import Literal

from cimq_pl.callbacks.technique import TechniqueCallback
from cimq_pl.quant.techniques import ArraywiseWeightConfig

__all__ = ["ArraywiseWeights"]


class ArraywiseWeights(TechniqueCallback):
    """One weight scale per crossbar tile (or another granularity, for ablations).

    The weight bit-width is the macro's (``model.cim.weight_bits``).

    Args:
        granularity: ``array`` (CIMQ), ``array_channel``, ``channel`` or ``layer``.
        observer: step initialisation, ``mse`` (default), ``minmax`` or ``percentile``.

    Raises:
        ConfigError: on an unknown granularity or observer.
    """

    def __init__(
        self,
        granularity: Literal["layer", "channel", "array", "array_channel"] = "array",
        observer: Literal["minmax", "percentile", "mse"] = "mse",
    ):
        self.config = ArraywiseWeightConfig(granularity, observer)
