"""Callback: random quantization dropping (QDrop; SPEC 4.4)."""

from __future__ import annotations

from typing import Sequence

from cimq_pl.callbacks.technique import TechniqueCallback
from cimq_pl.quant.techniques import DROP_TARGETS, QuantDroppingConfig

__all__ = ["QuantDropping"]


class QuantDropping(TechniqueCallback):
    """During PTQ reconstruction (and QAT), keep each quantized element with probability ``keep_prob``.

    ``block_input`` dropping is applied by :class:`~cimq_pl.callbacks.PostTrainingQuantization`, which reads
    it from this callback; ``activations`` and ``psums`` dropping act inside the quantizers in training mode.

    Args:
        keep_prob: probability p of keeping the quantized value (QDrop default 0.5).
        targets: any of ``block_input``, ``activations``, ``psums``.

    Raises:
        ConfigError: keep_prob outside (0, 1] or an unknown target.
    """

    def __init__(self, keep_prob: float = 0.5, targets: Sequence[str] = DROP_TARGETS):
        self.config = QuantDroppingConfig(keep_prob, tuple(targets))
