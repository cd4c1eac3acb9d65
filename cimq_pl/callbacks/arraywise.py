"""Callback: arraywise weight quantization granularity (SPEC 4.2)."""

from cimq_pl.callbacks.technique import TechniqueCallback
from cimq_pl.quant.techniques import ArraywiseWeightConfig

__all__ = ["ArraywiseWeights"]


class ArraywiseWeights(TechniqueCallback, config=ArraywiseWeightConfig):
    """Weight scales that follow the crossbar tiling: one per column of each array (default, ``array_channel``),
    one per tile (``array``, CIMQ's), or another granularity for ablations.

    The weight bit-width is the macro's (``model.cim.weight_bits``).
    """
