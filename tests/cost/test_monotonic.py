"""Sanity of the cost model: more ADC bits never cost less, more 1 bits never cost less, larger arrays never
need more arrays (hypothesis over geometries and counts, and on a real layer)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from cimq_pl.cost import EnergyTable, LayerInfo, describe_layers, gather_counts, layer_cost, network_cost
from cimq_pl.quant import CIMConv2d, CIMSpec, QuantizerOptions, TileGeometry

TABLES = st.builds(
    EnergyTable,
    adc_power_uw_per_bit=st.floats(0, 5), adc_power_uw_offset=st.floats(0, 10), adc_ns_per_bit=st.floats(0, 3),
    adc_ns_offset=st.floats(0, 3), cell_read_uw=st.floats(0, 10), wordline_fj_per_cell=st.floats(0, 1),
    input_driver_fj=st.floats(0, 5), shift_add_fj=st.floats(0, 50), scale_multiply_fj=st.floats(0, 200),
)


@st.composite
def layers(draw):
    """A random layer geometry and counters consistent with it."""
    groups = draw(st.sampled_from([1, 2]))
    spec = CIMSpec(
        rows=draw(st.integers(4, 64)), cols=draw(st.integers(5, 64)), weight_bits=4,  # 5: 4 slices + reference
        cell_bits=draw(st.sampled_from([1, 2, 4])), input_bits=4, adc_bits=4,
        row_split=draw(st.sampled_from(["kernel", "dense"])),
        weight_slicing=draw(st.sampled_from(["twos_complement", "offset"])),
    )
    geometry = TileGeometry.from_layer(spec, groups * draw(st.integers(1, 24)), groups * draw(st.integers(1, 24)),
                                       (draw(st.sampled_from([1, 3])),) * 2, groups)
    positions = draw(st.integers(1, 64))
    cycles = 4
    columns = geometry.out_channels_per_group * geometry.n_weight_slices + (
        geometry.n_col_blocks * geometry.reference_columns_per_array)
    bits_fed = geometry.groups * geometry.unrolled_rows * positions * 4
    ones = draw(st.integers(0, bits_fed))
    counts = dict(
        images=1, output_positions=positions, macs=positions * geometry.groups * geometry.out_channels_per_group
        * geometry.unrolled_rows, input_bits_fed=bits_fed, input_ones_fed=ones,
        wordline_activations=ones * geometry.n_col_blocks,
        adc_conversions=positions * geometry.groups * geometry.n_row_blocks * columns * cycles, psum_clipped=0,
    )
    return geometry, counts, draw(st.booleans())


@given(layer=layers(), table=TABLES, bits=st.integers(1, 15))
def test_more_adc_bits_never_cost_less(layer, table, bits):
    geometry, counts, per_array = layer
    low = layer_cost(LayerInfo("l", geometry, bits, per_array, False), counts, table)
    high = layer_cost(LayerInfo("l", geometry, bits + 1, per_array, False), counts, table)
    assert high.total_fj >= low.total_fj
    assert high.energy_fj["adc"] >= low.energy_fj["adc"]


@given(layer=layers(), table=TABLES, extra=st.integers(0, 10_000))
def test_higher_bit_density_never_costs_less(layer, table, extra):
    geometry, counts, per_array = layer
    denser = dict(counts)
    denser["input_ones_fed"] = min(counts["input_bits_fed"], counts["input_ones_fed"] + extra)
    denser["wordline_activations"] = denser["input_ones_fed"] * geometry.n_col_blocks
    info = LayerInfo("l", geometry, 4, per_array, False)
    sparse_cost, dense_cost = layer_cost(info, counts, table), layer_cost(info, denser, table)
    assert dense_cost.bit_density >= sparse_cost.bit_density
    assert dense_cost.total_fj >= sparse_cost.total_fj


@settings(max_examples=200)
@given(
    cin=st.integers(1, 200), cout=st.integers(1, 200), kernel=st.sampled_from([1, 3, 5]),
    rows=st.integers(1, 300), cols=st.integers(2, 300), more_rows=st.integers(0, 300), more_cols=st.integers(0, 300),
    cell_bits=st.sampled_from([1, 2, 4]), split=st.sampled_from(["kernel", "dense"]),
    slicing=st.sampled_from(["twos_complement", "offset"]),
)
def test_a_larger_array_never_needs_more_arrays(cin, cout, kernel, rows, cols, more_rows, more_cols, cell_bits,
                                                split, slicing):
    def arrays(r, c):
        spec = CIMSpec(rows=r, cols=c, weight_bits=4, cell_bits=cell_bits, row_split=split, weight_slicing=slicing)
        try:
            geometry = TileGeometry.from_layer(spec, cin, cout, (kernel, kernel))
        except ValueError:  # too narrow for one weight's slices: the larger array is checked alone
            return None
        counts = dict.fromkeys(["images", "output_positions", "macs", "input_bits_fed", "input_ones_fed",
                                "wordline_activations", "adc_conversions", "psum_clipped"], 0)
        return layer_cost(LayerInfo("l", geometry, 4, False, False), counts, EnergyTable()).arrays

    small, large = arrays(rows, cols), arrays(rows + more_rows, cols + more_cols)
    assert large is not None or small is None
    if small is not None:
        assert large <= small


def _layer_energy(adc_bits, code):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=1)
    spec = CIMSpec(rows=36, cols=16, weight_bits=4, input_bits=4, adc_bits=adc_bits)
    layer = CIMConv2d.from_conv(conv, spec, QuantizerOptions(weight_granularity="array", weight_observer="minmax",
                                                              psum_observer="minmax")).eval()
    quantizer = layer.input_quantizer
    quantizer.signed, quantizer.initialized = False, True
    with torch.no_grad():
        quantizer.step.fill_(1.0)
        layer.collect_stats = True
        layer(torch.full((2, 8, 6, 6), float(code)))
    cost = network_cost(describe_layers(nn.Sequential(layer)), gather_counts([layer]))
    return cost


def test_real_layer_more_adc_bits_never_cost_less():
    energies = [_layer_energy(bits, 5).energy_per_image_uj for bits in (2, 3, 4, 6, 8)]
    assert energies == sorted(energies) and energies[0] < energies[-1]


def test_real_layer_denser_codes_cost_more():
    # codes 1, 3, 7, 15 hold 1, 2, 3, 4 one bits out of 4
    costs = [_layer_energy(4, code) for code in (0, 1, 3, 7, 15)]
    densities = [cost.bit_density for cost in costs]
    assert densities == sorted(densities) and densities[-1] > 0.5
    energies = [cost.energy_per_image_uj for cost in costs]
    assert energies == sorted(energies) and energies[0] < energies[-1]
    assert costs[0].layers[0].counts["adc_conversions"] == costs[-1].layers[0].counts["adc_conversions"]


def test_network_cost_rejects_counts_of_the_wrong_shape():
    geometry = TileGeometry.from_layer(CIMSpec(), 4, 4, (3, 3))
    with pytest.raises(ValueError, match=r"counts must have shape \(1, 8\)"):
        network_cost([LayerInfo("l", geometry, 4, False, False)], torch.zeros(2, 8, dtype=torch.long))
