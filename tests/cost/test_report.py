"""`cost_report` and the deprecated ``python -m cimq_pl.cost.report``: the cost of a configuration without training
(``python -m cimq_pl cost``: tests/cli/test_cost_cli.py)."""

import csv
import dataclasses

import pytest
import torch

from cimq_pl.cost import EnergyTable, cost_report
from cimq_pl.cost.report import DEPRECATION, build_parser, main
from cimq_pl.errors import ConfigError
from cimq_pl.quant import CIMSpec, QuantizerOptions, cim_layers

from .test_baseline import CIMQ_OPTIONS, converted, tiny_cnn
from conftest import CIFAR10, RESNET20


def test_cost_report_of_a_float_model(capsys):
    model = tiny_cnn()
    torch.manual_seed(1)
    images = [(torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,))) for _ in range(2)]
    calibration = [torch.randn(4, 3, 8, 8)]
    report = cost_report(model, CIMSpec(rows=36, cols=16, adc_bits=4), images, calibration, CIMQ_OPTIONS,
                         title="tiny")
    assert not cim_layers(model)  # converted on a copy
    assert report.cost.images == 8 and report.baseline.images == 8
    assert [layer.adc_bits for layer in report.cost.layers] == [4, 4, 4]
    assert [layer.adc_bits for layer in report.baseline.layers] == [8, 8, 8]
    assert report.efficiency == pytest.approx(report.baseline.energy_per_image_uj / report.cost.energy_per_image_uj)
    assert 0 <= report.accuracy <= 1 and 0 <= report.baseline_accuracy <= 1
    printed = capsys.readouterr().out
    assert printed.startswith("tiny") and "total" in printed and "hardware efficiency" in printed


def test_cost_report_misconfiguration():
    images = [torch.randn(2, 3, 8, 8)]
    with pytest.raises(ConfigError, match="spec is required for a float model"):
        cost_report(tiny_cnn(), None, images, print_fn=None)
    model, _ = converted(CIMSpec(rows=36, cols=16))
    with pytest.raises(ConfigError, match="already converted: pass spec=None"):
        cost_report(model, CIMSpec(), images, print_fn=None)
    report = cost_report(model, None, images, baseline=False, table=EnergyTable(name="x"), print_fn=None)
    assert report.baseline is None and report.cost.table.name == "x"


def test_command_line_on_resnet20(tmp_path, capsys):
    layers_csv, summary_csv, picture = tmp_path / "layers.csv", tmp_path / "summary.csv", tmp_path / "energy.png"
    status = main([
        "--model", "cifar_resnet20", "--pretrained", str(RESNET20), "--data", str(CIFAR10), "--rows", "128",
        "--cols", "128", "--adc-bits", "4", "--input-max-ones", "2", "--images", "8", "--calibration-images", "8",
        "--batch-size", "8", "--weight-observer", "minmax", "--psum-observer", "minmax", "--csv", str(layers_csv), "--summary-csv", str(summary_csv), "--plot", str(picture),
    ])
    assert status == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert captured.err.splitlines()[0] == DEPRECATION and "python -m cimq_pl cost --config" in DEPRECATION
    assert "cifar_resnet20 on 128x128 arrays, W4A4 ADC 4" in printed and "layer3.2.conv2" in printed
    with open(layers_csv) as stream:
        rows = list(csv.DictReader(stream))
    with open(summary_csv) as stream:
        (summary,) = list(csv.DictReader(stream))
    assert len(rows) == 20  # 19 convs + fc
    assert sum(float(row["energy_uj"]) for row in rows) == pytest.approx(float(summary["energy_per_image_uj"]))
    assert sum(int(row["arrays"]) for row in rows) == int(summary["arrays"]) == 59
    assert float(summary["hw_efficiency_vs_baseline"]) > 1  # 4-bit ADC vs the 8-bit baseline
    assert picture.stat().st_size > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--adc-bits", "0"], "error: CIMSpec.adc_bits=0 is invalid"),
        (["--images", "0"], "error: --images=0 is invalid: expected an integer >= 1"),
        (["--energy-table", "missing.yaml"], "error: energy table 'missing.yaml' does not exist"),
        (["--weight-granularity", "tile"], "error: QuantizerOptions.weight_granularity='tile' is invalid"),
    ],
)
def test_command_line_bad_input(args, message, capsys):
    assert main(["--data", str(CIFAR10), *args]) == 2
    assert message in capsys.readouterr().err


def test_command_line_flags_are_the_dataclass_fields():
    parser = build_parser()
    flags = {option for action in parser._actions for option in action.option_strings}
    for cls in (CIMSpec, QuantizerOptions):
        for spec_field in dataclasses.fields(cls):
            assert f"--{spec_field.name.replace('_', '-')}" in flags, spec_field.name
    args = parser.parse_args(["--data", "x", "--adc-bits", "none", "--input-signed", "true", "--percentile", "99.5"])
    assert (args.adc_bits, args.input_signed, args.percentile, args.rows) == (None, True, 99.5, CIMSpec().rows)
