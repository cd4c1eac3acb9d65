"""Lightning callbacks: the four CIMQ techniques (and GPTQ rounding), PTQ and QAT, the hardware report, and real devices
(Monte Carlo evaluation over chips, noise-aware training).

List them under ``trainer.callbacks`` in a config; each owns one concern and attaches at ``setup``.
"""

from cimq_pl.callbacks.arraywise import ArraywiseWeights
from cimq_pl.callbacks.bit_sparse import BitSparseActivations
from cimq_pl.callbacks.dropping import QuantDropping
from cimq_pl.callbacks.gptq import GPTQRounding
from cimq_pl.callbacks.hardware_report import HardwareReport
from cimq_pl.callbacks.monte_carlo import MonteCarloDevices
from cimq_pl.callbacks.noise_aware import NoiseAwareTraining
from cimq_pl.callbacks.psum_clipping import PartialSumClipping
from cimq_pl.callbacks.ptq import PostTrainingQuantization
from cimq_pl.callbacks.qat import QuantizationAwareTraining

__all__ = [
    "ArraywiseWeights",
    "BitSparseActivations",
    "GPTQRounding",
    "HardwareReport",
    "MonteCarloDevices",
    "NoiseAwareTraining",
    "PartialSumClipping",
    "PostTrainingQuantization",
    "QuantDropping",
    "QuantizationAwareTraining",
]
