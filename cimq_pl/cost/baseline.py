"""The conventional baseline of a CIM configuration, for "hardware efficiency" (SPEC section 5).

The baseline is the same network on the same macro (array size, weight/input bits, cell bits, DAC, row
split, slicing, first/last-layer modes) with conventional quantization: layerwise min-max weight scales,
uniform min-max activations (no bit-sparse code set), and an ``adc_bits``-bit (default 8) ADC whose range is
the min-max of the calibration partial sums, per layer, not learned. Layers the configuration simulates with
an ideal ADC keep it (both are charged ``EnergyTable.ideal_adc_bits``).

Its bit density is *measured*, never assumed: `build_baseline` deep-copies the configured network, rebuilds
every CIM layer with the baseline spec and options on the same (float, BN-folded) weights, and
`calibrate_` initialises it on calibration batches (train split). The caller then runs it on the same
evaluation images as the configuration and costs both with the same `EnergyTable`.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Iterable, Optional

from torch import nn

from cimq_pl.quant.convert import calibrate_, cim_layers, rebuild_cim_layer
from cimq_pl.quant.options import CONVENTIONAL_OPTIONS, QuantizerOptions

__all__ = ["BASELINE_ADC_BITS", "baseline_options", "build_baseline"]

#: ADC resolution of the conventional baseline, bits.
BASELINE_ADC_BITS = 8


def baseline_options(signed_inputs: Optional[bool] = None) -> QuantizerOptions:
    """`CONVENTIONAL_OPTIONS` (layerwise min-max weights, uniform min-max inputs, min-max ADC per layer).

    Args:
        signed_inputs: the configuration's ``input_signed`` choice, kept so both see the same code range.
    """
    return dataclasses.replace(CONVENTIONAL_OPTIONS, input_signed=signed_inputs)


def _rebuild(layer: nn.Module, adc_bits: int) -> nn.Module:
    """A conventional CIM layer on ``layer``'s Parameters and macro, with a min-max ``adc_bits`` ADC."""
    spec = layer.spec if layer.spec.adc_bits is None else layer.spec.replace(adc_bits=adc_bits)
    options = baseline_options(getattr(layer.options, "input_signed", None))
    return rebuild_cim_layer(layer, spec, options)


def build_baseline(
    model: nn.Module,
    calibration: Iterable,
    adc_bits: int = BASELINE_ADC_BITS,
) -> nn.Module:
    """Conventional baseline of a converted ``model``: a calibrated deep copy in eval mode (``model`` untouched).

    The copy's parameters are frozen and its forward hooks dropped (hooks belong to the configuration's
    training, e.g. reconstruction, not to the baseline).

    Args:
        model: a model whose layers were converted with `convert_to_cim` (BN folded).
        calibration: a re-iterable of batches (tensors or (images, labels) tuples) on the model's device, from
            the calibration split.
        adc_bits: the baseline ADC resolution, bits.

    Raises:
        ValueError: when ``adc_bits`` is outside [1, 16] or ``model`` has no CIM layer.
    """
    if isinstance(adc_bits, bool) or not isinstance(adc_bits, int) or not 1 <= adc_bits <= 16:
        raise ValueError(f"adc_bits={adc_bits!r} is invalid: expected an integer in [1, 16]")
    if not cim_layers(model):
        raise ValueError("the model has no CIM layer: convert it with convert_to_cim first")
    baseline = copy.deepcopy(model).eval()
    for module in baseline.modules():  # hooks of the configuration's training (e.g. reconstruction) stay behind
        module._forward_hooks.clear()
        module._forward_pre_hooks.clear()
    for name, layer in cim_layers(baseline):
        parent_name, _, child = name.rpartition(".")
        parent = baseline.get_submodule(parent_name) if parent_name else baseline
        setattr(parent, child, _rebuild(layer, adc_bits))
    for parameter in baseline.parameters():
        parameter.requires_grad_(False)
    calibrate_(baseline, list(calibration))
    return baseline

