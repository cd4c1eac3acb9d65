"""Callback: GPTQ weight rounding at calibration (``QuantizerOptions.weight_rounding="gptq"``)."""

from cimq_pl.callbacks.technique import TechniqueCallback
from cimq_pl.quant.techniques import GPTQRoundingConfig

__all__ = ["GPTQRounding"]


class GPTQRounding(TechniqueCallback, config=GPTQRoundingConfig):
    """Round the weights with GPTQ, computed from each layer's quantized calibration inputs when PTQ or QAT
    calibrates (one extra forward pass; its wall time is logged).

    For PTQ with learned rounding, start AdaRound from GPTQ instead: ``BlockReconstruction(rounding_init: gptq)``
    (this callback with ``adaround: true`` is refused: AdaRound would replace its rounding).
    """
