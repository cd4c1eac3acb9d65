"""GPTQ rounding of CIM weights: better output error than round-to-nearest, equal to a plain column-by-column
OPTQ reference, per-row-block steps respected, the compensation wired through the layer and its state_dict."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cimq_pl.errors import ConfigError
from cimq_pl.quant import CIMConv2d, CIMLinear, CIMSpec, QuantizerOptions, calibrate_
from cimq_pl.quant.gptq import gptq_, gptq_layer_, gptq_weights
from cimq_pl.quant.hessian import HessianAccumulator, collecting_hessians
from cimq_pl.quant.techniques import GPTQRoundingConfig

FLOAT_INPUTS = dict(input_bits=None, adc_bits=None)  # the weights alone are quantized: y = conv(x, Q)


def _layer(cin=6, cout=5, kernel=3, groups=1, rows=128, weight_bits=3, granularity="channel", padding=1, **spec):
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, kernel, padding=padding, groups=groups, bias=False)
    spec = CIMSpec(rows=rows, cols=64, weight_bits=weight_bits, **{**FLOAT_INPUTS, **spec})
    layer = CIMConv2d.from_conv(conv, spec, QuantizerOptions(weight_granularity=granularity)).eval()
    layer.weight_quantizer.init_from_observer(layer._weight4d())
    return layer


def _correlated_images(n=16, channels=6, size=8):
    """Images whose channels are strongly correlated (what makes GPTQ's compensation pay)."""
    torch.manual_seed(1)
    mixing = torch.randn(channels, channels) + 2 * torch.ones(channels, channels)
    return torch.einsum("dc,nchw->ndhw", mixing, torch.randn(n, channels, size, size))


def _hessian(layer, images):
    accumulator = HessianAccumulator(layer)
    accumulator.update(images)
    return accumulator.compute()


def _codes(compensated, layer):
    qmin, qmax = layer.weight_quantizer.code_range
    step = layer.weight_quantizer.element_step().detach().double()
    return torch.clamp(torch.round(compensated / step), qmin, qmax)


def _nearest(layer):
    qmin, qmax = layer.weight_quantizer.code_range
    step = layer.weight_quantizer.element_step().detach()
    return torch.clamp(torch.round(layer._weight4d() / step), qmin, qmax) * step


def _output_error(layer, quantized, images):
    conv = dict(padding=layer.padding, groups=layer.groups)
    return (F.conv2d(images, layer._weight4d().detach(), **conv) - F.conv2d(images, quantized, **conv)).pow(2).sum()


def test_gptq_output_error_is_below_round_to_nearest():
    layer, images = _layer(), _correlated_images()
    compensated = gptq_weights(layer._weight4d(), layer.weight_quantizer.element_step(),
                               layer.weight_quantizer.code_range, _hessian(layer, images))
    gptq = (_codes(compensated, layer) * layer.weight_quantizer.element_step().detach().double()).float()
    error_gptq, error_nearest = _output_error(layer, gptq, images), _output_error(layer, _nearest(layer), images)
    assert error_gptq < 0.7 * error_nearest, (error_gptq, error_nearest)


def test_with_an_identity_hessian_gptq_is_round_to_nearest():
    layer = _layer()
    hessian = torch.eye(layer.geometry.unrolled_rows, dtype=torch.float64).unsqueeze(0)
    compensated = gptq_weights(layer._weight4d(), layer.weight_quantizer.element_step(),
                               layer.weight_quantizer.code_range, hessian)
    assert torch.equal(compensated, layer._weight4d().detach().double())  # nothing to compensate
    step = layer.weight_quantizer.element_step().detach()
    assert torch.equal(_codes(compensated, layer).float() * step, _nearest(layer))


def _reference_optq(weight, step, hessian, qmin, qmax, damp):
    """Plain OPTQ of one group, float64, column by column with the explicit inverse Hessian updated after every
    column (no Cholesky, no lazy blocks). weight, step: (outputs, rows); hessian: (rows, rows). Returns codes."""
    weight, hessian = weight.clone(), hessian.clone()
    rows = hessian.shape[0]
    dead = torch.diag(hessian) == 0
    hessian[dead, dead] = 1
    weight[:, dead] = 0
    hessian += damp * torch.mean(torch.diag(hessian)) * torch.eye(rows, dtype=torch.float64)
    inverse = torch.linalg.inv(hessian)
    codes = torch.zeros_like(weight)
    for j in range(rows):
        codes[:, j] = torch.clamp(torch.round(weight[:, j] / step[:, j]), qmin, qmax)
        error = (weight[:, j] - codes[:, j] * step[:, j]) / inverse[j, j]
        weight[:, j + 1:] -= error[:, None] * inverse[j, j + 1:][None, :]
        inverse = inverse - torch.outer(inverse[:, j], inverse[j, :]) / inverse[j, j]  # drop row/column j
    return codes


@pytest.mark.parametrize("block_size", [5, 128])
def test_gptq_equals_a_plain_column_by_column_reference(block_size):
    layer = _layer(cin=6, cout=4, groups=2, granularity="array_channel", rows=9)  # 2 groups, 3x3 rows per array
    images = _correlated_images()
    images[:, 1] = 0  # a dead input channel: its rows' H_ii = 0
    hessian = _hessian(layer, images)
    assert (torch.diagonal(hessian, dim1=-2, dim2=-1) == 0).sum() == 9
    quantizer = layer.weight_quantizer
    compensated = gptq_weights(layer._weight4d(), quantizer.element_step(), quantizer.code_range, hessian,
                               damp=0.01, block_size=block_size)
    codes = _codes(compensated, layer).reshape(2, 2, -1)
    weight = layer._weight4d().detach().double().reshape(2, 2, -1)
    step = quantizer.element_step().detach().double().reshape(2, 2, -1)
    for g in range(2):
        reference = _reference_optq(weight[g], step[g], hessian[g], *quantizer.code_range, 0.01)
        assert torch.equal(codes[g], reference), g
    assert (codes != torch.clamp(torch.round(weight / step), *quantizer.code_range)).any()  # not RTN


def test_gptq_uses_each_row_blocks_own_step():
    # 4 input channels of 3x3 on 18-row arrays: 2 channels (18 rows) per row block, 2 row blocks
    layer = _layer(cin=4, cout=3, rows=18, granularity="array")
    quantizer = layer.weight_quantizer
    assert layer.geometry.n_row_blocks == 2 and quantizer.step.shape == (1, 2, 1)
    with torch.no_grad():
        quantizer.step.copy_(torch.tensor([0.02, 0.1]).view(1, 2, 1))  # block 0 fine (and clipping), block 1 coarse
    images = _correlated_images(channels=4)
    gptq_layer_(layer, _hessian(layer, images))
    codes = quantizer.codes(layer._weight4d()).detach()
    qmin, qmax = quantizer.code_range
    assert codes.min() >= qmin and codes.max() <= qmax and torch.equal(codes, torch.round(codes))
    assert (codes == qmin).any() or (codes == qmax).any()  # the fine block clips
    dequantized = quantizer(layer._weight4d()).detach()
    block0, block1 = dequantized[:, :2], dequantized[:, 2:]  # channels 0-1: row block 0, channels 2-3: row block 1
    assert torch.allclose(block0 / 0.02, torch.round(block0 / 0.02), atol=1e-4)
    assert torch.allclose(block1 / 0.1, torch.round(block1 / 0.1), atol=1e-4)
    assert not torch.allclose(block0 / 0.1, torch.round(block0 / 0.1), atol=1e-3)
    assert _output_error(layer, dequantized, images) < _output_error(layer, _nearest(layer), images)


def test_the_layer_rounds_the_compensated_weights_and_keeps_its_own():
    layer, images = _layer(), _correlated_images()
    weight = layer._weight4d().detach().clone()
    hessian = _hessian(layer, images)
    gptq_layer_(layer, hessian)
    quantizer = layer.weight_quantizer
    compensated = gptq_weights(weight, quantizer.element_step(), quantizer.code_range, hessian)
    assert torch.equal(layer._weight4d(), weight)  # the float weights are the original ones
    assert torch.equal(quantizer.codes(weight), _codes(compensated, layer).float())  # GPTQ's codes, bit for bit
    expected = F.conv2d(images, _codes(compensated, layer).float() * quantizer.element_step().detach(), padding=1)
    assert torch.allclose(layer(images), expected, atol=1e-4)
    layer.set_quantizers_enabled(False)
    assert torch.equal(layer(images), F.conv2d(images, weight, padding=1))  # the float layer is untouched


def test_the_compensation_survives_the_state_dict_and_goes_with_new_steps():
    layer, images = _layer(), _correlated_images()
    gptq_layer_(layer, _hessian(layer, images))
    fresh = _layer()
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.weight_quantizer.compensation, layer.weight_quantizer.compensation)
    assert torch.equal(fresh(images), layer(images))
    fresh.set_options(QuantizerOptions(weight_granularity="channel", weight_rounding="adaround"))  # same steps
    fresh.eval()  # hard AdaRound decisions, started from frac((w + compensation) / s): GPTQ's codes
    assert torch.equal(fresh.weight_quantizer.compensation, layer.weight_quantizer.compensation)
    assert torch.equal(fresh.weight_quantizer.codes(fresh._weight4d()), layer.weight_quantizer.codes(layer._weight4d()))
    fresh.weight_quantizer.init_from_observer(fresh._weight4d())  # new steps: the compensation no longer applies
    assert not fresh.weight_quantizer.compensated


