"""Every count and every energy of one small conv, worked out by hand (SPEC 5, issue 5 "Must show")."""

import pytest
import torch
from torch import nn

from cimq_pl.cost import EnergyTable, describe_layers, gather_counts, network_cost
from cimq_pl.quant import CIMConv2d, CIMSpec, QuantizerOptions

# Round constants so the arithmetic below stays readable:
#   ADC at 4 bits:      (1.0 uW/bit x 4 + 2.0 uW) x (1 ns/bit x 4 + 1 ns) = 6 uW x 5 ns = 30 fJ
#   cell read at 4 bits: 0.5 uW x 5 ns                                    = 2.5 fJ
#   wordline, 2 columns: 1.0 fJ + 0.25 fJ x 2                             = 1.5 fJ   (3 columns: 1.75 fJ)
#   shift-add 10 fJ, scale multiply 40 fJ
HAND = EnergyTable(name="hand", adc_power_uw_per_bit=1.0, adc_power_uw_offset=2.0, adc_ns_per_bit=1.0,
                   adc_ns_offset=1.0, cell_read_uw=0.5, wordline_fj_per_cell=0.25, input_driver_fj=1.0,
                   shift_add_fj=10.0, scale_multiply_fj=40.0)

# One image, 2 channels of 2x2 pixels holding 4-bit unsigned codes (input step 1):
#   channel 0: 1, 2, 3, 0  -> 1 bits: 1 + 1 + 2 + 0 = 4
#   channel 1: 15, 0, 5, 8 -> 1 bits: 4 + 0 + 2 + 1 = 7
# A 3x3 conv with padding 1 gives 2x2 = 4 output positions; each 3x3 window covers all 4 pixels of both
# channels (the rest of the window is zero padding), so every position feeds 4 + 7 = 11 one bits.
IMAGE = torch.tensor([[[[1.0, 2.0], [3.0, 0.0]], [[15.0, 0.0], [5.0, 8.0]]]])


def _run(spec, options):
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 4, 3, padding=1, bias=False)
    layer = CIMConv2d.from_conv(conv, spec, options).eval()
    quantizer = layer.input_quantizer
    quantizer.signed, quantizer.initialized = False, True
    with torch.no_grad():
        quantizer.step.fill_(1.0)
    layer.collect_stats = True
    with torch.no_grad():
        layer(IMAGE)
    model = nn.Sequential(layer)
    return layer, network_cost(describe_layers(model), gather_counts([layer]), HAND)


def test_twos_complement_macro_by_hand():
    # rows = 9 = one 3x3 channel per array (kernel split) -> 2 row blocks; 4-bit weights in 4-bit cells = 1
    # slice; cols = 2 -> 2 output columns per array -> 4 outputs in 2 column blocks. Arrays: 2 x 2 = 4.
    spec = CIMSpec(rows=9, cols=2, weight_bits=4, input_bits=4, dac_bits=1, adc_bits=4)
    layer, cost = _run(spec, QuantizerOptions(weight_granularity="layer", psum_granularity="layer"))
    (row,) = cost.layers
    counts = row.counts
    assert row.arrays == 4 and cost.arrays == 4
    assert counts["images"] == 1 and cost.images == 1
    assert counts["output_positions"] == 4
    assert counts["macs"] == 4 * 4 * 18 == 288  # positions x C_out x (2 channels x 9 kernel rows)
    assert counts["input_bits_fed"] == 18 * 4 * 4 == 288  # unrolled rows x positions x 4 bits
    assert counts["input_ones_fed"] == 11 * 4 == 44  # 11 one bits per position
    assert row.bit_density == pytest.approx(44 / 288)
    # each row's bits reach the 2 column-block arrays of its row block
    assert counts["wordline_activations"] == 44 * 2 == 88
    # positions x row blocks x columns (4 outputs x 1 slice) x 4 bit-serial cycles
    assert counts["adc_conversions"] == 4 * 2 * 4 * 4 == 128
    # every driven wordline reads the used columns of its array: 44 ones x 4 columns over the 2 arrays
    assert counts["cell_reads"] == 44 * 4 == 176
    # one shift-add per ADC output, plus one add per (position, output, row block): 4 x 4 x 2 = 32
    assert counts["shift_add_ops"] == 128 + 32 == 160
    # layerwise weights and one ADC range per layer: row blocks add as integers, one multiply per output
    assert counts["scale_ops"] == 4 * 4 == 16
    assert counts["array_cycles"] == 4 * 4  # positions x cycles (all arrays in parallel)
    # the layer's own counters agree
    stats = layer.stats.as_dict()
    for name in ("macs", "input_bits_fed", "input_ones_fed", "wordline_activations", "adc_conversions"):
        assert stats[name] == counts[name]
    assert stats["arrays_used"] == 4
    # energy: ADC 128 x 30 = 3840; cell 176 x 2.5 = 440; wordline 88 x 1.5 = 132; shift-add 160 x 10 = 1600;
    # scale 16 x 40 = 640; total 6652 fJ
    assert row.energy_fj == pytest.approx(
        {"adc": 3840.0, "cell_read": 440.0, "wordline": 132.0, "shift_add": 1600.0, "scale": 640.0}
    )
    assert cost.total_fj == pytest.approx(6652.0)
    assert cost.energy_per_image_uj == pytest.approx(6652e-9)
    assert cost.tops_per_w == pytest.approx(2 * 288 / 6652 * 1e3)  # 2 ops per MAC; ops/fJ = 1e3 TOPS/W
    assert cost.latency_us_per_image == pytest.approx(16 * 5 / 1e3)  # 16 array cycles x 5 ns
    assert cost.share("adc") == pytest.approx(3840 / 6652)


