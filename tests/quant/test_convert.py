"""convert_to_cim, calibration, state_dict round trip, BN folding and the no-Lightning import."""

import subprocess
import sys

import pytest
import torch
from torch import nn

from cimq_pl.quant import (
    CIMConv2d,
    CIMLinear,
    CIMSpec,
    QuantizerOptions,
    calibrate_,
    cim_layers,
    convert_to_cim,
    fold_batchnorm_,
    set_collect_stats,
    set_quantizers_enabled,
)


def small_net():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    )


def _randomise_bn(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)


def test_the_core_and_the_cost_model_are_importable_without_lightning():
    """`cimq_pl` (which imports `cimq_pl.quant`) and `cimq_pl.cost` never import Lightning; the LightningModule comes
    from the package top once Lightning is there. One fresh interpreter for all of it (each start costs seconds)."""
    code = ("import sys, cimq_pl, cimq_pl.cost, cimq_pl.cost.report; from cimq_pl import CIMSpec, convert_to_cim, quantize_; "
            "assert CIMSpec is cimq_pl.quant.CIMSpec; "
            "assert 'lightning' not in sys.modules and 'pytorch_lightning' not in sys.modules, 'lightning imported'; "
            "import lightning; assert cimq_pl.CIMQModule.__name__ == 'CIMQModule'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_convert_report_and_edge_layer_modes():
    model = small_net()
    report = convert_to_cim(model, CIMSpec(rows=32, cols=8, first_layer="int8", last_layer="digital"))
    assert report.converted_names == ["0", "3"]
    assert [c.mode for c in report.converted] == ["int8", "cim"]
    assert report.skipped == [("8", "last_layer='digital': kept as the float layer")]
    assert isinstance(model[0], CIMConv2d) and model[0].spec.weight_bits == 8 and model[0].psum_quantizer is None
    assert type(model[8]) is nn.Linear
    text = str(report)
    assert "converted 2 layer(s)" in text and "int8" in text and "skipped 1" in text

    model = small_net()
    report = convert_to_cim(model, CIMSpec(), filter_fn=lambda m, name: name != "3")
    assert report.converted_names == ["0", "8"] and isinstance(model[8], CIMLinear)
    assert ("3", "rejected by filter_fn") in report.skipped


def test_converted_model_shares_parameters_and_is_exact_when_off():
    torch.manual_seed(0)
    model = small_net().eval()
    _randomise_bn(model)
    x = torch.randn(4, 3, 9, 9)
    expected = model(x)
    weight = model[3].weight
    convert_to_cim(model, CIMSpec(rows=16, cols=4))
    assert model[3].weight is weight
    set_quantizers_enabled(model, False)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_calibrate_and_state_dict_round_trip(tmp_path):
    torch.manual_seed(0)
    spec = CIMSpec(rows=16, cols=6, weight_bits=4, cell_bits=2, input_bits=4, adc_bits=5)
    options = QuantizerOptions(psum_observer="mse", input_observer="percentile")
    model = small_net().eval()
    _randomise_bn(model)
    batches = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    reference = small_net().eval()
    reference.load_state_dict(model.state_dict())
    convert_to_cim(model, spec, options=options)
    calibrate_(model, batches)
    for _, layer in cim_layers(model):
        assert all(q.initialized for q in layer.quantizers().values())
    assert model[0].input_quantizer.signed is True and model[3].input_quantizer.signed is False
    with torch.no_grad():
        model[3].psum_quantizer.theta.add_(0.1)  # learned numbers must travel too
    x = torch.randn(3, 3, 8, 8)
    out = model(x)
    torch.save(model.state_dict(), tmp_path / "cim.pt")
    convert_to_cim(reference, spec, options=options)
    reference.load_state_dict(torch.load(tmp_path / "cim.pt"))
    for _, layer in cim_layers(reference):
        assert all(q.initialized for q in layer.quantizers().values())
    assert torch.equal(reference(x), out)
    set_collect_stats(model, True)
    model(x)
    assert model[3].stats.as_dict()["images"] == 3 and model[3].stats.input_bit_density > 0


def test_fold_batchnorm_sequential():
    torch.manual_seed(0)
    model = small_net().eval()
    _randomise_bn(model)
    x = torch.randn(2, 3, 6, 6)
    expected = model(x)
    folded = fold_batchnorm_(model)
    assert folded == [("0", "1"), ("3", "4")]
    assert isinstance(model[1], nn.Identity) and isinstance(model[4], nn.Identity)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


class _UntraceableBlock(nn.Module):
    """torchvision-style residual block whose data-dependent branch defeats torch.fx (order fallback)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8)
        self.downsample = nn.Sequential(nn.Conv2d(4, 8, 1, 2, bias=False), nn.BatchNorm2d(8))

    def forward(self, x):
        if x.sum() > -1e9:  # data-dependent control flow
            identity = self.downsample(x)
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out + identity)


@pytest.mark.parametrize("block_factory", ["torchvision", "untraceable"])
def test_fold_batchnorm_residual_blocks(block_factory):
    torch.manual_seed(0)
    if block_factory == "torchvision":
        from torchvision.models.resnet import BasicBlock

        downsample = nn.Sequential(nn.Conv2d(4, 8, 1, 2, bias=False), nn.BatchNorm2d(8))
        block = BasicBlock(4, 8, stride=2, downsample=downsample)
    else:
        block = _UntraceableBlock()
    block.eval()
    _randomise_bn(block)
    x = torch.randn(2, 4, 8, 8)
    expected = block(x)
    folded = fold_batchnorm_(block)
    assert sorted(folded) == [("conv1", "bn1"), ("conv2", "bn2"), ("downsample.0", "downsample.1")]
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


def test_timm_model_fold_and_convert():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=10).eval()
    _randomise_bn(model)
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    folded = fold_batchnorm_(model)
    assert len(folded) == sum(isinstance(m, nn.Conv2d) for m in model.modules())
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)
    report = convert_to_cim(model, CIMSpec())
    assert report.converted_names[0] == "conv1.0" and report.converted_names[-1] == "fc"
    set_quantizers_enabled(model, False)
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)


def test_a_rebuilt_layer_shares_its_output_offset_where_its_new_spec_has_an_adc():
    """`rebuild_cim_layer` (techniques, the search's trials) carries a learned offset after the ADC along with the
    weight and bias; an ideal-ADC spec has no ADC for the offset to follow, so the rebuilt layer has none."""
    from cimq_pl.quant.convert import rebuild_cim_layer

    model = small_net().eval()
    convert_to_cim(model, CIMSpec(rows=32, cols=8, adc_bits=4))
    layer = model[3]
    offset = layer.add_output_offset_()
    with torch.no_grad():
        offset.fill_(0.25)
    three_bits = rebuild_cim_layer(layer, layer.spec.replace(adc_bits=3))
    assert three_bits.output_offset is offset and dict(three_bits.named_parameters())["output_offset"] is offset
    assert rebuild_cim_layer(layer, layer.spec.replace(adc_bits=None)).output_offset is None
    assert rebuild_cim_layer(model[0], model[0].spec).output_offset is None  # none learned: none added
