"""Event counters of one tiny layer, worked out by hand."""

import torch
from torch import nn

from cimq_pl.quant import CIMConv2d, CIMSpec


def test_counters_by_hand():
    # Conv 2 -> 3 channels, 2x2 kernel, no padding, 3x3 input: 2x2 = 4 output positions, one image.
    conv = nn.Conv2d(2, 3, 2, bias=False)
    # rows=4: kernel split puts 4 // (2*2) = 1 channel per array -> 2 row blocks of 4 rows.
    # weight 4 bits in 2-bit cells -> 2 slices; cols=2 -> 2 // 2 = 1 output column per array -> 3 column blocks.
    # arrays = 2 row blocks x 3 column blocks = 6. Inputs 2 bits, bit-serial -> 2 cycles.
    spec = CIMSpec(rows=4, cols=2, weight_bits=4, cell_bits=2, input_bits=2, dac_bits=1, adc_bits=None)
    layer = CIMConv2d.from_conv(conv, spec)
    layer.input_quantizer.signed = False
    layer.input_quantizer.initialized = True
    with torch.no_grad():
        layer.input_quantizer.step.fill_(1.0)
    x = torch.stack([torch.full((3, 3), 1.0), torch.full((3, 3), 3.0)]).unsqueeze(0)  # codes 1 (one 1 bit), 3 (two)
    layer.collect_stats = True
    layer(x)
    stats = layer.stats.as_dict()
    assert stats["images"] == 1
    assert stats["output_positions"] == 4
    assert stats["macs"] == 4 * 3 * 2 * 4  # positions x C_out x C_in x k^2 = 96
    assert stats["input_bits_fed"] == 8 * 4 * 2  # 8 rows x 4 positions x 2 bits = 64
    # per position: channel-0 rows 4 x 1 one bit + channel-1 rows 4 x 2 one bits = 12; x 4 positions
    assert stats["input_ones_fed"] == 48
    assert stats["input_bit_density"] == 48 / 64
    assert stats["wordline_activations"] == 48 * 3  # each row broadcast to 3 column-block arrays
    # positions 4 x row blocks 2 x columns (3 outputs x 2 slices) x cycles 2
    assert stats["adc_conversions"] == 4 * 2 * 3 * 2 * 2
    assert stats["arrays_used"] == 6
    assert stats["psum_clipped"] == 0
    layer(x)
    assert layer.stats.as_dict()["input_ones_fed"] == 96  # accumulates
    layer.reset_stats()
    assert layer.stats.as_dict()["input_ones_fed"] == 0 and layer.stats.input_bit_density == 0.0
    layer.collect_stats = False
    layer(x)
    assert layer.stats.as_dict()["images"] == 0


def test_padding_rows_count_as_fed_bits_and_clipping_counted():
    conv = nn.Conv2d(1, 1, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    spec = CIMSpec(rows=9, cols=1, weight_bits=2, input_bits=1, adc_bits=1)
    layer = CIMConv2d.from_conv(conv, spec)
    layer.input_quantizer.signed, layer.input_quantizer.initialized = False, True
    with torch.no_grad():
        layer.input_quantizer.step.fill_(1.0)
    x = torch.ones(1, 1, 2, 2)
    layer(x)  # initialise the weight step and the ADC
    with torch.no_grad():  # ADC: unsigned? weights two's complement top slice -> signed 1-bit ADC: codes {-1, 0}
        layer.psum_quantizer.alpha0.fill_(1.0)
        layer.psum_quantizer.theta.zero_()
    layer.collect_stats = True
    layer(x)
    stats = layer.stats.as_dict()
    # 9 rows x 4 positions x 1 bit; every output position sees all 4 ones of the 2x2 image
    assert stats["input_bits_fed"] == 36 and stats["input_ones_fed"] == 16
    # weight codes are 1 (max weight -> top code 1), partial sum 4 at every position: code range [-1, 0] * 1
    assert stats["adc_conversions"] == 4 and stats["psum_clipped"] == 4 and stats["psum_clip_rate"] == 1.0
