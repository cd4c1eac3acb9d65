"""CIMSpec validation and QuantizerOptions misconfiguration."""

import pytest

from cimq_pl.quant import CIMSpec, QuantizerOptions


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(rows=0), r"CIMSpec\.rows=0 .*>= 1"),
        (dict(cols=-3), r"CIMSpec\.cols=-3 .*>= 1"),
        (dict(weight_bits=0), r"CIMSpec\.weight_bits=0 .*\[1, 16\]"),
        (dict(weight_bits=17), r"CIMSpec\.weight_bits=17 .*\[1, 16\]"),
        (dict(input_bits=0), r"CIMSpec\.input_bits=0 .*\[1, 16\]"),
        (dict(adc_bits=20), r"CIMSpec\.adc_bits=20 .*\[1, 16\]"),
        (dict(dac_bits=0), r"CIMSpec\.dac_bits=0 .*\[1, 16\]"),
        (dict(dac_bits=None), r"CIMSpec\.dac_bits=None .*\[1, 16\]"),
        (dict(input_bits=4, dac_bits=5), r"CIMSpec\.dac_bits=5 .*dac_bits <= input_bits=4"),
        (dict(weight_bits=4, cell_bits=6), r"CIMSpec\.cell_bits=6 .*cell_bits <= weight_bits=4"),
        (dict(weight_bits=None, cell_bits=2), r"CIMSpec\.cell_bits=2 .*weight_bits=None"),
        (dict(row_split="rows"), r"CIMSpec\.row_split='rows' .*\['kernel', 'dense'\]"),
        (dict(weight_slicing="sign"), r"CIMSpec\.weight_slicing='sign' .*twos_complement"),
        (dict(first_layer="fp32"), r"CIMSpec\.first_layer='fp32' .*\['cim', 'int8', 'digital'\]"),
        (dict(last_layer="int4"), r"CIMSpec\.last_layer='int4'"),
        (dict(weight_bits=True), r"CIMSpec\.weight_bits=True"),
        (dict(rows=2.5), r"CIMSpec\.rows=2\.5"),
    ],
)
def test_misconfiguration_names_field_value_and_range(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CIMSpec(**kwargs)


def test_defaults_and_none_bits():
    spec = CIMSpec()
    assert (spec.rows, spec.cols, spec.weight_bits, spec.input_bits, spec.dac_bits, spec.adc_bits) == (128, 128, 4, 4, 1, 4)
    assert spec.effective_cell_bits == 4
    pure = CIMSpec(weight_bits=None, input_bits=None, adc_bits=None, dac_bits=3)  # dac unchecked without inputs
    assert pure.effective_cell_bits is None
    int8 = CIMSpec(cell_bits=2, adc_bits=5).int8()
    assert (int8.weight_bits, int8.cell_bits, int8.input_bits, int8.adc_bits) == (8, None, 8, None)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(weight_granularity="tile"), r"weight_granularity='tile' .*array_channel"),
        (dict(weight_rounding="stochastic"), r"weight_rounding='stochastic' .*adaround"),
        (dict(psum_observer="kl"), r"psum_observer='kl' .*mse"),
        (dict(psum_granularity="channel"), r"psum_granularity='channel' .*\['layer', 'array', 'column'\]"),
        (dict(input_max_ones=0), r"input_max_ones=0 .*>= 1"),
        (dict(percentile=0), r"percentile=0 .*\(0, 100\]"),
    ],
)
def test_quantizer_options_misconfiguration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantizerOptions(**kwargs)
