"""Bit-level-sparsity-induced activation quantization (SPEC 4.1).

A bit-serial array spends energy on every 1 bit it drives onto a wordline. Two mechanisms make the input
codes carry fewer 1 bits:

* a *bit-sparse code set*: codes restricted to integers with at most ``max_ones`` one bits (projection to
  the nearest allowed code, straight-through gradient, learned step size);
* a *sparsity regularizer*: ``sparsity_weight x`` a differentiable surrogate of the expected popcount per
  code, added to the reconstruction loss (PTQ) or the task loss (QAT).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from torch import nn

from cimq_pl.errors import ConfigError
from cimq_pl.quant.layers import cim_layers
from cimq_pl.quant.observers import OBSERVER_METHODS
from cimq_pl.quant.techniques.base import reconfigure_, register_technique

__all__ = ["BitSparseActivationConfig"]


@register_technique("bit_sparse_activations")
@dataclass(frozen=True)
class BitSparseActivationConfig:
    """Bit-sparse input codes and the popcount regularizer.

    Attributes:
        max_ones: most 1 bits per input code (k); None or k = input_bits is the plain uniform code set (a layer
            with more input bits on the macro keeps k); k above every layer's input_bits is an error. Layers
            mapped ``int8`` (`CIMSpec.first_layer` / ``last_layer``) are left alone: uniform 8-bit codes.
        sparsity_weight: lambda of the popcount regularizer (0 disables it).
        observer: input step initialisation, ``"mse"`` (default, searched over the allowed codes),
            ``"minmax"`` or ``"percentile"``.
        step_scale: factor on that initial step (1: the observer's; above 1 the codes are smaller and hold fewer
            1 bits: a density lever, issue 15). Applied at calibration; PTQ/QAT then learn the step from there.

    Raises:
        ConfigError: max_ones < 1, a negative sparsity_weight or an unknown observer (max_ones above the
            macro's input_bits: when applied).
    """

    max_ones: Optional[int] = 2
    sparsity_weight: float = 0.0
    observer: Literal["minmax", "percentile", "mse"] = "mse"
    step_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.max_ones is not None and (isinstance(self.max_ones, bool) or not isinstance(self.max_ones, int) or self.max_ones < 1):
            raise ConfigError(f"max_ones={self.max_ones!r} is invalid: expected an integer >= 1 (<= input_bits) or None")
        if not self.sparsity_weight >= 0:
            raise ConfigError(f"sparsity_weight={self.sparsity_weight!r} is invalid: expected a number >= 0")
        if isinstance(self.step_scale, bool) or not 0 < self.step_scale < float("inf"):
            raise ConfigError(f"step_scale={self.step_scale!r} is invalid: expected a finite number > 0 (1 = the "
                              "observer's step)")
        if self.observer not in OBSERVER_METHODS:
            raise ConfigError(f"observer={self.observer!r} is invalid: expected one of {list(OBSERVER_METHODS)}")

    def apply_(self, model: nn.Module) -> None:
        """Restrict the input codes of every CIM layer on the macro's arrays (not the ``int8`` edge layers) and set
        its regularizer weight.

        Raises:
            ConfigError: ``max_ones`` exceeds every layer's input bits (no code can have that many one bits).
        """
        widths = [layer.spec.input_bits for _, layer in cim_layers(model)
                  if layer.input_quantizer is not None and layer.mapping == "cim"]
        if self.max_ones is not None and widths and self.max_ones > max(widths):
            raise ConfigError(
                f"max_ones={self.max_ones} exceeds the macro's input_bits={max(widths)}: a code has at most "
                "input_bits one bits (max_ones: null gives the plain uniform code set)"
            )
        reconfigure_(
            model, mappings=("cim",), input_max_ones=self.max_ones, input_observer=self.observer, input_sparsity_weight=self.sparsity_weight,
            input_step_scale=self.step_scale
        )
