"""iter_quantizers: every quantizer of every CIM layer, in model order, optionally only some roles."""

import pytest
from torch import nn

from cimq_pl.quant import CIMSpec, cim_layers, convert_to_cim, iter_quantizers


def converted_net():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    )
    # the int8 first layer has an ideal ADC: no psum quantizer
    convert_to_cim(model, CIMSpec(rows=32, cols=8, first_layer="int8"))
    return model


def test_every_quantizer_in_model_order_then_role_order():
    model = converted_net()
    found = [(name, role) for name, role, _ in iter_quantizers(model)]
    assert found == [("0", "input"), ("0", "weight"),
                     ("2", "input"), ("2", "weight"), ("2", "psum"),
                     ("6", "input"), ("6", "weight"), ("6", "psum")]
    expected = [q for _, layer in cim_layers(model) for q in layer.quantizers().values()]
    assert all(a is b for a, (*_, b) in zip(expected, iter_quantizers(model), strict=True))
    assert model[2].psum_quantizer is next(q for name, role, q in iter_quantizers(model) if role == "psum")


def test_roles_filter_keeps_model_order():
    model = converted_net()
    assert [(n, r) for n, r, _ in iter_quantizers(model, ("psum",))] == [("2", "psum"), ("6", "psum")]
    assert [(n, r) for n, r, _ in iter_quantizers(model, ["weight", "input"])] == [
        ("0", "input"), ("0", "weight"), ("2", "input"), ("2", "weight"), ("6", "input"), ("6", "weight")]
    assert list(iter_quantizers(model, ())) == []
    assert list(iter_quantizers(nn.Linear(3, 2))) == []


def test_unknown_role_is_refused_at_the_call():
    with pytest.raises(ValueError, match=r"unknown quantizer role\(s\) \['adc'\]: expected some of"):
        iter_quantizers(converted_net(), ("input", "adc"))
