"""What the cost model needs to know about each CIM layer of a model, and how its event counters are read.

A `LayerInfo` is the static description of one CIM layer (geometry from `TileGeometry`, the ADC resolution,
whether per-array scales force a multiply per array output, how many ADC ranges the layer programs).
`gather_counts` stacks the `CIMStats` counters of all layers into one (layers x counters) int64 tensor, the
unit a `HardwareCostMetric` accumulates; `take_counts` also zeroes them, so that every loop over batches reads
them the same way::

    metric.update(take_counts(layers))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from cimq_pl.quant.convert import cim_layers
from cimq_pl.quant.stats import COUNTER_NAMES
from cimq_pl.quant.tiling import TileGeometry

__all__ = ["COUNTER_NAMES", "LayerInfo", "describe_layers", "gather_counts", "reset_counts", "take_counts",
           "uncosted_layers"]

#: Weight granularities with one scale per array tile (a multiply per array output, SPEC 4.2).
PER_ARRAY_WEIGHT_GRANULARITIES = ("array", "array_channel")

#: ADC (psum) granularities whose ranges differ between the arrays of one output (a multiply per array output).
PER_ARRAY_ADC_GRANULARITIES = ("array", "column")


@dataclass(frozen=True)
class LayerInfo:
    """Static description of one CIM layer for the cost model.

    Attributes:
        name: the layer's qualified name in its model.
        geometry: its `TileGeometry` (the only source of array counts and sizes).
        adc_bits: ADC resolution of the macro, bits; None for an ideal ADC (charged as
            ``EnergyTable.ideal_adc_bits``).
        per_array_scales: whether the row-block results of one output carry different digital factors
            (arraywise weight scales, or one ADC range per array or per column), so each is multiplied before
            they are added; otherwise the row blocks are added as integers and each output is multiplied once.
            A per-column range costs no more multiplies than a per-array one: an output's result of one row
            block carries one digital factor either way.
        float_inputs: whether the layer's inputs are not quantized (no input bits are counted, so its
            wordline and cell-read energies are 0; reports flag such layers).
        weight_bits: the layer's weight code bits (None: float weights, or not given), for the reports.
        input_bits: the layer's input code bits (None: float inputs, or not given), for the reports.
        adc_range_settings: distinct ADC ranges the layer's bitlines read, count (`adc_range_settings` of the
            layer; 0 without an ADC quantizer): each is a programmable ADC reference (a register set when the
            layer is loaded), an area cost with no energy per conversion, so it is reported, not charged.

    All bit-widths are the layer's own spec (``layer.spec``), which per-layer overrides of the macro
    (``model.cim_overrides``) set.
    """

    name: str
    geometry: TileGeometry
    adc_bits: Optional[int]
    per_array_scales: bool
    float_inputs: bool
    weight_bits: Optional[int] = None
    input_bits: Optional[int] = None
    adc_range_settings: int = 0

    @classmethod
    def from_layer(cls, name: str, layer: nn.Module) -> "LayerInfo":
        """Describe a CIM layer (`CIMConv2d` / `CIMLinear`) from its spec, geometry and quantizers."""
        weight_q = getattr(layer, "weight_quantizer", None)
        psum_q = getattr(layer, "psum_quantizer", None)
        input_q = getattr(layer, "input_quantizer", None)
        weight_per_array = (
            weight_q is not None and weight_q.enabled and weight_q.granularity in PER_ARRAY_WEIGHT_GRANULARITIES
        )
        adc_per_array = psum_q is not None and psum_q.enabled and psum_q.granularity in PER_ARRAY_ADC_GRANULARITIES
        return cls(
            name=name,
            geometry=layer.geometry,
            adc_bits=layer.spec.adc_bits,
            per_array_scales=bool(weight_per_array or adc_per_array),
            float_inputs=input_q is None or not input_q.enabled,
            weight_bits=layer.spec.weight_bits,
            input_bits=layer.spec.input_bits,
            adc_range_settings=layer.adc_range_settings(),
        )


def describe_layers(model: nn.Module) -> list:
    """`LayerInfo` of every CIM layer of ``model``, in module order."""
    return [LayerInfo.from_layer(name, layer) for name, layer in cim_layers(model)]


def uncosted_layers(model: nn.Module) -> list:
    """Names of the float ``nn.Conv2d`` / ``nn.Linear`` layers left digital (not on the arrays, not costed)."""
    return [name for name, module in model.named_modules() if type(module) in (nn.Conv2d, nn.Linear)]


def gather_counts(layers: Sequence[nn.Module], device: Optional[torch.device] = None) -> torch.Tensor:
    """The event counters of ``layers`` as one (len(layers), len(COUNTER_NAMES)) int64 tensor.

    Counters stay on their device (no host synchronisation): Python ints are placed on ``device`` (default:
    the first tensor counter's device, else the CPU).

    Args:
        layers: CIM layers, each with a ``stats`` (`CIMStats`).
        device: where to build the tensor.
    """
    if device is None:
        device = next(
            (getattr(layer.stats, name).device for layer in layers for name in COUNTER_NAMES
             if isinstance(getattr(layer.stats, name), torch.Tensor)),
            torch.device("cpu"),
        )
    if not layers:
        return torch.zeros(0, len(COUNTER_NAMES), dtype=torch.long, device=device)
    rows = []
    for layer in layers:
        values = [getattr(layer.stats, name) for name in COUNTER_NAMES]
        rows.append(torch.stack([torch.as_tensor(v, dtype=torch.long).to(device).reshape(()) for v in values]))
    return torch.stack(rows)


def reset_counts(layers: Sequence[nn.Module]) -> None:
    """Zero the event counters of ``layers``."""
    for layer in layers:
        layer.stats.reset()


def take_counts(layers: Sequence[nn.Module], device: Optional[torch.device] = None) -> torch.Tensor:
    """`gather_counts` then `reset_counts`: the counters accumulated since the last take, for
    ``HardwareCostMetric.update`` (the one place counters are summed)."""
    counts = gather_counts(layers, device)
    reset_counts(layers)
    return counts
