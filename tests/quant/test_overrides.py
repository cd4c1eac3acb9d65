"""Per-layer overrides of the macro (`cimq_pl.quant.overrides`): resolution, errors, and every consumer seeing
each layer's own spec: simulation, cost model and its baseline, the report tables (CSV / W&B), the export."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cimq_pl.cost import build_baseline, describe_layers, layer_rows
from cimq_pl.cost.report import evaluate_cost
from cimq_pl.errors import ConfigError
from cimq_pl.export import export_model, read_export
from cimq_pl.quant import CIMSpec, QuantizerOptions, calibrate_, cim_layers, convert_to_cim
from cimq_pl.quant.overrides import layer_overrides, plan_layers

NAMES = ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2", "fc"]


def test_globs_and_names_resolve_in_order_later_entries_winning_field_by_field():
    overrides = {"layer1.*.conv2": {"adc_bits": 3, "input_bits": 5}, "layer1.0.conv2": {"adc_bits": 5}}
    assert layer_overrides(NAMES, overrides) == {"layer1.0.conv2": {"adc_bits": 5, "input_bits": 5},
                                                 "layer1.1.conv2": {"adc_bits": 3, "input_bits": 5}}
    plans = {plan.name: plan for plan in plan_layers(NAMES, CIMSpec(first_layer="int8"), overrides)}
    assert plans["layer1.0.conv2"].spec == CIMSpec(first_layer="int8", adc_bits=5, input_bits=5)
    assert plans["conv1"].mode == "int8" and plans["conv1"].spec == CIMSpec(first_layer="int8").int8()
    assert plans["layer1.0.conv1"].spec == CIMSpec(first_layer="int8")  # untouched layers: the macro


def test_modes_per_layer_and_bits_on_top_of_int8():
    plans = {p.name: p for p in plan_layers(NAMES, CIMSpec(), {"conv1": {"mode": "int8", "adc_bits": 8},
                                                               "fc": {"mode": "digital"}})}
    assert plans["conv1"].mode == "int8" and plans["conv1"].spec.adc_bits == 8 and plans["conv1"].spec.input_bits == 8
    assert plans["fc"].mode == "digital" and plans["fc"].spec is None
    # an override's mode replaces the edge-layer mode of the macro
    plans = {p.name: p for p in plan_layers(NAMES, CIMSpec(last_layer="digital"), {"fc": {"mode": "cim", "adc_bits": 6}})}
    assert plans["fc"].mode == "cim" and plans["fc"].spec.adc_bits == 6


@pytest.mark.parametrize("overrides, message", [
    ({"layer9.*": {"adc_bits": 3}}, r"'layer9\.\*' matches no layer; the layers are: conv1, layer1\.0\.conv1, .*, fc$"),
    ({"fc ": {"adc_bits": 3}}, r"'fc ' matches no layer \(did you mean 'fc'\?\)"),
    ({"fc": {"adc_bit": 3}}, r"\['fc'\]: unknown field 'adc_bit' \(did you mean 'adc_bits'\?\); allowed: weight_bits, "),
    ({"fc": {"rows": 64}}, r"unknown field 'rows'.*the array geometry is the macro's"),
    ({"fc": {"adc_bits": 17}}, r"layer 'fc': CIMSpec\.adc_bits=17 is invalid: expected an integer in \[1, 16\]"),
    ({"fc": {"adc_bits": 0}}, r"CIMSpec\.adc_bits=0 is invalid"),
    ({"fc": {"dac_bits": 5}}, r"layer 'fc': CIMSpec\.dac_bits=5 is invalid: expected 1 <= dac_bits <= input_bits=4"),
    ({"fc": {"cell_bits": 6}}, r"CIMSpec\.cell_bits=6 is invalid"),
    ({"fc": {"mode": "analog"}}, r"\['fc'\]\.mode='analog' is invalid: expected one of \['cim', 'int8', 'digital'\]"),
    ({"fc": {"mode": "digital", "adc_bits": 3}}, r"'fc' is mapped 'digital'.*adc_bits cannot apply"),
    ({"fc": {}}, r"\['fc'\]=\{\} is invalid: expected a non-empty mapping"),
    (["fc"], r"expected a mapping of layer name or glob"),
])
def test_bad_overrides_are_one_line_errors_naming_the_value(overrides, message):
    with pytest.raises(ConfigError, match=message) as caught:
        plan_layers(NAMES, CIMSpec(), overrides)
    assert "\n" not in str(caught.value) and str(caught.value).startswith("model.cim_overrides")


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)).eval()


OVERRIDES = {"2": {"adc_bits": 3, "input_bits": 5}, "6": {"adc_bits": None}}


@pytest.fixture(scope="module")
def converted():
    torch.manual_seed(0)
    images = torch.rand(8, 3, 6, 6)
    model = _net()
    report = convert_to_cim(model, CIMSpec(rows=32, cols=32), options=QuantizerOptions(), overrides=OVERRIDES)
    calibrate_(model, [images])
    return model, report, images


def test_each_layer_simulates_its_own_spec(converted):
    model, report, images = converted
    layers = dict(cim_layers(model))
    assert layers["0"].spec == CIMSpec(rows=32, cols=32)
    assert layers["2"].spec == CIMSpec(rows=32, cols=32, adc_bits=3, input_bits=5)
    assert layers["2"].psum_quantizer.bits == 3 and layers["2"].input_quantizer.bits == 5
    assert layers["6"].psum_quantizer is None  # ideal ADC for that layer only
    assert [c.overrides for c in report.converted] == [{}, OVERRIDES["2"], OVERRIDES["6"]]
    assert "[override: adc_bits=3, input_bits=5]" in str(report)
    _, trace = layers["2"].simulate(torch.rand(2, 8, 6, 6), trace=True)
    assert trace["adc_codes"].max() <= 7 and trace["input_codes"].max() <= 31  # 3-bit ADC codes, 5-bit inputs


def test_cost_model_baseline_and_tables_read_each_layers_spec(converted):
    model, _, images = converted
    infos = {info.name: info for info in describe_layers(model)}
    assert (infos["0"].adc_bits, infos["2"].adc_bits, infos["6"].adc_bits) == (4, 3, None)
    assert infos["2"].input_bits == 5 and infos["2"].weight_bits == 4
    cost, _ = evaluate_cost(model, [images])
    rows = {row["layer"]: row for row in layer_rows(cost)}  # the CSV and W&B table rows of HardwareReport
    assert (rows["0"]["adc_bits"], rows["2"]["adc_bits"], rows["2"]["input_bits"]) == (4, 3, 5)
    assert rows["6"]["ideal_adc"] is True
    by_name = {layer.name: layer for layer in cost.layers}
    table = cost.table
    assert by_name["2"].energy_fj["adc"] == pytest.approx(by_name["2"].counts["adc_conversions"] * table.adc_fj(3))
    assert by_name["0"].energy_fj["adc"] == pytest.approx(by_name["0"].counts["adc_conversions"] * table.adc_fj(4))
    baseline = dict(cim_layers(build_baseline(model, [images])))  # same macro per layer, 8-bit min-max ADC
    assert baseline["2"].spec == CIMSpec(rows=32, cols=32, adc_bits=8, input_bits=5)
    assert baseline["0"].spec.adc_bits == 8 and baseline["6"].psum_quantizer is None


def test_export_manifest_carries_each_layers_spec_and_the_overrides(converted, tmp_path):
    model, _, _ = converted
    path = export_model(model, CIMSpec(rows=32, cols=32), tmp_path / "export", (3, 6, 6),
                        {"cim_overrides": OVERRIDES})
    export = read_export(path)
    layers = export.manifest["layers"]
    assert layers["2"]["spec"]["adc_bits"] == 3 and layers["2"]["adc"]["bits"] == 3
    assert layers["2"]["input"]["bits"] == 5 and layers["0"]["adc"]["bits"] == 4 and layers["6"]["adc"] is None
    assert export.cim_overrides == {"2": {"adc_bits": 3, "input_bits": 5}, "6": {"adc_bits": None}}


def test_auto_adc_ranges_resolve_by_each_layers_own_adc_bits():
    """`PartialSumClipping(observer="auto")` gives each layer the observer of its own ADC (an 8-bit override:
    min-max; the macro's 4 bits: MSE; an ideal ADC: nothing to set, recorded as MSE), and the layers record it."""
    from cimq_pl.quant.techniques import PartialSumClippingConfig, quantize_

    model = _net()
    convert_to_cim(model, CIMSpec(rows=32, cols=32, adc_bits=4), options=QuantizerOptions(),
                   overrides={"2": {"adc_bits": 8}, "6": {"adc_bits": None}})
    quantize_(model, PartialSumClippingConfig(granularity="column", observer="auto"))
    observers = {name: (layer.options.psum_observer, layer.psum_quantizer and layer.psum_quantizer.observer.method)
                 for name, layer in cim_layers(model)}
    assert observers == {"0": ("mse", "mse"), "2": ("minmax", "minmax"), "6": ("mse", None)}