def test_offset_slicing_and_arraywise_scales_by_hand():
    # 4-bit weights in 2-bit cells -> 2 slices; offset slicing spends 1 reference column per array;
    # cols = 3 -> (3 - 1) // 2 = 1 output column per array -> 4 column blocks. Arrays: 2 x 4 = 8.
    spec = CIMSpec(rows=9, cols=3, weight_bits=4, cell_bits=2, input_bits=4, adc_bits=4, weight_slicing="offset")
    layer, cost = _run(spec, QuantizerOptions(weight_granularity="array", psum_granularity="layer"))
    (row,) = cost.layers
    counts = row.counts
    assert row.arrays == 8
    assert counts["input_ones_fed"] == 44  # same input
    assert counts["wordline_activations"] == 44 * 4 == 176  # 4 column blocks now
    # columns read per row block: 4 outputs x 2 slices + 4 reference columns = 12
    assert counts["adc_conversions"] == 4 * 2 * 12 * 4 == 384
    assert counts["cell_reads"] == 44 * 12 == 528
    assert counts["shift_add_ops"] == 384 + 4 * 4 * 2 == 416
    # arraywise weight scales: each row block's result is multiplied before the row blocks are added
    assert counts["scale_ops"] == 4 * 4 * 2 == 32
    assert layer.stats.as_dict()["adc_conversions"] == 384
    # energy: ADC 384 x 30 = 11520; cell 528 x 2.5 = 1320; wordline 176 x (1 + 0.25 x 3) = 308;
    # shift-add 416 x 10 = 4160; scale 32 x 40 = 1280; total 18588 fJ
    assert row.energy_fj == pytest.approx(
        {"adc": 11520.0, "cell_read": 1320.0, "wordline": 308.0, "shift_add": 4160.0, "scale": 1280.0}
    )
    assert cost.total_fj == pytest.approx(18588.0)


def test_ideal_adc_is_charged_as_ideal_adc_bits_and_flagged():
    spec = CIMSpec(rows=9, cols=2, weight_bits=4, input_bits=4, adc_bits=None)
    _, cost = _run(spec, QuantizerOptions(weight_granularity="layer"))
    (row,) = cost.layers
    assert row.ideal_adc and row.adc_bits == 8
    # 8 bits: (8 + 2) uW x 9 ns = 90 fJ per conversion, 128 conversions (still counted with an ideal ADC)
    assert row.energy_fj["adc"] == pytest.approx(128 * 90.0)
    assert row.energy_fj["cell_read"] == pytest.approx(176 * 0.5 * 9)


@pytest.mark.parametrize("granularity, scale_ops, ranges", [
    ("layer", 4 * 4, 3),  # one range per kind (2 slices + reference): row blocks add as integers
    ("array", 4 * 4 * 2, 3 * 2 * 2),  # per kind and array: each row block's result is multiplied
    ("column", 4 * 4 * 2, 2 * 2 * 4 + 2 * 2),  # per bitline: 2 slices x 2 row blocks x 4 outputs + 4 references
])
def test_adc_range_granularity_by_hand(granularity, scale_ops, ranges):
    # 4-bit weights in 2-bit cells -> 2 slices, offset slicing: (5 - 1) // 2 = 2 output columns per array and a
    # reference column -> 2 column blocks; 2 row blocks. Layerwise weight scales: only the ADC range decides.
    spec = CIMSpec(rows=9, cols=5, weight_bits=4, cell_bits=2, input_bits=4, adc_bits=4, weight_slicing="offset")
    layer, cost = _run(spec, QuantizerOptions(weight_granularity="layer", psum_granularity=granularity))
    (row,) = cost.layers
    assert row.arrays == 4
    assert row.counts["scale_ops"] == scale_ops  # a per-column range costs the multiplies of a per-array one
    assert row.info.adc_range_settings == layer.adc_range_settings() == ranges  # 20 = every bitline of 4 arrays
    # conversion energy does not depend on the granularity: 4 positions x 2 row blocks x 10 columns x 4 cycles
    assert row.counts["adc_conversions"] == 4 * 2 * (4 * 2 + 2) * 4
    assert row.energy_fj["adc"] == pytest.approx(320 * 30.0)
