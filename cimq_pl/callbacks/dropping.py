"""Callback: random quantization dropping (QDrop; SPEC 4.4)."""

from cimq_pl.callbacks.technique import TechniqueCallback
from cimq_pl.quant.techniques import QuantDroppingConfig

__all__ = ["QuantDropping"]


class QuantDropping(TechniqueCallback, config=QuantDroppingConfig):
    """During PTQ reconstruction (and QAT), keep each quantized element with probability ``keep_prob``.

    ``activations`` and ``psums`` dropping act inside the quantizers in training mode; ``block_input``
    dropping is read from the model by the reconstruction objective (`applied_technique`).
    """
