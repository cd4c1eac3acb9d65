"""The four CIMQ techniques as model transforms: ``quantize_(model, config)`` (torchao style).

Each technique is a small frozen config dataclass, validated on construction, and an in-place transform
registered for that config type. A converted model starts from :data:`CONVENTIONAL_OPTIONS` (layerwise
min-max weights, uniform min-max activations, fixed min-max ADC); each transform upgrades only its own part,
so they compose in any order. The Lightning callbacks in :mod:`cimq_pl.callbacks` apply them at ``setup``.

| config | technique (SPEC section) |
|---|---|
| `BitSparseActivationConfig` | bit-level-sparsity activation quantization (4.1) |
| `ArraywiseWeightConfig` | arraywise weight quantization granularity (4.2) |
| `PartialSumClippingConfig` | partial-sum quantization with a reparametrized clipping function (4.3) |
| `QuantDroppingConfig` | random quantization dropping (4.4) |
| `GPTQRoundingConfig` | GPTQ weight rounding at calibration (not a CIMQ technique: AdaRound's alternative) |
"""

from cimq_pl.quant.techniques.base import (
    CONVENTIONAL_OPTIONS,
    TECHNIQUES,
    applied_technique,
    list_techniques,
    quantize_,
    reconfigure_,
    register_technique,
)
from cimq_pl.quant.techniques.arraywise import ArraywiseWeightConfig
from cimq_pl.quant.techniques.bit_sparse import BitSparseActivationConfig
from cimq_pl.quant.techniques.psum_clipping import PartialSumClippingConfig
from cimq_pl.quant.techniques.dropping import DROP_TARGETS, QuantDroppingConfig
from cimq_pl.quant.techniques.gptq import GPTQRoundingConfig

__all__ = [
    "CONVENTIONAL_OPTIONS",
    "DROP_TARGETS",
    "TECHNIQUES",
    "applied_technique",
    "ArraywiseWeightConfig",
    "BitSparseActivationConfig",
    "GPTQRoundingConfig",
    "PartialSumClippingConfig",
    "QuantDroppingConfig",
    "list_techniques",
    "quantize_",
    "reconfigure_",
    "register_technique",
]
