"""The fast simulation paths (`cimq_pl/quant/fused.py`) against the plain eager path and the float64 reference.

* eager, no gradient: channels-last array convolutions and an in-place ADC, bit for bit the plain path;
* ``simulation="compiled"``: its kernels run uncompiled (``fused.COMPILE_KERNELS = False``, the same code
  Inductor compiles) over hypothesis cases, forward values and every gradient against the eager path and the
  float64 reference; one tiny layer through real ``torch.compile`` against the uncompiled kernels (about 10 s
  of compilation: only with ``CIMQ_TEST_COMPILE=1``); the fallback to eager with one warning where compilation
  fails.
"""

import contextlib
import os
import shutil
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from cimq_pl.errors import ConfigError
from cimq_pl.quant import (ActivationQuantizer, CIMConv2d, CIMLinear, CIMSpec, DeviceSpec, QuantizerOptions,
                           attach_device_, fused)
from .reference import reference_conv
from .test_layers_exact import _conv, conv_cases, specs

compiled_layer, cycle_pack = fused.compiled_layer, fused.cycle_pack
OPTIONS = dict(input_observer="minmax", weight_observer="minmax", psum_observer="minmax", weight_granularity="array")


@contextlib.contextmanager
def uncompiled():
    """The compiled path with its kernels run eagerly (no compiler, no compile time)."""
    saved, fused.COMPILE_KERNELS = fused.COMPILE_KERNELS, False
    try:
        yield
    finally:
        fused.COMPILE_KERNELS = saved


def _initialised(case, spec, seed, dtype, signed=False, **options):
    torch.manual_seed(seed)
    conv, x = _conv(case, dtype)
    x = x.abs()
    if signed:
        x.view(-1)[0] = -1.0
    layer = CIMConv2d.from_conv(conv, spec, QuantizerOptions(**{**OPTIONS, **options})).to(dtype)
    layer(x)  # lazy initialisation
    if layer.psum_quantizer is not None:  # clip levels that clip and round
        with torch.no_grad():
            layer.psum_quantizer.theta.uniform_(-1.5, 0.3)
            if layer.psum_quantizer.asymmetric:  # ranges moved by a few steps either way, not whole ones
                layer.psum_quantizer.offset.uniform_(-2.0, 2.0)
    return layer, x


def _run(layer, x, seed=0):
    """Output and the gradients of x and of every parameter for a fixed random projection of the output."""
    layer.zero_grad()
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    out = layer(x)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    grads = {"x": x.grad}
    grads.update({name: p.grad for name, p in layer.named_parameters() if p.grad is not None})
    return out.detach(), grads


@settings(max_examples=40, deadline=None)
@given(case=conv_cases(), spec=specs(), signed=st.booleans(), seed=st.integers(0, 2**16),
       granularity=st.sampled_from(["array", "column"]))
def test_eager_without_gradient_is_bit_identical(case, spec, signed, seed, granularity):
    layer, x = _initialised(case, spec, seed, torch.float32, signed, psum_granularity=granularity)
    layer.eval()
    plain = layer(x)  # the weights need gradients: the plain (NCHW, digit-stacking) path
    with torch.no_grad():
        fast = layer(x)  # channels-last convolutions where the partial sums are integers, in-place ADC
    assert torch.equal(fast, plain.detach())


@settings(max_examples=40, deadline=None)
@given(case=conv_cases(), spec=specs(), signed=st.booleans(), seed=st.integers(0, 2**16),
       train=st.booleans(), rounding=st.sampled_from(["nearest", "adaround"]), max_ones=st.sampled_from([None, 1, 2]),
       granularity=st.sampled_from(["array", "column"]), offset=st.booleans(), drop_psums=st.booleans(),
       asymmetric=st.booleans())