def test_baking_adaround_decisions_takes_the_compensation_into_the_weights():
    layer, images = _layer(), _correlated_images()
    layer.set_options(QuantizerOptions(weight_granularity="channel", weight_rounding="adaround"))
    layer.eval()
    gptq_layer_(layer, _hessian(layer, images))
    quantizer = layer.weight_quantizer
    quantizer.init_rounding(layer._weight4d())
    before = quantizer(layer._weight4d()).detach()  # eval: hard AdaRound decisions, from GPTQ's W'
    quantizer.bake_rounding_(layer.weight.data)
    assert not quantizer.compensated
    assert torch.allclose(layer._weight4d(), before) and torch.allclose(_nearest(layer), before)  # QAT's rounding


def test_calibrate_runs_gptq_for_gptq_layers_only_between_weights_and_adc():
    torch.manual_seed(0)
    spec = CIMSpec(rows=16, cols=16, weight_bits=3, input_bits=4, adc_bits=5)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1), nn.Flatten(),
                          nn.Linear(4 * 36, 5))
    options = QuantizerOptions(weight_rounding="gptq")
    model[0] = CIMConv2d.from_conv(model[0], spec, options)
    model[2] = CIMConv2d.from_conv(model[2], spec, options)
    model[4] = CIMLinear.from_linear(model[4], spec, QuantizerOptions())  # round-to-nearest
    images = [torch.randn(8, 3, 6, 6) for _ in range(2)]
    report = calibrate_(model.eval(), images)
    assert report.layers == ("0", "2") and report.seconds >= 0
    assert model[0].weight_quantizer.compensated and model[2].weight_quantizer.compensated
    assert not model[4].weight_quantizer.compensated
    assert model[2].psum_quantizer.initialized
    # the first layer's Hessian is its quantized images'; recomputing it gives the same rounding, not a second one
    with collecting_hessians({"0": model[0]}) as accumulators:
        for batch in images:
            model(batch)
    float_inputs = HessianAccumulator(model[0])
    model[0].input_quantizer.enabled = False
    float_inputs.update(torch.cat(images))
    model[0].input_quantizer.enabled = True
    assert not torch.allclose(float_inputs.compute(), accumulators["0"].compute())  # H of the quantized inputs
    compensation = model[0].weight_quantizer.compensation.clone()
    gptq_layer_(model[0], accumulators["0"].compute())
    assert torch.equal(model[0].weight_quantizer.compensation, compensation)
    assert calibrate_(nn.Sequential(CIMLinear.from_linear(nn.Linear(4, 2), spec)), [torch.randn(3, 4)]) is None


