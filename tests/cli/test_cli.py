"""The command line end to end on real weights and images: accuracy, W&B offline runs, fit, bad input."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cimq_pl.cli import main
from conftest import CIFAR10, CIFAR100_SAMPLE, REPO, RESNET20, RESNET32, RESNET56_C100
from wandb_reader import logged_metrics


def _env_without_wandb_key(tmp_path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env["NETRC"] = str(tmp_path / "no-netrc")
    return env


def test_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "cimq_pl", "--help"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0
    assert all(cmd in out.stdout for cmd in ("fit", "validate", "test", "predict", "export", "cost", "search"))


def test_readme_command_prints_resnet20_accuracy_and_logs_offline_wandb(tmp_path):
    """The README's first command, with no W&B key: prints test/acc 0.915 and leaves an offline W&B run."""
    cmd = [sys.executable, "-m", "cimq_pl", "test", "--config", "configs/resnet20_cifar10.yaml",
           "--data.root", os.path.relpath(CIFAR10, REPO), "--model.pretrained", os.path.relpath(RESNET20, REPO),
           "--trainer.logger.init_args.save_dir", str(tmp_path)]
    for _ in range(2):  # a second run in the same folder must not trip over the saved config
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=_env_without_wandb_key(tmp_path))
        assert out.returncode == 0, out.stderr[-2000:]
        printed = float(re.search(r"test/acc\s+([0-9.]+)", out.stdout).group(1))
        assert printed == pytest.approx(0.915, abs=0.002)
        folder = re.search(r"^\[cimq\] run folder: (.+)$", out.stdout, re.M).group(1)  # where the results went
        assert Path(folder).parent == tmp_path / "wandb" and Path(folder).is_dir()
    runs = sorted((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 2
    assert logged_metrics(runs[-1])["test/acc"] == pytest.approx(printed)


@pytest.mark.parametrize(
    "config,extra,expected",
    [
        ("configs/resnet32_cifar10.yaml", ["--data.root", str(CIFAR10), "--model.pretrained", str(RESNET32)], 0.928),
        ("configs/resnet_cifar100.yaml", ["--data.root", str(CIFAR100_SAMPLE), "--model.pretrained", str(RESNET56_C100),
                                          "--model.cim", "null", "--trainer.callbacks", "null"], 0.60),
    ],
)
def test_pretrained_accuracy(run_cli, config, extra, expected):
    cli = run_cli("test", "--config", config, *extra)
    assert cli.trainer.callback_metrics["test/acc"].item() == pytest.approx(expected, abs=0.002)
    assert cli.trainer.callback_metrics["test/acc_top5"].item() >= expected


def test_configs_compose_later_overrides_earlier(run_cli, tmp_path):
    override = tmp_path / "override.yaml"
    override.write_text("data:\n  init_args:\n    eval_batch_size: 100\ntrainer:\n  limit_test_batches: 2\n")
    cli = run_cli("test", "--config", "configs/resnet20_cifar10.yaml", "--config", str(override),
                  "--data.root", str(CIFAR10), "--model.pretrained", str(RESNET20))
    assert cli.datamodule.eval_batch_size == 100
    assert cli.datamodule.root == str(CIFAR10)
    assert cli.trainer.num_test_batches == [2]


def test_fit_two_steps_on_cpu_changes_weights(run_cli):
    cli = run_cli("fit", "--config", "configs/resnet20_cifar10.yaml", "--data.root", str(CIFAR10),
                  "--model.pretrained", str(RESNET20), "--trainer.max_steps", "2", "--trainer.limit_val_batches", "2",
                  "--trainer.val_check_interval", "2", "--trainer.accelerator", "cpu", "--data.init_args.batch_size", "16")
    assert cli.trainer.global_step == 2
    loss = cli.trainer.callback_metrics["train/loss"]
    assert torch.isfinite(loss) and 0 < loss.item() < 2
    original = torch.load(RESNET20, map_location="cpu", weights_only=True)["state_dict"]["module.conv1.weight"]
    assert not torch.equal(cli.model.model.conv1.weight.detach(), original)
    assert 0.5 < cli.trainer.callback_metrics["val/acc"].item() <= 1


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model.name", "cifar_resnet21"], r"unknown model name 'cifar_resnet21'"),
        (["--data.root", "{tmp}/no-data"], r"no CIFAR10 data in data.root '.*no-data' and the download failed"),
        (["--model.pretrained", str(RESNET32)], r"does not fit CifarResNet: 60 unexpected"),
        (["--model.pretrained", "{tmp}/resnet20-00000000.th"], r"sha256 starts with '12fca82f', but its name says"),
        (["--model.pretrained", "false", "--model.num_classes", "100"], r"model.num_classes=100 disagrees with the data"),
        (["--data.init_args.batch_size", "0"], r"data.batch_size must be an integer >= 1, got 0"),
    ],
)
def test_bad_input_is_one_line_error_and_exit_2(args, message, tmp_path, capsys, monkeypatch):
    import shutil

    shutil.copy(RESNET20, tmp_path / "resnet20-00000000.th")
    monkeypatch.chdir(REPO)
    monkeypatch.setattr("sys.argv", ["cimq_pl"])
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    with pytest.raises(SystemExit) as exit_info:
        main(["test", "--config", "configs/resnet20_cifar10.yaml", "--data.root", str(CIFAR10),
              "--trainer.logger.init_args.save_dir", str(tmp_path), *args])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.search(message, errors[0]), errors


def test_the_cli_class_runs_wandb_offline_without_a_key_from_python_too(monkeypatch, tmp_path):
    """`CIMQCLI` built from Python (no ``python -m cimq_pl``), no W&B key and no ``WANDB_MODE``: W&B goes offline
    instead of failing for the missing key; a mode the user set is kept."""
    from cimq_pl.cli import CIMQCLI

    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.chdir(REPO)
    monkeypatch.setattr("sys.argv", ["cimq_pl"])
    args = ["--config", "configs/resnet20_cifar10.yaml", "--data.root", str(CIFAR10), "--model.pretrained",
            str(RESNET20), "--trainer.logger.init_args.save_dir", str(tmp_path)]
    cli = CIMQCLI(args=args, run=False)
    assert os.environ["WANDB_MODE"] == "offline" and cli.trainer.logger is not None
    monkeypatch.setenv("WANDB_MODE", "disabled")
    CIMQCLI(args=args, run=False)
    assert os.environ["WANDB_MODE"] == "disabled"
