"""`HardwareReport` end to end: a real Trainer, W&B offline, CIFAR-10 images and pretrained ResNet-20 weights."""

import csv
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import WandbLogger

from cimq_pl import CIMQModule
from cimq_pl.callbacks.hardware_report import HardwareReport
from cimq_pl.cost import evaluate_cost
from cimq_pl.datamodules import CIFAR10DataModule
from cimq_pl.errors import ConfigError
from cimq_pl.quant import CIMSpec, calibrate_

from conftest import CIFAR10, RESNET20
from wandb_reader import logged_metrics, read_records

SPEC = CIMSpec(rows=128, cols=128, weight_bits=4, input_bits=4, adc_bits=4)


def _setup(calibration_size=8, batch=8):
    datamodule = CIFAR10DataModule(root=str(CIFAR10), batch_size=batch, eval_batch_size=batch, num_workers=0,
                                   calibration_size=calibration_size)
    module = CIMQModule(name="cifar_resnet20", num_classes=10, pretrained=str(RESNET20), cim=SPEC)
    calibrate_(module.model, [images for images, _ in datamodule.calibration_dataloader()])
    return datamodule, module


def _history_when_closed(run_file: Path, timeout_s: float = 20.0) -> dict:
    """The run's history once its file holds the closing ``exit`` record (wandb-core writes asynchronously)."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = read_records(run_file)
        if (records and records[-1].WhichOneof("record_type") == "exit") or time.monotonic() > deadline:
            return logged_metrics(run_file)
        time.sleep(0.2)


def _trainer(tmp_path, callback, **kwargs):
    return Trainer(accelerator="cpu", devices=1, logger=WandbLogger(save_dir=str(tmp_path), offline=True),
                   callbacks=[callback], enable_progress_bar=False, enable_model_summary=False, **kwargs)


def test_test_run_logs_energy_tops_density_and_efficiency(tmp_path, capsys):
    datamodule, module = _setup(calibration_size=8, batch=8)
    report = HardwareReport(baseline_calibration_images=8)
    trainer = _trainer(tmp_path, report, limit_test_batches=2)
    trainer.test(module, datamodule=datamodule)

    result = report.last_results["test"]
    cost, baseline = result["cost"], result["baseline"]
    assert cost.images == 16 and baseline.images == 16  # 2 batches of 8
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert logged["test/energy_per_image_uj"] == pytest.approx(cost.energy_per_image_uj, rel=1e-6)
    assert logged["test/tops_per_w"] == pytest.approx(cost.tops_per_w, rel=1e-6)
    assert logged["test/bit_density"] == pytest.approx(cost.bit_density, rel=1e-6)
    assert logged["test/adc_energy_share"] == pytest.approx(cost.share("adc"), rel=1e-6)
    assert logged["test/baseline_energy_per_image_uj"] == pytest.approx(baseline.energy_per_image_uj, rel=1e-6)
    assert logged["test/hw_efficiency_vs_baseline"] == pytest.approx(
        baseline.energy_per_image_uj / cost.energy_per_image_uj, rel=1e-6)
    assert 0 < logged["test/bit_density"] < 1 and 0 < logged["test/baseline_bit_density"] < 1
    assert logged["test/hw_efficiency_vs_baseline"] > 1  # a 4-bit ADC against the 8-bit baseline
    # TOPS/W = 2 x MACs / energy; ResNet-20 has 40.55 M MACs per 32x32 image on its 20 CIM layers
    assert cost.macs_per_image == pytest.approx(4.055e7, rel=1e-3)
    assert logged["test/tops_per_w"] == pytest.approx(2 * cost.macs_per_image / (cost.energy_per_image_uj * 1e9) * 1e3)

    # the per-batch accumulation equals one pass over the same 16 test images outside the trainer
    images = [batch for _, batch in zip(range(2), datamodule.test_dataloader())]
    direct, _ = evaluate_cost(module.model, images, report.table)
    assert direct.energy_per_image_uj == pytest.approx(cost.energy_per_image_uj, rel=1e-9)
    assert direct.bit_density == pytest.approx(cost.bit_density, rel=1e-9)

    # files in the W&B run folder: the per-layer CSV sums to the logged total
    folder = Path(result["folder"])
    with open(folder / "hardware_test_layers.csv") as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == 20 and rows[0]["layer"] == "conv1" and rows[-1]["layer"] == "fc"
    assert sum(float(row["energy_uj"]) for row in rows) == pytest.approx(logged["test/energy_per_image_uj"], rel=1e-6)
    assert sum(int(row["arrays"]) for row in rows) == 59
    with open(folder / "hardware_test_summary.csv") as stream:
        (summary,) = list(csv.DictReader(stream))
    assert float(summary["accuracy"]) == pytest.approx(logged["test/acc"])
    assert float(summary["hw_efficiency_vs_baseline"]) == pytest.approx(logged["test/hw_efficiency_vs_baseline"], rel=1e-6)
    assert (folder / "hardware_test_energy.png").read_bytes()[:4] == b"\x89PNG"
    files = ", ".join(str(folder / f"hardware_test_{name}") for name in ("layers.csv", "summary.csv", "energy.png"))
    assert report.output_files() == [("hardware report (test)", files)]  # the CLI's closing line

    # what reached the W&B run file: the scalars, the table and the picture
    import wandb

    wandb.finish()
    (run_file,) = folder.parent.glob("run-*.wandb")
    history = _history_when_closed(run_file)
    assert history["test/energy_per_image_uj"] == pytest.approx(logged["test/energy_per_image_uj"])
    assert history["test/hw_efficiency_vs_baseline"] == pytest.approx(logged["test/hw_efficiency_vs_baseline"])
    assert history["test/hardware_layers/_type"] == "table-file"
    assert history["test/hardware_layers/nrows"] == 20
    assert history["test/energy_breakdown/_type"] == "images/separated"

    # the calibrated baseline is reused while the weights are unchanged, rebuilt after an in-place update
    cached = report._baseline[1]
    assert report._baseline_for(module.model, trainer, module.device) is cached
    with torch.no_grad():
        module.model.conv1.weight.mul_(1.0)
    assert report._baseline_for(module.model, trainer, module.device) is not cached

    printed = capsys.readouterr().out
    assert "[cimq] hardware cost, test (16 images)" in printed and "hardware efficiency" in printed


def test_validate_run_logs_val_metrics_into_output_dir(tmp_path):
    datamodule, module = _setup(calibration_size=8, batch=8)
    report = HardwareReport(baseline=False, output_dir=str(tmp_path / "out"), plots=False, print_table=False)
    trainer = _trainer(tmp_path, report, limit_val_batches=1)
    trainer.validate(module, datamodule=datamodule)
    logged = trainer.callback_metrics
    assert float(logged["val/energy_per_image_uj"]) == pytest.approx(
        report.last_results["val"]["cost"].energy_per_image_uj, rel=1e-6)
    assert "val/hw_efficiency_vs_baseline" not in logged
    assert (tmp_path / "out" / "hardware_val_layers.csv").is_file()
    assert not (tmp_path / "out" / "hardware_val_energy.png").exists()
    assert not any(layer.collect_stats for layer in module.model.modules() if hasattr(layer, "collect_stats"))


def test_float_model_warns_and_logs_nothing(tmp_path):
    datamodule = CIFAR10DataModule(root=str(CIFAR10), eval_batch_size=8, num_workers=0)
    module = CIMQModule(name="cifar_resnet20", num_classes=10, pretrained=str(RESNET20))
    trainer = _trainer(tmp_path, HardwareReport(baseline=False), limit_test_batches=1)
    with pytest.warns(UserWarning, match="the model has no CIM layer"):
        trainer.test(module, datamodule=datamodule)
    assert "test/energy_per_image_uj" not in trainer.callback_metrics


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"energy_table": "no/such.yaml"}, r"energy table 'no/such.yaml' does not exist"),
        ({"baseline_adc_bits": 0}, r"baseline_adc_bits=0 is invalid: expected an integer in \[1, 16\]"),
        ({"baseline_batches": 0}, r"baseline_batches=0 is invalid: expected an integer >= 1 or null"),
        ({"baseline_calibration_images": -4}, r"baseline_calibration_images=-4 is invalid"),
        ({"output_dir": ""}, r"output_dir='' is invalid: expected a folder path or null"),
    ],
)
def test_misconfiguration(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        HardwareReport(**kwargs)


def test_baseline_needs_a_calibration_subset(tmp_path):
    module = CIMQModule(name="cifar_resnet20", num_classes=10, cim=SPEC)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(2, 3, 32, 32), torch.zeros(2).long()))
    trainer = _trainer(tmp_path, HardwareReport(), limit_test_batches=1)
    with pytest.raises(ConfigError, match="needs a cimq_pl datamodule with calibration_dataloader"):
        trainer.test(module, dataloaders=loader)
