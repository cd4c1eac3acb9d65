"""Reliability of PTQ through the CLI: pre-emption (SIGTERM) mid-block and resume, determinism, checkpoint files.

One small CIMQ PTQ (ResNet-20, all four techniques, 32 calibration images, 6 steps of 8 images per unit) is
run three ways: twice uninterrupted (determinism) and once stopped by SIGTERM in the middle of unit 4, then
resumed with ``--ckpt_path last.ckpt``. The quantized models must be bit-identical.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import CIFAR10, REPO, RESNET20

ITERS = 6
GATE_STEP = 3 * ITERS + 2  # global step 20: unit 4 (layer1.2), 2 of its 6 steps done
COMMON = [
    "--config", "configs/resnet20_cifar10.yaml", "--data.root", str(CIFAR10), "--model.pretrained", str(RESNET20),
    "--data.init_args.calibration_size", "32", "--data.init_args.eval_batch_size", "100",
    "--data.init_args.num_workers", "0", "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "2",
    "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
]


def _config(path: Path, gate: bool) -> Path:
    """configs/quant/cimq_ptq.yaml on a tiny budget, without the hardware report; with the SIGTERM gate if asked."""
    config = yaml.safe_load((REPO / "configs/quant/cimq_ptq.yaml").read_text())
    callbacks = [c for c in config["trainer"]["callbacks"] if not c["class_path"].endswith("HardwareReport")]
    for callback in callbacks:
        if callback["class_path"].endswith("PostTrainingQuantization"):
            callback["init_args"].update(iters_per_block=ITERS, batch_size=8)
        if callback["class_path"].endswith("ModelCheckpoint"):
            callback["init_args"]["every_n_train_steps"] = 4
    if gate:
        callbacks.insert(0, {"class_path": "sigterm_gate.SigtermGate", "init_args": {"step": GATE_STEP}})
    config["trainer"]["callbacks"] = callbacks
    path.write_text(yaml.safe_dump(config))
    return path


def _in_process(*args: str):
    import wandb

    from cimq_pl.cli import CIMQCLI

    wandb.finish()
    return CIMQCLI(args=list(args))


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _same(a, b) -> bool:
    return torch.equal(a, b) if torch.is_tensor(a) else a == b


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The three PTQ runs; returns their folders and the interrupted process's outcome."""
    root = tmp_path_factory.mktemp("reliability")
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        plain = _config(root / "ptq.yaml", gate=False)
        for name in ("a", "a2"):
            _in_process("fit", *COMMON, "--config", str(plain), "--trainer.default_root_dir", str(root / name))
        gated = _config(root / "ptq_gate.yaml", gate=True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
        process = subprocess.Popen(
            [sys.executable, "-m", "cimq_pl", "fit", *COMMON, "--config", str(gated),
             "--trainer.default_root_dir", str(root / "b")],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for line in process.stdout:
            if line.startswith("SIGTERM-GATE"):
                process.send_signal(signal.SIGTERM)
                break
        _, stderr = process.communicate(timeout=300)
        interrupted = {"returncode": process.returncode, "stderr": stderr,
                       "last": torch.load(root / "b/checkpoints/last.ckpt", map_location="cpu", weights_only=True)}
        _in_process("fit", *COMMON, "--config", str(plain), "--trainer.default_root_dir", str(root / "b"),
                    "--ckpt_path", str(root / "b/checkpoints/last.ckpt"))
        yield root, plain, interrupted
    finally:
        os.chdir(cwd)


def test_sigterm_mid_block_saves_a_resumable_checkpoint_and_exits_143(runs):
    _, _, interrupted = runs
    assert interrupted["returncode"] == 128 + signal.SIGTERM, interrupted["stderr"][-2000:]
    assert "error: stopped by SIGTERM" in interrupted["stderr"]
    last = interrupted["last"]
    assert last["global_step"] == GATE_STEP and GATE_STEP % ITERS != 0  # strictly inside a unit
    assert last["epoch"] == GATE_STEP // ITERS  # unit 4 (0-based epoch 3)
    assert last["optimizer_states"] and last["optimizer_states"][0]["state"]  # Adam moments are saved


def test_resumed_ptq_equals_uninterrupted_bit_for_bit(runs):
    root, _, _ = runs
    reference, resumed = _state(root / "a/checkpoints/ptq.ckpt"), _state(root / "b/checkpoints/ptq.ckpt")
    assert reference.keys() == resumed.keys()
    quantizer_keys = [k for k in reference if "quantizer" in k]
    assert any(k.endswith("rounding_logits") for k in quantizer_keys) and any(k.endswith("theta") for k in quantizer_keys)
    different = [k for k in reference if not _same(reference[k], resumed[k])]
    assert not different, different[:5]


def test_same_seed_and_config_give_bit_identical_quantizers(runs):
    root, _, _ = runs
    first, second = _state(root / "a/checkpoints/ptq.ckpt"), _state(root / "a2/checkpoints/ptq.ckpt")
    assert first.keys() == second.keys() and all(_same(first[k], second[k]) for k in first)


def test_resumed_and_uninterrupted_runs_test_the_same(runs):
    root, plain, _ = runs
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        accuracies = [
            _in_process("test", *COMMON, "--config", str(plain), "--trainer.default_root_dir", str(root / name),
                        "--ckpt_path", str(root / name / "checkpoints/ptq.ckpt")).trainer.callback_metrics["test/acc"].item()
            for name in ("a", "b")
        ]
    finally:
        os.chdir(cwd)
    assert accuracies[0] == accuracies[1]
    assert accuracies[0] > 0.5  # W4A4, 4-bit ADC, 6 steps per unit; FP is 0.92 on these 200 images


def test_a_save_killed_midway_leaves_no_file_and_a_truncated_file_is_refused(tmp_path, capsys):
    """Checkpoints go through a temporary file and a rename: an interrupted save leaves the old file or none."""
    from lightning.fabric.utilities.cloud_io import _atomic_save

    target = tmp_path / "last.ckpt"

    class Interrupted(Exception):
        pass

    real_write = None

    def dying_write(self, data):  # the process "dies" after writing half of the bytes
        real_write(self, data[: len(data) // 2])
        raise Interrupted

    import fsspec.implementations.local as local

    real_write = local.LocalFileOpener.write
    local.LocalFileOpener.write = dying_write
    try:
        with pytest.raises(Interrupted):
            _atomic_save({"state_dict": {"w": torch.ones(1000)}}, target)
    finally:
        local.LocalFileOpener.write = real_write
    assert not target.exists() and not list(tmp_path.iterdir())  # nothing half-written is left behind

    _atomic_save({"state_dict": {"w": torch.ones(1000)}, "pytorch-lightning_version": "2"}, target)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(target.read_bytes()[:500])
    from cimq_pl.cli import main

    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(["test", "--config", "configs/resnet20_cifar10.yaml", "--ckpt_path", str(truncated),
                  "--trainer.logger", "false"])
    finally:
        os.chdir(cwd)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"cannot read ckpt_path {str(truncated)!r} as a weights-only torch file" in err
    assert "Traceback" not in err
