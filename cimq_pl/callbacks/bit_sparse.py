"""Callback: bit-level-sparsity-induced activation quantization (SPEC 4.1)."""

from __future__ import annotations

from typing import Literal, Optional

from cimq_pl.callbacks.technique import TechniqueCallback
from cimq_pl.quant.techniques import BitSparseActivationConfig

__all__ = ["BitSparseActivations"]


class BitSparseActivations(TechniqueCallback):
    """Restrict input codes to at most ``max_ones`` 1 bits and add the popcount regularizer.

    The input bit-width is the macro's (``model.cim.input_bits``).

    Args:
        max_ones: most 1 bits per input code k (None: all codes, only the regularizer acts).
        sparsity_weight: lambda of the expected-popcount regularizer added to the PTQ/QAT loss.
        observer: input step initialisation, ``mse`` (default), ``minmax`` or ``percentile``.

    Raises:
        ConfigError: on a bad value (named in the message with what is allowed).
    """

    def __init__(
        self,
        max_ones: Optional[int] = 2,
        sparsity_weight: float = 0.0,
        observer: Literal["minmax", "percentile", "mse"] = "mse",
    ):
        self.config = BitSparseActivationConfig(max_ones, sparsity_weight, observer)
