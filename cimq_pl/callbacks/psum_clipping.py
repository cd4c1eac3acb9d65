"""Callback: partial-sum (ADC) quantization with a reparametrized clipping function (SPEC 4.3)."""

from cimq_pl.callbacks.technique import TechniqueCallback
from cimq_pl.quant.techniques import PartialSumClippingConfig

__all__ = ["PartialSumClipping"]


class PartialSumClipping(TechniqueCallback, config=PartialSumClippingConfig,
                         renamed={"init": "observer", "learnable": "learn_clip"}):
    """Learned ADC clipping alpha = alpha0 x exp(theta), per array, per layer or per column (bitline).

    The ADC resolution is the macro's (``model.cim.adc_bits``). ``init`` and ``learnable`` are the old names
    of ``observer`` and ``learn_clip`` (accepted with a deprecation line).
    """
