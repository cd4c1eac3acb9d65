"""``python -m cimq_pl cost``: the cost report from the run's config files, equal to `cost_report`'s numbers."""

from __future__ import annotations

import csv

import pytest
import timm.data
import torch

from cimq_pl.cost import cost_report
from cimq_pl.cost.report import first_images
from cimq_pl.datamodules import CIFAR10DataModule
from cimq_pl.models import create_model
from cimq_pl.quant import CONVENTIONAL_OPTIONS, CIMSpec
from conftest import CIFAR10, REPO, RESNET20

TINY = ["--data.root", str(CIFAR10), "--model.pretrained", str(RESNET20), "--data.init_args.calibration_size", "8",
        "--data.init_args.eval_batch_size", "8", "--data.init_args.num_workers", "0", "--images", "8"]
CONVENTIONAL = ["--config", "configs/resnet20_cifar10.yaml", "--config", "configs/quant/conventional.yaml"]


def _reference():
    """`cost_report` on the float model with conventional.yaml's macro, on the same 8 + 8 images."""
    model = create_model("cifar_resnet20", 10, str(RESNET20)).eval()
    config = timm.data.resolve_model_data_config(model)
    data = CIFAR10DataModule(root=str(CIFAR10), eval_batch_size=8, num_workers=0, calibration_size=8,
                             mean=tuple(config["mean"]), std=tuple(config["std"]))
    images = first_images(data.test_dataloader(), 8, torch.device("cpu"))
    calibration = first_images(data.calibration_dataloader(), 8, torch.device("cpu"))
    spec = CIMSpec(rows=128, cols=128, weight_bits=4, input_bits=4, dac_bits=1, adc_bits=4, first_layer="int8",
                   last_layer="int8")
    return cost_report(model, spec, images, calibration, CONVENTIONAL_OPTIONS, print_fn=None)


def test_cost_subcommand_prints_what_cost_report_measures(run_cli, tmp_path, capsys):
    cli = run_cli("cost", *CONVENTIONAL, *TINY, "--output_dir", str(tmp_path / "cost"))
    printed = capsys.readouterr().out
    reference = _reference()

    title = ("[cimq] hardware cost of cifar_resnet20 on 128x128 arrays, W4A4 ADC 4, conventional quantizers, "
             "calibration only (8 train images), 8 test images")
    assert reference.format(title) in printed  # the same table, totals, baseline line and accuracies
    with open(tmp_path / "cost" / "hardware_cost_summary.csv") as stream:
        (summary,) = list(csv.DictReader(stream))
    assert float(summary["energy_per_image_uj"]) == reference.cost.energy_per_image_uj  # exactly
    assert float(summary["baseline_energy_per_image_uj"]) == reference.baseline.energy_per_image_uj
    assert float(summary["bit_density"]) == reference.cost.bit_density
    assert float(summary["hw_efficiency_vs_baseline"]) == reference.efficiency > 1
    assert int(summary["images"]) == 8 and int(summary["arrays"]) == 59
    with open(tmp_path / "cost" / "hardware_cost_layers.csv") as stream:
        assert [row["layer"] for row in csv.DictReader(stream)] == [layer.name for layer in reference.cost.layers]
    assert (tmp_path / "cost" / "hardware_cost_energy.png").stat().st_size > 0
    assert not list(tmp_path.glob("wandb")) and cli.trainer.loggers == []  # a cost estimate starts no W&B run


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([*CONVENTIONAL, "--images", "0"], "error: cost: images=0 is invalid: expected an integer >= 1"),
        ([*CONVENTIONAL, "--images", "many"], 'error: Parser key "images": Expected a <class \'int\'>'),
        (["--config", "configs/resnet20_cifar10.yaml"], "error: cost needs a CIM macro: set model.cim"),
    ],
)
def test_cost_subcommand_bad_argument_is_one_error_line(args, message, capsys, monkeypatch, tmp_path):
    from cimq_pl.cli import main

    monkeypatch.chdir(REPO)
    monkeypatch.setattr("sys.argv", ["cimq_pl"])
    with pytest.raises(SystemExit) as exit_info:
        main(["cost", *args, "--data.root", str(CIFAR10), "--model.pretrained", str(RESNET20),
              "--trainer.logger.init_args.save_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert [line for line in err.splitlines() if line.startswith("error:")] == [err.splitlines()[-1]]
    assert message in err and "Traceback" not in err
