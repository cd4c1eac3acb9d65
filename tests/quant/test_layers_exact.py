"""Exactness of the CIM layers: quantizers off == original layer; quantizers on == the slow reference."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from cimq_pl.quant import CIMConv2d, CIMLinear, CIMSpec, QuantizerOptions
from .reference import reference_conv

FLOAT_SPEC = dict(weight_bits=None, input_bits=None, adc_bits=None)


@st.composite
def conv_cases(draw):
    groups = draw(st.sampled_from([1, 1, 2, "depthwise"]))
    cin_g = draw(st.integers(1, 5))
    cout_g = draw(st.integers(1, 5))
    if groups == "depthwise":
        groups, cin_g, cout_g = draw(st.integers(2, 4)), 1, draw(st.integers(1, 2))
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = draw(st.integers(1, 2))
    padding = draw(st.integers(0, 2))
    dilation = draw(st.integers(1, 2))
    size = draw(st.integers(max(kernel) * dilation, max(kernel) * dilation + 3))
    return dict(cin=cin_g * groups, cout=cout_g * groups, kernel=kernel, stride=stride, padding=padding,
                dilation=dilation, groups=groups, size=size, bias=draw(st.booleans()))


@st.composite
def specs(draw, quantized=True):
    rows = draw(st.integers(1, 24))
    cols = draw(st.integers(2, 9))
    split = draw(st.sampled_from(["kernel", "dense"]))
    if not quantized:
        return CIMSpec(rows=rows, cols=cols, row_split=split, **FLOAT_SPEC)
    weight_bits = draw(st.integers(2, 6))
    cell_bits = draw(st.integers(1, weight_bits))
    slicing = draw(st.sampled_from(["twos_complement", "offset"]))
    slices = -(-weight_bits // cell_bits)
    cols = max(cols, slices + (slicing == "offset"))
    input_bits = draw(st.integers(1, 5))
    return CIMSpec(
        rows=rows, cols=cols, row_split=split, weight_bits=weight_bits, cell_bits=cell_bits,
        weight_slicing=slicing, input_bits=input_bits, dac_bits=draw(st.integers(1, input_bits)),
        adc_bits=draw(st.sampled_from([None, 2, 3, 5])),
    )


def _conv(case, dtype=torch.float64):
    conv = nn.Conv2d(case["cin"], case["cout"], case["kernel"], case["stride"], case["padding"], case["dilation"],
                     case["groups"], bias=case["bias"]).to(dtype)
    x = torch.randn(2, case["cin"], case["size"], case["size"] + 1, dtype=dtype)
    return conv, x


@settings(max_examples=50, deadline=None)
@given(case=conv_cases(), spec=specs(quantized=False), seed=st.integers(0, 2**16))
def test_pure_tiling_equals_conv(case, spec, seed):
    torch.manual_seed(seed)
    conv, x = _conv(case, torch.float32)
    layer = CIMConv2d.from_conv(conv, spec)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-5, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(case=conv_cases(), spec=specs(), seed=st.integers(0, 2**16))
def test_quantizers_disabled_equals_conv(case, spec, seed):
    torch.manual_seed(seed)
    conv, x = _conv(case, torch.float32)
    layer = CIMConv2d.from_conv(conv, spec)
    layer(x)  # initialise, then switch everything off
    layer.set_quantizers_enabled(False)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-5, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(case=conv_cases(), spec=specs(), signed=st.booleans(), seed=st.integers(0, 2**16),
       granularity=st.sampled_from(["layer", "array", "column"]), asymmetric=st.booleans())
def test_quantized_layer_matches_reference(case, spec, signed, seed, granularity, asymmetric):
    torch.manual_seed(seed)
    conv, x = _conv(case)
    x = x.abs()
    if signed:
        x.view(-1)[0] = -1.0  # at least one negative input: signed codes
    options = QuantizerOptions(input_observer="minmax", weight_observer="minmax", psum_observer="minmax",
                               psum_granularity=granularity, weight_granularity="array", psum_asymmetric=asymmetric)
    layer = CIMConv2d.from_conv(conv, spec, options).double()
    layer(x)  # lazy initialisation (sign of inputs from data)
    if layer.psum_quantizer is not None:  # random clip levels: exercise clipping and rounding
        with torch.no_grad():
            layer.psum_quantizer.theta.uniform_(-1.5, 0.3)
            if asymmetric:  # ranges moved by a few steps either way
                layer.psum_quantizer.offset.uniform_(-2.0, 2.0)
    out, trace = layer.simulate(x, trace=True)
    expected = reference_conv(layer, x)
    assert layer.input_quantizer.signed == signed
    assert torch.equal(trace["partial_sums"], expected["partial_sums"])
    assert trace["partial_sums"].eq(trace["partial_sums"].round()).all()  # integer partial sums
    if layer.psum_quantizer is not None:
        assert torch.equal(trace["adc_codes"], expected["adc_codes"])
    torch.testing.assert_close(out, expected["output"], rtol=1e-9, atol=1e-9)


@settings(max_examples=20, deadline=None)
@given(case=conv_cases(), spec=specs(), seed=st.integers(0, 2**16))
def test_float32_partial_sums_are_exact_integers(case, spec, seed):
    torch.manual_seed(seed)
    conv, x = _conv(case, torch.float32)
    layer = CIMConv2d.from_conv(conv, spec)
    layer(x)
    _, trace = layer.simulate(x, trace=True)
    expected = reference_conv(layer, x)
    assert torch.equal(trace["partial_sums"].double(), expected["partial_sums"])


def test_without_adc_equals_fake_quant_conv():
    torch.manual_seed(0)
    conv = nn.Conv2d(20, 6, 3, padding=1)
    x = torch.randn(3, 20, 7, 7)
    spec = CIMSpec(rows=40, cols=7, weight_bits=6, cell_bits=2, input_bits=5, dac_bits=2, adc_bits=None)
    layer = CIMConv2d.from_conv(conv, spec)
    out = layer(x)
    dequant_w = layer.weight_quantizer(conv.weight)
    dequant_x = layer.input_quantizer(x)
    torch.testing.assert_close(out, nn.functional.conv2d(dequant_x, dequant_w, conv.bias, padding=1),
                               rtol=1e-5, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(cin=st.integers(1, 30), cout=st.integers(1, 9), spec=specs(), seed=st.integers(0, 2**16))
def test_linear_matches_reference_and_float(cin, cout, spec, seed):
    torch.manual_seed(seed)
    linear = nn.Linear(cin, cout).double()
    x = torch.randn(4, cin, dtype=torch.float64)
    layer = CIMLinear.from_linear(linear, spec).double()
    out, trace = layer.simulate(x, trace=True)
    conv = nn.Conv2d(cin, cout, 1).double()
    conv.weight, conv.bias = nn.Parameter(linear.weight.view(cout, cin, 1, 1)), linear.bias
    as_conv = CIMConv2d.from_conv(conv, spec).double()
    expected = reference_conv(layer_like(layer, as_conv), x.view(4, cin, 1, 1))
    assert torch.equal(trace["partial_sums"], expected["partial_sums"])
    torch.testing.assert_close(out, expected["output"].view(4, cout), rtol=1e-9, atol=1e-9)
    layer.set_quantizers_enabled(False)
    torch.testing.assert_close(layer(x), linear(x))


def layer_like(linear_layer, conv_layer):
    """The conv twin of a linear CIM layer, carrying the linear layer's quantizers."""
    conv_layer.input_quantizer = linear_layer.input_quantizer
    conv_layer.weight_quantizer = linear_layer.weight_quantizer
    conv_layer.psum_quantizer = linear_layer.psum_quantizer
    return conv_layer
