"""A normal run prints no noise that reads like a defect, and genuine warnings still come through."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

from lightning.fabric.utilities.warnings import PossibleUserWarning

from cimq_pl.quiet import quiet
from conftest import CIFAR10, REPO, RESNET20

# what Lightning, torch and W&B printed on a plain `test` / a short PTQ `fit` before cimq_pl.quiet
NOISE = (
    "💡 Tip:",
    "litlogger",
    "litmodels",
    "`isinstance(treespec, LeafSpec)` is deprecated",
    "The anonymous setting has no effect",
    "git root",
    "is smaller than the logging interval",
    "`weights_only` was not set",
)


def _run(tmp_path, *args: str) -> str:
    """``python -m cimq_pl *args`` as a user runs it (no W&B key, W&B not silenced), logging into a new folder."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env["NETRC"] = str(tmp_path / "no-netrc")
    cmd = [sys.executable, "-m", "cimq_pl", *args, "--data.root", os.path.relpath(CIFAR10, REPO),
           "--model.pretrained", os.path.relpath(RESNET20, REPO), "--trainer.enable_progress_bar", "false",
           "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")]  # not there yet: W&B's "git root" case
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout + out.stderr


def test_plain_test_prints_no_noise(tmp_path):
    printed = _run(tmp_path, "test", "--config", "configs/resnet20_cifar10.yaml", "--trainer.limit_test_batches", "2")
    assert [noise for noise in NOISE if noise in printed] == []
    for kept in ("test/acc", "GPU available", "W&B syncing is set to `offline`"):  # what a user needs stays
        assert kept in printed, kept


def test_short_ptq_fit_prints_no_noise(tmp_path):
    printed = _run(tmp_path, "fit", "--config", "configs/resnet20_cifar10.yaml", "--config",
                   "configs/quant/conventional.yaml", "--data.init_args.calibration_size", "32",
                   "--data.init_args.eval_batch_size", "50", "--trainer.limit_val_batches", "2")  # sized for CI
    assert [noise for noise in NOISE if noise in printed] == []
    assert "[cimq] quantized model written to" in printed


def test_quiet_filters_only_the_listed_warnings():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet()  # its filters go in front
        warnings.warn("The number of training batches (32) is smaller than the logging interval "
                      "Trainer(log_every_n_steps=50).", PossibleUserWarning)
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)
        warnings.warn("data.calibration_size=5000 exceeds the 1000 train images; using all", UserWarning)
        warnings.warn("The 'train_dataloader' does not have many workers which may be a bottleneck.", PossibleUserWarning)
    assert [str(w.message).split(";")[0].split(" which")[0] for w in caught] == [
        "data.calibration_size=5000 exceeds the 1000 train images", "The 'train_dataloader' does not have many workers"]