def test_gptq_of_a_linear_layer_and_by_name():
    torch.manual_seed(0)
    layer = CIMLinear.from_linear(nn.Linear(12, 3), CIMSpec(rows=8, cols=16, weight_bits=3, **FLOAT_INPUTS))
    model = nn.Sequential(layer)
    x = torch.randn(40, 12) @ (torch.randn(12, 12) + 1)
    layer.weight_quantizer.init_from_observer(layer._weight4d())
    report = gptq_(model, [x], layers=["0"])
    assert report.layers == ("0",) and layer.weight_quantizer.compensated
    nearest = _nearest(layer).view(3, 12)
    gptq = layer.weight_quantizer(layer._weight4d()).detach().view(3, 12)
    assert ((x @ (layer.weight - gptq).T).pow(2).sum() < (x @ (layer.weight - nearest).T).pow(2).sum())


@pytest.mark.parametrize("build,message", [
    (lambda: QuantizerOptions(weight_rounding="optq"),
     r"QuantizerOptions.weight_rounding='optq' is invalid: expected one of \['nearest', 'adaround', 'gptq'\]"),
    (lambda: GPTQRoundingConfig(damp=-0.1), r"damp=-0.1 is invalid: expected a number >= 0"),
])
def test_bad_gptq_values_name_what_is_allowed(build, message):
    with pytest.raises(ConfigError, match=message):
        build()
