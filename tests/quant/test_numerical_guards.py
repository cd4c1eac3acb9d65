"""Numerical guards: a NaN/inf loss names its block and quantizer; collapsed ranges never divide by zero."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cimq_pl.objectives import BlockReconstruction, TaskObjective
from cimq_pl.quant import CIMSpec, QuantizerOptions, calibrate_, cim_layers, convert_to_cim, set_quantizers_enabled
from cimq_pl.quant.diagnostics import explain_nonfinite, first_nonfinite_layer, nonfinite_quantizer_tensors
from cimq_pl.quant.layers import _CIMLayerBase
from cimq_pl.quant.reconstruction import find_blocks

SPEC = CIMSpec(rows=16, cols=16, weight_bits=4, input_bits=4, dac_bits=1, adc_bits=4)


class _Recorder:
    """What an objective needs of a LightningModule: ``log``, ``model``, ``current_epoch`` and a forward."""

    def __init__(self, model: nn.Module):
        self.model, self.current_epoch = model, 0

    def __call__(self, images):
        return self.model(images)

    def log(self, *args, **kwargs):
        pass


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x))


def _net() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(_Block(3, 8), _Block(8, 8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    convert_to_cim(model, SPEC, options=QuantizerOptions(weight_rounding="adaround"))
    images = torch.rand(16, 3, 8, 8)
    calibrate_(model, [images])
    return model, images


def test_nan_step_size_stops_reconstruction_naming_block_and_quantizer():
    model, images = _net()
    blocks = find_blocks(model, lambda m: isinstance(m, _CIMLayerBase))
    objective = BlockReconstruction(iters_per_block=10, batch_size=4)
    objective.attach(blocks)
    objective.start_unit(1)
    objective.cache_block_io(model, images)
    loss = objective.training_step(_Recorder(model), None, 10)  # unit 1, step 0: finite before the fault
    assert torch.isfinite(loss)
    with torch.no_grad():
        model[1].conv.input_quantizer.step.fill_(float("nan"))
    with pytest.raises(FloatingPointError) as error:
        objective.training_step(_Recorder(model), None, 11)
    message = str(error.value)
    assert "block '1' at step 1" in message
    assert "quantizer 1.conv.input_quantizer.step hold" in message


def test_nan_clip_stops_qat_naming_the_quantizer():
    """A NaN ADC clip does not even reach the loss (every code collapses to one finite value): caught anyway."""
    model, images = _net()
    with torch.no_grad():
        model[0].conv.psum_quantizer.theta.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"quantizer 0\.conv\.psum_quantizer\.theta hold"):
        TaskObjective().training_step(_Recorder(model), (images, torch.zeros(16, dtype=torch.long)), 3)


def test_non_finite_input_is_traced_to_the_first_cim_layer():
    """(Quantized inputs clamp NaN/inf to codes; with the input quantizers off the NaN flows and is traced.)"""
    model, images = _net()
    set_quantizers_enabled(model, False)
    images[0, 0, 0, 0] = float("nan")
    assert nonfinite_quantizer_tensors(model) == []
    assert first_nonfinite_layer(model, images) == "0.conv (its input was already)"
    assert "CIM layer 0.conv" in explain_nonfinite(model, images)


@pytest.mark.parametrize("observer", ["minmax", "percentile", "mse"])
def test_collapsed_ranges_dead_channel_and_zero_input_stay_finite(observer):
    """A dead output channel (all-zero weights) and all-zero activations: no division by zero anywhere."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 6, 3, padding=1)
    with torch.no_grad():
        conv.weight[2].zero_()  # dead channel: its weight range is 0
    model = nn.Sequential(conv)
    options = QuantizerOptions(weight_observer=observer, input_observer=observer, psum_observer=observer,
                               weight_granularity="channel")
    convert_to_cim(model, SPEC, options=options)
    zeros = torch.zeros(4, 8, 6, 6)
    calibrate_(model, [zeros])  # the input and partial-sum ranges collapse to zero
    layer = cim_layers(model)[0][1]
    for quantizer in layer.quantizers().values():
        for name, tensor in [*quantizer.named_parameters(), *quantizer.named_buffers()]:
            if tensor.is_floating_point():
                assert torch.isfinite(tensor).all(), name
    x = torch.zeros(2, 8, 6, 6, requires_grad=True)
    out = model(x)
    assert torch.isfinite(out).all()
    assert torch.equal(out, conv.bias.detach().view(1, -1, 1, 1).expand_as(out))  # zero input -> bias only
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    y = model(torch.rand(2, 8, 6, 6))  # real data through the collapsed quantizers: finite, dead channel = bias
    assert torch.isfinite(y).all()
    assert torch.allclose(y[:, 2], conv.bias[2].detach().expand_as(y[:, 2]))