def test_compiled_path_matches_eager_and_reference(case, spec, signed, seed, train, rounding, max_ones, granularity,
                                                   offset, drop_psums, asymmetric):
    layer, x = _initialised(case, spec, seed, torch.float64, signed, weight_rounding=rounding,
                            input_max_ones=max_ones, psum_granularity=granularity, psum_asymmetric=asymmetric)
    offset = offset and layer.add_output_offset_() is not None  # a learned offset after the ADC (gradient too)
    if offset:
        with torch.no_grad():
            layer.output_offset.uniform_(-0.5, 0.5)
        layer.output_offset.requires_grad_(True)
    layer.train(train)
    if train and layer.input_quantizer is not None:
        layer.input_quantizer.keep_prob = 0.5  # QDrop: non-integer digits in the first cycle
    drop_psums = drop_psums and train and layer.psum_quantizer is not None
    if drop_psums:  # QDrop on the ADC: the same masks on both paths (drawn in the same order)
        layer.psum_quantizer.keep_prob = 0.5
    eager_out, eager_grads = _run(layer, x)
    layer.simulation = "compiled"
    with uncompiled():
        out, grads = _run(layer, x)
    torch.testing.assert_close(out, eager_out, rtol=1e-12, atol=1e-12)
    assert grads.keys() == eager_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-9, atol=1e-9, msg=name)
    if offset:
        assert "output_offset" in grads
    if not train and max_ones is None:  # (the reference rounds inputs: no bit-sparse code sets)
        reference = reference_conv(layer, x)["output"]
        if offset:  # the reference knows the bias only: the offset is one more per-channel term after the ADC
            reference = reference + layer.output_offset.detach().view(1, -1, 1, 1)
        torch.testing.assert_close(out, reference, rtol=1e-9, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(case=conv_cases(), spec=specs(), signed=st.booleans(), seed=st.integers(0, 2**16),
       max_ones=st.sampled_from([None, 2]))
def test_cycle_pairs_in_one_convolution_give_the_same_bits(case, spec, signed, seed, max_ones):
    """Without gradients the compiled path convolves two cycles at once (`fused.cycle_pack`): bit for bit the
    outputs of one convolution per cycle, in float32 (the dtype whose mantissa the packing must respect)."""
    layer, x = _initialised(case, spec, seed, torch.float32, signed, input_max_ones=max_ones)
    layer.eval()
    layer.simulation = "compiled"
    factors = []
    with uncompiled(), torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(fused, "cycle_pack", lambda *a: factors.append(0) or 0)
        unpacked = layer(x)
        patch.setattr(fused, "cycle_pack", lambda *a: factors.append(cycle_pack(*a)) or factors[-1])
        packed = layer(x)
    assert torch.equal(packed, unpacked)
    n_cycles = layer.geometry.n_cycles(signed=bool(layer.input_quantizer.signed))
    assert (factors[-1] > 0) == (n_cycles % 2 == 0)  # small layers always fit float32's mantissa


def test_cycle_pack_factor_by_hand():
    """Digits of 1 bit, a column of weights (3, -2, 1) over 3 rows: |p| <= 6, so S = 16 > 12 and two cycles
    share a convolution; a column summing to 4096 needs S = 16384 and more than float32's 24 bits."""
    split = fused.InputSplit(shifts=(0, 1, 2, 3), widths=(1, 1, 1, 1), cycle_weights=(1, 2, 4, 8), qmin=0, qmax=15,
                             exact=True)
    weight = torch.tensor([3.0, -2.0, 1.0]).view(1, 3, 1, 1)
    assert fused.cycle_pack([weight], split, torch.float32) == 16
    assert fused.cycle_pack([torch.full((1, 4096, 1, 1), 1.0)], split, torch.float32) == 0  # (16384 + 1) 4096 > 2^24
    assert fused.cycle_pack([torch.full((1, 4096, 1, 1), 1.0)], split, torch.float64) == 16384
    assert fused.cycle_pack([weight], split._replace(shifts=(0, 1, 2), widths=(1, 1, 0)), torch.float32) == 0


@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_compiled_same_padding_with_dropping():
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 4, (2, 3), padding="same", dilation=(1, 2)).double()  # odd total padding: one extra row
    spec = CIMSpec(rows=12, cols=8, weight_bits=4, cell_bits=2, input_bits=3, adc_bits=4)
    layer = CIMConv2d.from_conv(conv, spec, QuantizerOptions(input_max_ones=2)).double()
    x = torch.rand(3, 5, 6, 7, dtype=torch.float64)
    layer(x)
    layer.train()
    layer.input_quantizer.keep_prob = 0.5
    eager_out, eager_grads = _run(layer, x, seed=3)
    layer.simulation = "compiled"
    with uncompiled():
        out, grads = _run(layer, x, seed=3)
    torch.testing.assert_close(out, eager_out, rtol=1e-12, atol=1e-12)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-9, atol=1e-9, msg=name)


