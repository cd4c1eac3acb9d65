"""Callback: bit-level-sparsity-induced activation quantization (SPEC 4.1)."""

from cimq_pl.callbacks.technique import TechniqueCallback
from cimq_pl.quant.techniques import BitSparseActivationConfig

__all__ = ["BitSparseActivations"]


class BitSparseActivations(TechniqueCallback, config=BitSparseActivationConfig):
    """Restrict input codes to at most ``max_ones`` 1 bits and add the popcount regularizer.

    The input bit-width is the macro's (``model.cim.input_bits``).
    """
