"""Gradients reach the learned quantizer numbers (LSQ steps, ADC theta, AdaRound logits)."""

import warnings

import torch
from torch import nn

from cimq_pl.quant import ActivationQuantizer, CIMConv2d, CIMSpec, PsumQuantizer, QuantizerOptions, UniformQuantizer


def test_lsq_step_gradient_matches_formula():
    quantizer = UniformQuantizer(bits=3, signed=False, grad_scaling=False)
    quantizer.initialized = True
    with torch.no_grad():
        quantizer.step.fill_(0.5)
    x = torch.tensor([0.6, 1.0, 10.0], requires_grad=True)  # inside, inside (tie), clipped at 7
    quantizer(x).sum().backward()
    # d y / d step = round(x/s) - x/s inside, qmax outside: (1 - 1.2) + (2 - 2) + 7
    assert torch.allclose(quantizer.step.grad, torch.tensor([-0.2 + 0.0 + 7.0]))
    assert torch.equal(x.grad, torch.tensor([1.0, 1.0, 0.0]))


def test_psum_theta_gets_gradient_from_unclipped_values_only():
    adc = PsumQuantizer(bits=3, n_kinds=1, granularity="layer")
    adc.initialized = True
    with torch.no_grad():
        adc.alpha0.fill_(7.0)  # unsigned: 7 levels -> step 1
    psums = torch.tensor([2.3, 4.6]).view(2, 1, 1, 1)  # 2 cycles, both inside [0, 7]
    group, signed = torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.bool)
    summed, _, _ = adc.convert_and_sum(psums, group, signed, (1, 2))
    summed.sum().backward()
    # y = step * (code_0 + 2 code_1); d y / d step = (2 - 2.3) + 2 * (5 - 4.6) = 0.5; d step/d theta = step = 1
    assert adc.theta.grad is not None and abs(float(adc.theta.grad) - 0.5) < 1e-5
    # the unfused path (used with QDrop or traces) gives the same gradient
    adc.theta.grad = None
    summed, _, codes = adc.convert_and_sum(psums, group, signed, (1, 2), return_codes=True)
    summed.sum().backward()
    assert abs(float(adc.theta.grad) - 0.5) < 1e-5 and codes.flatten().tolist() == [2.0, 5.0]


def test_cim_layer_backward_reaches_every_parameter():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 4, 3, padding=1)
    spec = CIMSpec(rows=20, cols=6, weight_bits=4, cell_bits=2, input_bits=3, adc_bits=4)
    layer = CIMConv2d.from_conv(conv, spec, QuantizerOptions(weight_rounding="adaround"))
    x = torch.rand(2, 6, 5, 5, requires_grad=True)
    layer(x)
    layer.train()
    loss = layer(x).pow(2).sum() + layer.weight_quantizer.rounding_loss(beta=4.0)
    loss.backward()
    for name, tensor in [("input step", layer.input_quantizer.step), ("weight step", layer.weight_quantizer.step),
                         ("adaround V", layer.weight_quantizer.rounding_logits), ("adc theta", layer.psum_quantizer.theta),
                         ("input", x), ("bias", conv.bias)]:
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0, name


def test_adaround_initialisation_and_hard_rounding():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 2, 1)
    layer = CIMConv2d.from_conv(conv, CIMSpec(input_bits=None, adc_bits=None), QuantizerOptions(weight_rounding="adaround"))
    wq = layer.weight_quantizer
    wq.init_from_observer(layer._weight4d())
    ratio = layer._weight4d() / wq.element_step()
    torch.testing.assert_close(wq.soft_rounding(), ratio - ratio.floor(), atol=1e-3, rtol=0)
    wq.train()
    soft = wq.codes(layer._weight4d())
    wq.eval()
    hard = wq.codes(layer._weight4d())
    assert torch.equal(hard, hard.round()) and not torch.equal(soft, soft.round())
    assert torch.equal(hard, torch.clamp(ratio.round(), -8, 7))  # h >= 0.5 is nearest rounding at init


def test_bit_sparse_codes_and_expected_ones():
    quantizer = ActivationQuantizer(bits=4, signed=False, max_ones=1)
    quantizer.initialized = True
    x = torch.tensor([0.0, 1.0, 3.0, 5.0, 6.9, 12.0, 15.0], requires_grad=True)
    codes = quantizer(x).detach()
    assert codes.tolist() == [0.0, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]  # codes with <= one 1 bit, ties to lower
    plain = ActivationQuantizer(bits=4, signed=False)
    plain.initialized = True
    expected = plain.expected_ones(torch.tensor([3.0, 2.5]))  # popcount(3) = 2; between 2 (1) and 3 (2) -> 1.5
    assert abs(float(expected.detach()) - (2 + 1.5) / 2) < 1e-6
    surrogate = plain.expected_ones(x)
    surrogate.backward()
    assert x.grad is not None and plain.step.grad is not None
    # a channels-last input (the compiled layers' outputs) gives the same surrogate and gradient, with no warning
    images = (torch.rand(2, 3, 4, 5) * 15).double()
    nchw, nhwc = images.clone().requires_grad_(True), images.contiguous(memory_format=torch.channels_last)
    nhwc.requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when bucketize copies a non-contiguous input
        values = [plain.expected_ones(t) for t in (nchw, nhwc)]
    torch.autograd.backward(values)
    torch.testing.assert_close(values[0], values[1], rtol=1e-12, atol=0)
    assert torch.equal(nchw.grad, nhwc.grad)


def test_qdrop_keeps_fp_values_in_training_only():
    torch.manual_seed(0)
    quantizer = ActivationQuantizer(bits=2, signed=False)
    quantizer.initialized = True
    quantizer.keep_prob = 0.5
    x = torch.rand(10000) * 3.3
    quantizer.train()
    mixed = quantizer(x)
    kept_fp = (mixed == x) & (x != x.round())
    assert 0.4 < kept_fp.float().mean() < 0.6
    quantizer.eval()
    assert torch.equal(quantizer(x), quantizer(x).round())


def test_qdrop_inside_cim_layer_feeds_fp_residual_in_lsb_cycle():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 3, 3, padding=1)
    layer = CIMConv2d.from_conv(conv, CIMSpec(rows=18, cols=4, weight_bits=4, input_bits=3, dac_bits=1, adc_bits=None))
    x = torch.rand(2, 4, 5, 5)
    layer(x)
    layer.train()
    layer.input_quantizer.keep_prob = 0.0  # keep probability 0: every element keeps its FP value
    dequant_w = layer.weight_quantizer(conv.weight)
    torch.testing.assert_close(layer(x), nn.functional.conv2d(x, dequant_w, conv.bias, padding=1), rtol=1e-5, atol=1e-5)
    layer.input_quantizer.keep_prob = 1.0  # always quantized
    expected = nn.functional.conv2d(layer.input_quantizer(x), dequant_w, conv.bias, padding=1)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