def test_compiled_linear():
    torch.manual_seed(0)
    linear = nn.Linear(40, 7).double()
    spec = CIMSpec(rows=16, cols=6, weight_bits=4, cell_bits=2, weight_slicing="offset", input_bits=3, adc_bits=4)
    layer = CIMLinear.from_linear(linear, spec).double()
    x = torch.randn(5, 40, dtype=torch.float64)
    layer(x)
    eager_out, eager_grads = _run(layer, x)
    layer.simulation = "compiled"
    with uncompiled():
        out, grads = _run(layer, x)
    torch.testing.assert_close(out, eager_out, rtol=1e-12, atol=1e-12)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-9, atol=1e-9, msg=name)


def test_a_real_device_runs_the_eager_path_on_the_compiled_setting():
    """A chip's cells and ADC errors are drawn by the eager path only: with a device attached, ``compiled`` gives
    the eager (noisy) outputs, and with the device removed the compiled kernels run again."""
    torch.manual_seed(0)
    layer = CIMConv2d.from_conv(nn.Conv2d(3, 4, 3, padding=1).double(), CIMSpec(rows=9, cols=4)).double()
    x = torch.rand(2, 3, 5, 5, dtype=torch.float64)
    ideal = layer(x).detach()
    attach_device_(layer, DeviceSpec(programming_sigma=0.1, stuck_on_prob=0.05, seed=3))
    noisy = layer(x).detach()
    layer.simulation = "compiled"
    calls = []
    with uncompiled(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(fused, "compiled_layer", lambda *a, **k: calls.append(1) or compiled_layer(*a, **k))
        assert torch.equal(layer(x).detach(), noisy) and not calls
        attach_device_(layer, None)
        torch.testing.assert_close(layer(x).detach(), ideal, rtol=1e-12, atol=1e-12)
        assert calls
    assert not torch.allclose(noisy, ideal)


def test_simulation_switch():
    layer = CIMConv2d.from_conv(nn.Conv2d(3, 4, 3), CIMSpec())
    model = nn.Sequential(layer, nn.ReLU())
    assert layer._simulation() == fused.default_simulation() == "eager"
    assert fused.set_simulation(model, "compiled") == 1 and layer._simulation() == "compiled"
    fused.set_simulation(model, None)
    assert layer._simulation() == "eager"
    with pytest.raises(ConfigError, match="simulation='jit' is invalid"):
        fused.set_simulation(model, "jit")
    with pytest.raises(ConfigError):
        fused.set_default_simulation("fast")


def test_failed_compilation_falls_back_with_one_warning(monkeypatch):
    def broken_compile(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("no C++ compiler\nsecond line")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(fused, "COMPILE_KERNELS", True)
    monkeypatch.setattr(fused, "_compiled_kernels", {})
    monkeypatch.setattr(fused, "_compile_failure", None)
    torch.manual_seed(0)
    layer = CIMConv2d.from_conv(nn.Conv2d(3, 4, 3, padding=1), CIMSpec(rows=9, cols=4))
    x = torch.rand(2, 3, 5, 5)
    layer(x)
    eager_out, eager_grads = _run(layer, x)
    layer.simulation = "compiled"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, grads = _run(layer, x)
        again, _ = _run(layer, x)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "no C++ compiler" in messages[0] and "second line" not in messages[0]
    assert not fused.compiled_simulation_available()
    torch.testing.assert_close(out, eager_out)
    assert torch.equal(again, eager_out)  # later calls run the eager path itself


@pytest.mark.skipif(os.environ.get("CIMQ_TEST_COMPILE") != "1" or shutil.which("c++") is None,
                    reason="compiles C++ code for about 10 s: set CIMQ_TEST_COMPILE=1 (needs a C++ compiler)")
@pytest.mark.parametrize("drop_psums, asymmetric", [(False, False), (True, False), (True, True)])
def test_torch_compile_matches_uncompiled_kernels(monkeypatch, drop_psums, asymmetric):
    """Inductor's code gives the uncompiled kernels' forward bits and their gradients (one tiny layer; with QDrop
    on the ADC too; with asymmetric ADC ranges)."""
    torch.manual_seed(0)
    spec = CIMSpec(rows=20, cols=8, weight_bits=4, cell_bits=2, input_bits=3, adc_bits=3)
    layer = CIMConv2d.from_conv(nn.Conv2d(5, 3, 3, padding=1), spec, QuantizerOptions(psum_asymmetric=asymmetric))
    x = torch.rand(2, 5, 4, 4)
    layer(x)
    if asymmetric:
        assert layer.psum_quantizer.offset.abs().sum() > 0  # calibration placed the ranges
    if drop_psums:
        layer.train()
        layer.psum_quantizer.keep_prob = 0.5
    layer.simulation = "compiled"
    monkeypatch.setattr(fused, "COMPILE_KERNELS", False)
    expected_out, expected_grads = _run(layer, x)
    monkeypatch.setattr(fused, "COMPILE_KERNELS", True)
    out, grads = _run(layer, x)
    assert fused.compiled_simulation_available()
    assert torch.equal(out, expected_out)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-5,  # float32 sums reordered
                                   msg=lambda m: f"{name}: {m}")


def test_bit_sparse_projection_table_matches_binary_search():
    """The look-up-table projection onto bit-sparse codes is the nearest-code binary search, ties to the smaller."""
    for bits, max_ones, signed in [(4, 1, False), (4, 2, False), (4, 2, True), (5, 3, True), (6, 2, False)]:
        quantizer = ActivationQuantizer(bits, signed=signed, max_ones=max_ones)
        table, _ = quantizer.allowed_codes()
        midpoints = (table[1:] + table[:-1]) / 2
        qmin, qmax = quantizer.code_range
        for dtype in (torch.float32, torch.float64):
            torch.manual_seed(bits)
            values = torch.cat([torch.rand(4000, dtype=dtype) * (qmax - qmin + 4) + qmin - 2, midpoints.to(dtype),
                                midpoints.to(dtype) + 1e-6, torch.arange(qmin - 2, qmax + 3).to(dtype)])
            expected = table.to(dtype)[torch.bucketize(values, midpoints.to(dtype))]
            assert torch.equal(quantizer.project(values), expected)


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
def test_compiled_channels_last_output_takes_an_in_place_relu_with_the_eager_gradients(memory_format):
    """Any input gives a channels-last output (the next layer reads it without a copy) that is not an autograd view
    of the Function's own intermediate, so ``relu_`` after the layer (ResNet blocks) works in training, with the
    eager path's values."""
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, 3, padding=1).double()
    spec = CIMSpec(rows=16, cols=8, weight_bits=4, cell_bits=2, input_bits=3, adc_bits=4)
    layer = CIMConv2d.from_conv(conv, spec, QuantizerOptions(**OPTIONS)).double()
    x = torch.rand(2, 6, 5, 5, dtype=torch.float64).contiguous(memory_format=memory_format)
    layer(x)
    layer.train()

    def relu_after(module, inputs):
        inputs = inputs.clone().requires_grad_(True)
        out = torch.relu_(module(inputs))
        out.sum().backward()
        return out.detach(), inputs.grad

    eager_out, eager_grad = relu_after(layer, x)
    layer.simulation = "compiled"
    with uncompiled():
        out, grad = relu_after(layer, x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, eager_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, eager_grad, rtol=1e-9, atol=1e-9)


def test_the_output_offset_counts_only_while_the_adc_is_on():
    """`add_output_offset_`: zeros change nothing; a value is added per output channel with the ADC on, never to the
    float layer (quantizers off) nor to an ADC-less (ideal-ADC) layer, which gets none."""
    torch.manual_seed(0)
    conv, x = nn.Conv2d(6, 4, 3, padding=1), torch.rand(2, 6, 5, 5)
    layer = CIMConv2d.from_conv(conv, CIMSpec(rows=16, cols=8, adc_bits=3), QuantizerOptions(**OPTIONS)).eval()
    with torch.no_grad():
        before = layer(x)
        offset = layer.add_output_offset_()
        assert layer.add_output_offset_() is offset and torch.equal(layer(x), before)
        offset.copy_(torch.tensor([0.5, -0.25, 0.0, 1.0]))
        torch.testing.assert_close(layer(x), before + offset.view(1, -1, 1, 1))
        layer.set_quantizers_enabled(False)
        torch.testing.assert_close(layer(x), conv(x), rtol=1e-5, atol=1e-5)
    ideal = CIMConv2d.from_conv(conv, CIMSpec(rows=16, cols=8, adc_bits=None))
    assert ideal.add_output_offset_() is None and ideal.output_offset is None
