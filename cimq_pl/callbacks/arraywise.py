"""Callback: arraywise weight quantization granularity (SPEC 4.2)."""

from cimq_pl.callbacks.technique import TechniqueCallback
from cimq_pl.quant.techniques import ArraywiseWeightConfig

__all__ = ["ArraywiseWeights"]


class ArraywiseWeights(TechniqueCallback, config=ArraywiseWeightConfig):
    """One weight scale per crossbar tile (or another granularity, for ablations).

    The weight bit-width is the macro's (``model.cim.weight_bits``).
    """
