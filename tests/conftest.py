"""Shared fixtures: paths to the real data and weights in ../shared, and an offline, quiet W&B."""

from __future__ import annotations

import os
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n 2` on 2 cores: one thread per worker (and per subprocess a test starts), else the two workers'
    # OpenMP threads oversubscribe the cores and each runs many times slower
    os.environ["OMP_NUM_THREADS"] = "1"


def _keep_freed_buffers() -> None:
    """glibc's allocator setting of the README's speed section (`cimq_pl.cpu_runtime`), in this process and the ones
    tests start: keep freed buffers instead of handing those above 32 MiB (a layer's partial sums) back to the system
    and faulting them in again on the next batch (about 15% of a short CLI fit's time here). Nothing changes but
    speed."""
    from cimq_pl.cpu_runtime import MALLOC_ENVIRONMENT, set_malloc_options

    for name, value in MALLOC_ENVIRONMENT.items():  # read by glibc when a subprocess starts
        os.environ.setdefault(name, value)
    set_malloc_options()


_keep_freed_buffers()

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CIMQ_SHARED", REPO.parent / "shared")).resolve()
CIFAR10 = SHARED / "data" / "cifar10_lossless"
CIFAR100_SAMPLE = SHARED / "data" / "cifar100_sample.npz"
RESNET20 = SHARED / "weights" / "resnet20-12fca82f.th"
RESNET32 = SHARED / "weights" / "resnet32-d509ac18.th"
RESNET56_C100 = SHARED / "weights" / "cifar100_resnet56-f2eff4c8.pt"


def small_cim_module(objective=None):
    """A two-conv CIM network (W4A4, ADC 4) in the shape the objectives read: ``model``, ``parameters``,
    ``trainer`` (None) and ``objective``."""
    import types

    from torch import nn

    from cimq_pl.quant import CIMSpec, QuantizerOptions, convert_to_cim

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    convert_to_cim(model, CIMSpec(weight_bits=4, input_bits=4, adc_bits=4), options=QuantizerOptions())
    return types.SimpleNamespace(model=model, parameters=model.parameters, trainer=None, objective=objective)


def preset_resnet20(images, pretrained: Path | None = None, dropping: bool = True):
    """ResNet-20 (BN folded; ``pretrained`` weights, else random ones drawn with seed 0) on 128x128 arrays with the
    PTQ preset's quantizers: ``int8`` edge layers, AdaRound, bit-sparse input codes at twice the calibrated step,
    arraywise weight scales, learned ADC clips and QDrop (unless not ``dropping``), calibrated on ``images``."""
    import torch

    from cimq_pl.models import create_model
    from cimq_pl.quant import CIMSpec, QuantizerOptions, calibrate_, convert_to_cim
    from cimq_pl.quant.fold import fold_batchnorm_
    from cimq_pl.quant.techniques import (ArraywiseWeightConfig, BitSparseActivationConfig,
                                          PartialSumClippingConfig, QuantDroppingConfig, quantize_)

    torch.manual_seed(0)
    model = create_model("cifar_resnet20", 10, str(pretrained) if pretrained else False).eval()
    fold_batchnorm_(model)
    convert_to_cim(model, CIMSpec(first_layer="int8", last_layer="int8"),
                   options=QuantizerOptions(weight_rounding="adaround"))
    for config in (BitSparseActivationConfig(max_ones=None, step_scale=2.0), ArraywiseWeightConfig(),
                   PartialSumClippingConfig(), *([QuantDroppingConfig()] if dropping else [])):
        quantize_(model, config)
    calibrate_(model, [images])
    return model


def csv_rows(path: Path) -> list[dict]:
    """The rows of the CSV file ``path`` (a header line, then one dict per row)."""
    import csv

    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


@pytest.fixture(autouse=True)
def _offline_wandb(monkeypatch, tmp_path):
    """Every test: no W&B key, offline mode, nothing written outside tmp_path, runs closed afterwards."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    yield
    import sys

    if "wandb" in sys.modules:
        sys.modules["wandb"].finish()


@pytest.fixture
def run_cli(tmp_path, monkeypatch):
    """Run the CLI in-process from the repo root, logging into tmp_path; returns the LightningCLI object."""
    from cimq_pl.cli import CIMQCLI

    monkeypatch.chdir(REPO)
    monkeypatch.setattr("sys.argv", ["cimq_pl"])

    def run(*args: str):
        import sys

        if "wandb" in sys.modules:  # one W&B run per CLI call, as in separate processes
            sys.modules["wandb"].finish()
        extra = ["--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"]
        return CIMQCLI(args=[*args, *extra])

    return run
