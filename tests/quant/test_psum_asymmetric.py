"""Asymmetric ADC ranges (``psum_asymmetric``): a learned offset z per range, in steps.

Calibration by hand, the fused and unfused conversions against each other (values and gradients, the offset's by
hand), the in-place path, a checkpoint round trip, recalibration on a switch, and the technique config. (Exactness
against the float64 reference on every simulation path is drawn by the hypothesis tests of `test_layers_exact.py`
and `test_fused.py`; export in `tests/export/test_export.py`.)
"""

import pytest
import torch
from torch import nn

from cimq_pl.objectives.base import quantizer_parameters
from cimq_pl.quant import CIMSpec, QuantizerOptions, cim_layers, convert_to_cim
from cimq_pl.quant.observers import mse_range
from cimq_pl.quant.psum import PsumQuantizer
from cimq_pl.quant.techniques import PartialSumClippingConfig, quantize_


def _calibrated(values: torch.Tensor, bits: int = 2, asymmetric: bool = True) -> PsumQuantizer:
    """One signed column whose partial sums (1 image, 1 x len(values) positions) are ``values``."""
    quantizer = PsumQuantizer(bits, granularity="column", n_columns=1, asymmetric=asymmetric)
    psums = values.view(1, 1, 1, -1)
    quantizer.observe_psums([psums], [torch.zeros(1, dtype=torch.long)], [torch.ones(1, dtype=torch.bool)])
    return quantizer


def _convert(quantizer, psums, cycle_weights=(1,), **kwargs):
    group, signed = torch.zeros(psums.shape[1], dtype=torch.long), torch.ones(psums.shape[1], dtype=torch.bool)
    return quantizer.convert_and_sum(psums, group, signed, cycle_weights, **kwargs)


def test_calibration_places_four_levels_on_four_partial_sums_by_hand():
    # 10, 20, 30, 40 at a 2-bit ADC: the range [10, 40] in steps of 10 reads them exactly. Signed codes are
    # -2 .. 1 and alpha = step x 1 (one level above 0): alpha 10, z = lo / step - qmin = 1 + 2 = 3
    values = torch.tensor([10.0, 20.0, 30.0, 40.0]).repeat(8)
    quantizer = _calibrated(values)
    assert quantizer.alpha0.flatten().tolist() == pytest.approx([10.0])
    assert quantizer.offset.flatten().tolist() == pytest.approx([3.0])
    out, _, codes = _convert(quantizer, values.view(1, 1, 1, -1), return_codes=True)
    assert torch.allclose(out.flatten(), values) and codes.flatten()[:4].tolist() == [-2, -1, 0, 1]
    symmetric = _calibrated(values, asymmetric=False)  # [-2, 1] x step cannot hold four positive levels
    assert ((_convert(symmetric, values.view(1, 1, 1, -1))[0].flatten() - values) ** 2).sum() > 100


def test_the_range_search_is_never_worse_than_the_candidate_it_is_given():
    torch.manual_seed(0)
    samples = torch.randn(6, 500) * 5 + torch.arange(6.0).view(-1, 1) * 4
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    low, high = -torch.ones(3) * 12, torch.ones(3) * 30

    def error(lo, hi):
        step = ((hi - lo) / 3)[groups].unsqueeze(1)
        quantized = torch.clamp(torch.round((samples - lo[groups].unsqueeze(1)) / step), 0, 3) * step
        return ((quantized + lo[groups].unsqueeze(1) - samples) ** 2).sum()

    chosen = mse_range(samples, groups, 3, 3, points=8, also=(low, high))
    assert (chosen[1] > chosen[0]).all() and error(*chosen) <= error(low, high)
    assert error(*chosen) < 0.8 * error(*mse_range(samples, groups, 3, 3, points=2))


@pytest.mark.parametrize("cycle_weights", [(1,), (1, 2, 4)])
def test_fused_and_unfused_conversions_agree_with_the_offset_gradient_by_hand(cycle_weights):
    torch.manual_seed(0)
    n_cycles = len(cycle_weights)
    quantizer = PsumQuantizer(3, granularity="column", n_columns=3, asymmetric=True)
    quantizer.initialized = True
    with torch.no_grad():
        quantizer.alpha0.copy_(torch.tensor([4.0, 6.0, 3.0]).view(1, 1, 3))
        quantizer.offset.copy_(torch.tensor([1.5, -0.7, 2.2]).view(1, 1, 3))
    group = torch.arange(3)
    signed = torch.tensor([True, True, False])
    psums = (torch.randn(n_cycles * 2, 3, 4, 4) * 8).round()
    results = []
    for unfused in (False, True):  # return_codes takes the unfused (autograd) path
        quantizer.zero_grad()
        p = psums.clone().requires_grad_(True)
        out, _, _ = quantizer.convert_and_sum(p, group, signed, cycle_weights, return_codes=unfused)
        out.backward(torch.ones_like(out))
        results.append((out.detach(), p.grad, quantizer.theta.grad.clone(), quantizer.offset.grad.clone()))
    for fused, plain in zip(*results):
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    # d out / d z = step x sum over clipped conversions of their cycle weight (an unclipped one does not move)
    step, qmin, qmax = quantizer.channel_params(group, signed)
    normalized = psums / step.view(1, -1, 1, 1) - quantizer.offset.detach().view(1, -1, 1, 1)
    clipped = ((normalized < qmin.view(1, -1, 1, 1)) | (normalized > qmax.view(1, -1, 1, 1))).double()
    weights = torch.tensor(cycle_weights, dtype=torch.float64).repeat_interleave(2).view(-1, 1, 1, 1)
    by_hand = (clipped * weights).sum((0, 2, 3)) * step.detach().double()
    assert clipped.sum() > 0 and (clipped.sum() < clipped.numel())
    torch.testing.assert_close(results[0][3].flatten().double(), by_hand, rtol=1e-6, atol=1e-6)
    with torch.no_grad():  # the in-place path (no gradient, psums overwritten) gives the same values
        in_place, _, _ = quantizer.convert_and_sum(psums.clone(), group, signed, cycle_weights, overwrite=True)
    torch.testing.assert_close(in_place, results[0][0], rtol=1e-6, atol=1e-6)


