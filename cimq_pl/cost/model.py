"""Analytic cost of CIM layers and networks from their event counters (SPEC section 5, DNN+NeuroSim style).

Per layer, from its `CIMStats` counters, its `TileGeometry` and an `EnergyTable`:

* **arrays** = ``geometry.arrays_used``.
* **ADC conversions** (counted by the layer) = positions x row arrays x columns read per array x cycles, where
  columns read = C_out/groups x weight slices (+ the reference column of each array with offset slicing).
* **wordline activations** (counted) = 1 bits fed x column blocks: a row's input reaches every array of its
  row block.
* **cell reads** = 1 bits fed x columns read per group: every cell on a driven wordline, in a column that is
  converted, conducts during that conversion (cells of unused columns are not biased).
* **shift-add ops** = ADC conversions (each ADC output is shifted by its cycle and slice weight and added into
  its array accumulator) + positions x C_out x row blocks (each array result added into its output).
* **scale ops** = positions x C_out x row blocks when the row blocks of an output carry different digital
  factors (``LayerInfo.per_array_scales``: arraywise weight scales, or an ADC range per array or per column),
  else positions x C_out (the one requantisation multiply). A range per column costs what a range per array
  does: an output's result of one row block carries one digital factor either way.
* **ADC range settings** (``LayerInfo.adc_range_settings``, per layer): the programmable ADC references the
  layer needs (one register per distinct range, set when the layer is loaded; per used bitline with the
  ``"column"`` granularity). Area, not energy per conversion: reported in the per-layer table, not charged.
* **array cycles** (latency) = positions x input cycles x ``columns_per_adc``: all arrays of a layer work in
  parallel (every layer's weights resident), layers one after the other; each cycle lasts one conversion.

Energy (fJ) = sum over components of count x per-event energy: ADC (depends on adc_bits), cell read (depends
on adc_bits: the cell conducts for the conversion time), wordline (depends on the measured bit density and
the array width), shift-add, scale. TOPS/W = 2 x MACs / energy (MACs of the original layer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch

from cimq_pl.cost.energy import EnergyTable
from cimq_pl.cost.layers import COUNTER_NAMES, LayerInfo

__all__ = ["COMPONENTS", "LayerCost", "NetworkCost", "hw_efficiency", "layer_cost", "network_cost"]

#: Energy components, in report order.
COMPONENTS = ("adc", "cell_read", "wordline", "shift_add", "scale")

_FJ_PER_UJ = 1e9


def _tops_per_w(macs: float, energy_fj: float) -> float:
    """2 x MACs / energy in TOPS/W: ops / fJ = 1e15 ops / J = 1e3 TOPS/W."""
    return 2.0 * macs / energy_fj * 1e3 if energy_fj > 0 else 0.0


class _EnergyTotals:
    """Totals shared by a layer's and a network's cost: needs ``energy_fj`` (by component) and ``images``."""

    @property
    def total_fj(self) -> float:
        """Energy over the evaluation, fJ."""
        return float(sum(self.energy_fj.values()))

    @property
    def energy_per_image_uj(self) -> float:
        """Energy per image, uJ."""
        return self.total_fj / max(self.images, 1) / _FJ_PER_UJ


@dataclass(frozen=True)
class LayerCost(_EnergyTotals):
    """Counts and energy of one layer over an evaluation (totals; ``*_per_image`` helpers divide).

    Attributes:
        name: layer name.
        arrays: crossbar arrays the layer occupies, count.
        adc_bits: ADC resolution charged, bits (``ideal_adc_bits`` for an ideal ADC).
        ideal_adc: whether the layer was simulated with an ideal ADC.
        float_inputs: whether the layer's inputs were not quantized (no bits counted).
        images: images of the evaluation (the network's count), for per-image values.
        counts: every event count over the evaluation, by name: the `CIMStats` counters (``images`` being
            the layer's own) plus ``cell_reads``, ``shift_add_ops``, ``scale_ops`` and ``array_cycles``.
        energy_fj: energy over the evaluation by component (`COMPONENTS`), fJ.
        latency_ns: time over the evaluation, ns (array cycles x conversion time).
        info: the `LayerInfo` the cost was computed from.
    """

    name: str
    arrays: int
    adc_bits: int
    ideal_adc: bool
    float_inputs: bool
    images: int
    counts: Mapping[str, float]
    energy_fj: Mapping[str, float]
    latency_ns: float
    info: Optional[LayerInfo] = None

    @property
    def macs(self) -> int:
        """Multiply-accumulates over the evaluation, count."""
        return int(self.counts["macs"])

    @property
    def tops_per_w(self) -> float:
        """2 x MACs / energy, TOPS/W."""
        return _tops_per_w(self.macs, self.total_fj)

    @property
    def bit_density(self) -> float:
        """1 bits fed / input bits fed (0 when no bits were counted)."""
        fed = self.counts["input_bits_fed"]
        return self.counts["input_ones_fed"] / fed if fed else 0.0

    def per_image(self, count: str) -> float:
        """A count (see ``counts``) per image."""
        return self.counts[count] / max(self.images, 1)


def layer_cost(info: LayerInfo, counts: Mapping[str, float], table: EnergyTable, images: Optional[int] = None) -> LayerCost:
    """Cost of one layer from its counters.

    Args:
        info: the layer's `LayerInfo`.
        counts: the `CIMStats` counters by name (`COUNTER_NAMES`), summed over the evaluation.
        table: per-event energies.
        images: images of the whole evaluation (default: the layer's own ``images`` counter).

    Raises:
        KeyError: when a counter of `COUNTER_NAMES` is missing.
    """
    geo = info.geometry
    values = {name: counts[name] for name in COUNTER_NAMES}
    positions = values["output_positions"]
    out_channels = geo.groups * geo.out_channels_per_group
    columns_per_group = geo.out_channels_per_group * geo.n_weight_slices + geo.n_col_blocks * geo.reference_columns_per_array
    row_block_outputs = positions * out_channels * geo.n_row_blocks
    conversions_per_cycle = positions * geo.groups * geo.n_row_blocks * columns_per_group
    cycles = values["adc_conversions"] / conversions_per_cycle if conversions_per_cycle else 0.0
    values.update(
        cell_reads=values["input_ones_fed"] * columns_per_group,
        shift_add_ops=values["adc_conversions"] + row_block_outputs,
        scale_ops=row_block_outputs if info.per_array_scales else positions * out_channels,
        array_cycles=positions * cycles * table.columns_per_adc,
    )
    energy = {
        "adc": values["adc_conversions"] * table.adc_fj(info.adc_bits),
        "cell_read": values["cell_reads"] * table.cell_read_fj(info.adc_bits),
        "wordline": values["wordline_activations"] * table.wordline_fj(geo.cols),
        "shift_add": values["shift_add_ops"] * table.shift_add_fj,
        "scale": values["scale_ops"] * table.scale_multiply_fj,
    }
    return LayerCost(
        name=info.name,
        arrays=geo.arrays_used,
        adc_bits=table.charged_adc_bits(info.adc_bits),
        ideal_adc=info.adc_bits is None,
        float_inputs=info.float_inputs,
        images=int(values["images"] if images is None else images),
        counts=values,
        energy_fj={name: float(energy[name]) for name in COMPONENTS},
        latency_ns=float(values["array_cycles"] * table.adc_time_ns(info.adc_bits)),
        info=info,
    )


class NetworkCost(_EnergyTotals):
    """Cost of every CIM layer of a network over an evaluation, and the totals.

    A plain class (not a dataclass) so that torchmetrics returns it from ``compute`` untouched.

    Args:
        layers: `LayerCost` per CIM layer, in module order.
        images: images evaluated (the largest ``images`` counter of the layers).
        table: the energy table used (default `EnergyTable()`).
    """

    __slots__ = ("layers", "images", "table")

    def __init__(self, layers: Sequence[LayerCost], images: int, table: Optional[EnergyTable] = None) -> None:
        self.layers = tuple(layers)
        self.images = int(images)
        self.table = table or EnergyTable()

    def __repr__(self) -> str:
        return (f"NetworkCost({len(self.layers)} layers, {self.images} images, "
                f"{self.energy_per_image_uj:.4g} uJ/image, {self.tops_per_w:.4g} TOPS/W)")

    @property
    def energy_fj(self) -> dict:
        """Energy over the evaluation by component, fJ."""
        return {name: sum(layer.energy_fj[name] for layer in self.layers) for name in COMPONENTS}

    def breakdown_per_image_uj(self) -> dict:
        """Energy per image by component, uJ."""
        return {name: value / max(self.images, 1) / _FJ_PER_UJ for name, value in self.energy_fj.items()}

    def share(self, component: str) -> float:
        """Fraction of the energy spent in ``component`` (0 when nothing was spent)."""
        total = self.total_fj
        return self.energy_fj[component] / total if total else 0.0

    @property
    def macs(self) -> int:
        """Multiply-accumulates over the evaluation, count."""
        return sum(layer.macs for layer in self.layers)

    @property
    def macs_per_image(self) -> float:
        """MACs per image, count."""
        return self.macs / max(self.images, 1)

    @property
    def tops_per_w(self) -> float:
        """2 x MACs / energy over the whole network, TOPS/W."""
        return _tops_per_w(self.macs, self.total_fj)

    @property
    def bit_density(self) -> float:
        """1 bits fed / input bits fed, over all layers (0 when no bits were counted)."""
        fed = sum(layer.counts["input_bits_fed"] for layer in self.layers)
        ones = sum(layer.counts["input_ones_fed"] for layer in self.layers)
        return ones / fed if fed else 0.0

    @property
    def psum_clip_rate(self) -> float:
        """Partial sums outside the ADC range / ADC conversions, over all layers (0 when nothing was converted)."""
        conversions = sum(layer.counts["adc_conversions"] for layer in self.layers)
        clipped = sum(layer.counts["psum_clipped"] for layer in self.layers)
        return clipped / conversions if conversions else 0.0

    @property
    def arrays(self) -> int:
        """Crossbar arrays of all layers, count."""
        return sum(layer.arrays for layer in self.layers)

    @property
    def latency_us_per_image(self) -> float:
        """Latency per image, us (layers in sequence, arrays of a layer in parallel)."""
        return sum(layer.latency_ns for layer in self.layers) / max(self.images, 1) / 1e3

    def with_table(self, table: EnergyTable) -> "NetworkCost":
        """The same counts costed with another energy table."""
        rows = [[layer.counts[name] for name in COUNTER_NAMES] for layer in self.layers]
        layers = [layer_cost(layer.info, dict(zip(COUNTER_NAMES, row)), table, self.images)
                  for layer, row in zip(self.layers, rows)]
        return NetworkCost(layers, self.images, table)

    def count_per_image(self, count: str) -> float:
        """A count (see `LayerCost.counts`) summed over layers, per image."""
        return sum(layer.counts[count] for layer in self.layers) / max(self.images, 1)


def network_cost(infos: Sequence[LayerInfo], counts, table: Optional[EnergyTable] = None) -> NetworkCost:
    """Cost of a network from the counters of its CIM layers.

    Args:
        infos: `LayerInfo` per layer.
        counts: (len(infos), len(COUNTER_NAMES)) counters, a tensor or nested sequences, in `COUNTER_NAMES`
            order (`gather_counts`).
        table: per-event energies (default `EnergyTable()`).

    Raises:
        ValueError: when ``counts`` does not have one row per layer and one column per counter.
    """
    table = table or EnergyTable()
    rows = counts.tolist() if isinstance(counts, torch.Tensor) else [list(row) for row in counts]
    if len(rows) != len(infos) or any(len(row) != len(COUNTER_NAMES) for row in rows):
        raise ValueError(
            f"counts must have shape ({len(infos)}, {len(COUNTER_NAMES)}) (layers x counters {list(COUNTER_NAMES)})"
        )
    by_name = [dict(zip(COUNTER_NAMES, row)) for row in rows]
    images = int(max((row["images"] for row in by_name), default=0))
    layers = tuple(layer_cost(info, row, table, images) for info, row in zip(infos, by_name))
    return NetworkCost(layers=layers, images=images, table=table)


def hw_efficiency(baseline: NetworkCost, config: NetworkCost) -> float:
    """Hardware efficiency of ``config`` relative to ``baseline``: baseline energy / config energy per image.

    A ratio; above 1 means ``config`` spends less energy per image. NaN when either energy is 0.
    """
    ours, theirs = config.energy_per_image_uj, baseline.energy_per_image_uj
    return theirs / ours if ours > 0 and theirs > 0 else float("nan")
