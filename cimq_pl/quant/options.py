"""`QuantizerOptions`: how the quantizers of a CIM layer are built (granularity, rounding, observers)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union

from cimq_pl.errors import ConfigError
from cimq_pl.quant.observers import OBSERVER_METHODS
from cimq_pl.quant.psum import PSUM_ASYMMETRIC, PSUM_GRANULARITIES, PSUM_OBSERVERS, is_psum_asymmetric_choice
from cimq_pl.quant.weight import ROUNDINGS, WEIGHT_GRANULARITIES

Observer = Literal["minmax", "percentile", "mse"]
PsumObserver = Literal["minmax", "percentile", "mse", "auto"]


@dataclass(frozen=True)
class QuantizerOptions:
    """Quantizer choices shared by every converted layer (plain fields, buildable by jsonargparse).

    Attributes:
        weight_granularity: ``"layer"``, ``"channel"``, ``"array"`` (one scale per crossbar tile, SPEC 4.2) or
            ``"array_channel"``.
        weight_rounding: ``"nearest"``, ``"adaround"`` (learned by PTQ) or ``"gptq"`` (round-to-nearest of the
            weights GPTQ compensated at calibration, `cimq_pl.quant.gptq`; the `GPTQRounding` callback sets it).
        weight_observer: step initialisation of weights.
        input_observer: step initialisation of input activations.
        input_signed: input codes signed (True), unsigned (False) or decided from calibration data (None).
        input_max_ones: bit-sparse code set, at most this many 1 bits per input code (None: all codes).
        input_sparsity_weight: lambda of the bit-sparsity regularizer on the input codes (0: none).
        input_keep_prob: QDrop keep probability of the input codes while training (None: no dropping).
        input_step_scale: factor on the input step the observer initialises (calibration); above 1 the codes are
            smaller, so they hold fewer 1 bits (a density lever, issue 15); 1 = the observer's step.
        psum_granularity: ADC clip per ``"array"``, per ``"layer"`` or per ``"column"`` (every bitline's ADC its own
            range).
        psum_observer: alpha0 initialisation of the ADC clip (``"minmax"`` is the conventional baseline; ``"auto"``:
            min-max for ADCs of `AUTO_MINMAX_ADC_BITS` bits and more, MSE below).
        psum_learn_clip: whether theta (alpha = alpha0 * exp(theta)) is a trainable parameter.
        psum_asymmetric: every ADC range with a learned offset (`PsumQuantizer`'s ``asymmetric``; ``"auto"``: for ADCs
            of at most `AUTO_ASYMMETRIC_MAX_ADC_BITS` bits).
        psum_keep_prob: QDrop keep probability of the ADC codes while training (None: no dropping).
        percentile: percentile used by ``"percentile"`` observers.

    Each field is one setting of one quantizer (the role is its prefix): a layer builds its quantizers from its
    options, and `CIMLayer.set_options` is the one way to change them (`SETTINGS` of a quantizer class change in
    place, any other field rebuilds that quantizer and carries its calibration over where it still fits).

    Raises:
        ValueError: on an unknown choice; the message lists the allowed values.
    """

    weight_granularity: Literal["layer", "channel", "array", "array_channel"] = "array"
    weight_rounding: Literal["nearest", "adaround", "gptq"] = "nearest"
    weight_observer: Observer = "mse"
    input_observer: Observer = "mse"
    input_signed: Optional[bool] = None
    input_max_ones: Optional[int] = None
    input_sparsity_weight: float = 0.0
    input_keep_prob: Optional[float] = None
    input_step_scale: float = 1.0
    psum_granularity: Literal["layer", "array", "column"] = "array"
    psum_observer: PsumObserver = "mse"
    psum_learn_clip: bool = True
    psum_asymmetric: Union[bool, Literal["auto"]] = False
    psum_keep_prob: Optional[float] = None
    percentile: float = 99.99

    def __post_init__(self) -> None:
        checks = (
            ("weight_granularity", WEIGHT_GRANULARITIES),
            ("weight_rounding", ROUNDINGS),
            ("weight_observer", OBSERVER_METHODS),
            ("input_observer", OBSERVER_METHODS),
            ("psum_granularity", PSUM_GRANULARITIES),
            ("psum_observer", PSUM_OBSERVERS),
        )
        for name, allowed in checks:
            if getattr(self, name) not in allowed:
                raise ConfigError(f"QuantizerOptions.{name}={getattr(self, name)!r} is invalid: expected one of {list(allowed)}")
        if not is_psum_asymmetric_choice(self.psum_asymmetric):
            raise ConfigError(f"QuantizerOptions.psum_asymmetric={self.psum_asymmetric!r} is invalid: expected one of "
                              f"{list(PSUM_ASYMMETRIC)}")
        if self.input_max_ones is not None and (isinstance(self.input_max_ones, bool) or self.input_max_ones < 1):
            raise ConfigError(f"QuantizerOptions.input_max_ones={self.input_max_ones!r} is invalid: expected an integer >= 1 or None")
        if not self.input_sparsity_weight >= 0:
            raise ConfigError(f"QuantizerOptions.input_sparsity_weight={self.input_sparsity_weight!r} is invalid: expected a number >= 0")
        if isinstance(self.input_step_scale, bool) or not 0 < self.input_step_scale < float("inf"):
            raise ConfigError(f"QuantizerOptions.input_step_scale={self.input_step_scale!r} is invalid: expected a "
                              "finite number > 0 (1 = the observer's step)")
        for name in ("input_keep_prob", "psum_keep_prob"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1:
                raise ConfigError(f"QuantizerOptions.{name}={value!r} is invalid: expected a probability in [0, 1] or None")
        if not 0 < self.percentile <= 100:
            raise ConfigError(f"QuantizerOptions.percentile={self.percentile!r} is invalid: expected a value in (0, 100]")


#: Field names of earlier releases, still read from old checkpoint records (one release).
RENAMED_FIELDS = {"learn_psum_clip": "psum_learn_clip"}


#: Conventional quantization (SPEC 4.3/5 baseline), the one definition: one min-max step per layer for weights,
#: uniform activations with min-max steps, and an ADC whose range is the min-max of the calibration partial sums,
#: per layer, not learned. A converted model starts from it; the cost model's baseline uses it too.
CONVENTIONAL_OPTIONS = QuantizerOptions(
    weight_granularity="layer",
    weight_rounding="nearest",
    weight_observer="minmax",
    input_observer="minmax",
    input_max_ones=None,
    psum_granularity="layer",
    psum_observer="minmax",
    psum_learn_clip=False,
)
