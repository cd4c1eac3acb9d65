"""The conventional baseline: same network and macro, conventional quantizers, 8-bit min-max ADC, measured."""

import pytest
import torch
from torch import nn

from cimq_pl.cost import baseline_options, build_baseline
from cimq_pl.quant import (
    CONVENTIONAL_OPTIONS,
    CIMSpec,
    QuantizerOptions,
    calibrate_,
    cim_layers,
    convert_to_cim,
    fold_batchnorm_,
)

# CIMQ-style choices (percentile/min-max observers: the MSE clip search is too slow for a unit test)
CIMQ_OPTIONS = QuantizerOptions(weight_granularity="array", weight_observer="percentile", input_observer="minmax",
                                input_max_ones=2, psum_granularity="array", psum_observer="percentile",
                                psum_learn_clip=True)


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    ).eval()


def converted(spec: CIMSpec) -> tuple:
    model = tiny_cnn()
    fold_batchnorm_(model)
    convert_to_cim(model, spec, options=CIMQ_OPTIONS)
    batches = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    calibrate_(model, batches)
    return model, batches


def test_baseline_is_conventional_on_the_same_macro_and_weights():
    spec = CIMSpec(rows=36, cols=16, weight_bits=4, input_bits=4, adc_bits=4, last_layer="int8")
    model, batches = converted(spec)
    before = {name: (layer.options, layer.spec, layer.weight.detach().clone()) for name, layer in cim_layers(model)}
    baseline = build_baseline(model, batches)
    pairs = list(zip(cim_layers(model), cim_layers(baseline)))
    assert [a[0] for a, _ in pairs] == [b[0] for _, b in pairs]
    for (name, layer), (_, base) in pairs:
        ideal = layer.spec.adc_bits is None  # the int8 classifier keeps its ideal ADC
        assert base.spec == (layer.spec if ideal else layer.spec.replace(adc_bits=8))
        assert base.geometry.rows == layer.geometry.rows and base.geometry.arrays_used == layer.geometry.arrays_used
        assert base.options.weight_granularity == "layer" and base.options.weight_observer == "minmax"
        assert base.options.input_observer == "minmax" and base.options.input_max_ones is None
        assert base.options.psum_granularity == "layer" and base.options.psum_observer == "minmax"
        assert not base.options.psum_learn_clip
        assert all(q.initialized for q in base.quantizers().values())  # calibrated
        assert torch.equal(base.weight, layer.weight) and base.weight.data_ptr() != layer.weight.data_ptr()
        # the configured model is untouched
        options, layer_spec, weight = before[name]
        assert layer.options == options and layer.spec == layer_spec and torch.equal(layer.weight, weight)
    assert not baseline.training
    with torch.no_grad():
        assert baseline(batches[0]).shape == (4, 4)


def test_baseline_misconfiguration():
    model, batches = converted(CIMSpec(rows=36, cols=16))
    with pytest.raises(ValueError, match=r"adc_bits=0 is invalid: expected an integer in \[1, 16\]"):
        build_baseline(model, batches, adc_bits=0)
    with pytest.raises(ValueError, match="has no CIM layer"):
        build_baseline(tiny_cnn(), batches)


def test_one_set_of_conventional_options():
    from cimq_pl.quant.techniques import CONVENTIONAL_OPTIONS as TECHNIQUES_START

    assert baseline_options() == CONVENTIONAL_OPTIONS and TECHNIQUES_START is CONVENTIONAL_OPTIONS
    assert baseline_options(True) == QuantizerOptions(**{**CONVENTIONAL_OPTIONS.__dict__, "input_signed": True})