def _network(asymmetric: bool):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
    spec = CIMSpec(rows=16, cols=16, weight_bits=4, cell_bits=4, input_bits=4, adc_bits=2)
    convert_to_cim(model, spec, options=QuantizerOptions(psum_granularity="column", psum_asymmetric=asymmetric))
    return model


def test_offsets_learn_as_clip_parameters_and_survive_a_checkpoint():
    model = _network(True)
    x = torch.randn(4, 3, 6, 6)
    with torch.no_grad():
        model(x)  # lazy calibration
    layer = dict(cim_layers(model))["2"]
    clips = quantizer_parameters(model)["clip"]
    assert any(p is layer.psum_quantizer.offset for p in clips) and len(clips) == 4  # theta and offset per ADC
    with torch.no_grad():
        expected = model(x)
    fresh = _network(True)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)
        layer.psum_quantizer.offset.zero_()
        assert not torch.equal(model(x), expected)  # the offsets matter to the output


def test_switching_between_symmetric_and_asymmetric_ranges_needs_calibration_again():
    model = _network(False)
    with torch.no_grad():
        model(torch.randn(2, 3, 6, 6))
    layer = dict(cim_layers(model))["2"]
    assert layer.psum_quantizer.initialized and not layer.psum_quantizer.asymmetric
    quantize_(model, PartialSumClippingConfig(granularity="column", asymmetric=True))
    assert layer.psum_quantizer.asymmetric and not layer.psum_quantizer.initialized
    assert layer.options.psum_asymmetric and layer.psum_quantizer.observer.method == "mse"
    other_bits = PsumQuantizer(3, granularity="column", n_columns=1, asymmetric=True)
    calibrated = _calibrated(torch.arange(-5.0, 20.0))
    assert not other_bits.adopt_calibration_(calibrated)  # offsets are in steps of the old resolution
    same_bits = PsumQuantizer(2, granularity="column", n_columns=1, asymmetric=True)
    assert same_bits.adopt_calibration_(calibrated) and torch.equal(same_bits.offset, calibrated.offset)


def test_auto_gives_asymmetric_ranges_to_each_layer_of_at_most_two_adc_bits():
    """``asymmetric="auto"`` (the CIMQ presets') resolves by each layer's own ADC bits (`AUTO_ASYMMETRIC_MAX_ADC_BITS`
    = 2: a 2-bit override asymmetric, the macro's 3 bits and an ideal ADC not), and the layers record the result."""
    from cimq_pl.quant.psum import AUTO_ASYMMETRIC_MAX_ADC_BITS, resolve_psum_asymmetric

    assert AUTO_ASYMMETRIC_MAX_ADC_BITS == 2
    assert [resolve_psum_asymmetric("auto", bits) for bits in (1, 2, 3, 8, None)] == [True, True, False, False, False]
    assert resolve_psum_asymmetric(True, 8) and not resolve_psum_asymmetric(False, 2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 4, 3, padding=1))
    convert_to_cim(model, CIMSpec(rows=16, cols=16, adc_bits=3), options=QuantizerOptions(psum_granularity="column"),
                   overrides={"2": {"adc_bits": 2}, "4": {"adc_bits": None}})
    quantize_(model, PartialSumClippingConfig(granularity="column", asymmetric="auto"))
    shapes = {name: (layer.options.psum_asymmetric, layer.psum_quantizer and layer.psum_quantizer.asymmetric)
              for name, layer in cim_layers(model)}
    assert shapes == {"0": (False, False), "2": (True, True), "4": (False, None)}
    assert PsumQuantizer(2, asymmetric="auto").asymmetric and not PsumQuantizer(3, asymmetric="auto").asymmetric


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_an_unknown_range_shape_is_refused_naming_the_choices(bad):
    from cimq_pl.errors import ConfigError

    with pytest.raises(ConfigError, match=rf"asymmetric={bad!r} is invalid: expected one of \[False, True, 'auto'\]"):
        PartialSumClippingConfig(asymmetric=bad)
    with pytest.raises(ConfigError, match=rf"psum_asymmetric={bad!r} is invalid"):
        QuantizerOptions(psum_asymmetric=bad)
    with pytest.raises(ValueError, match=rf"asymmetric={bad!r} is invalid"):
        PsumQuantizer(2, asymmetric=bad)
