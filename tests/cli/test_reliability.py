"""Reliability through the CLI: pre-emption (SIGTERM) mid-block / mid-epoch and resume, determinism, checkpoints.

One small CIMQ PTQ (ResNet-20, all four techniques, 32 calibration images, 4 steps of 8 images per unit) is
run three ways: twice uninterrupted (determinism) and once stopped by SIGTERM in the middle of unit 4, then
resumed with ``--ckpt_path last.ckpt``. A small QAT (2 epochs of 5 steps of 8 augmented images) is run
uninterrupted and stopped in the middle of its second epoch, then resumed. Each pair must be bit-identical.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import CIFAR10, REPO, RESNET20

pytestmark = pytest.mark.slow

ITERS = 4
GATE_STEP = 3 * ITERS + 2  # global step 14: unit 4 (layer1.2), 2 of its 4 steps done
COMMON = [
    "--config", "configs/resnet20_cifar10.yaml", "--data.root", str(CIFAR10), "--model.pretrained", str(RESNET20),
    "--data.init_args.calibration_size", "32", "--data.init_args.eval_batch_size", "50",
    "--data.init_args.num_workers", "0", "--trainer.limit_val_batches", "0", "--trainer.limit_test_batches", "2",
    "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
]


def _config(path: Path, gate: bool, source: str = "configs/quant/cimq_ptq.yaml", gate_step: int = GATE_STEP,
            every: int = 4, gate_args: dict | None = None) -> Path:
    """``source`` on a tiny budget, without the hardware report; with the SIGTERM gate if asked (at training step
    ``gate_step``, or where ``gate_args`` say)."""
    config = yaml.safe_load((REPO / source).read_text())
    if config["model"].get("objective", {}).get("class_path", "").endswith("BlockReconstruction"):
        # output offsets learned after the ADC too (lr_offset): they resume and repeat exactly as the rest
        config["model"]["objective"]["init_args"].update(iters_per_block=ITERS, batch_size=8, lr_offset=1e-3)
    callbacks = [c for c in config["trainer"]["callbacks"] if not c["class_path"].endswith("HardwareReport")]
    for callback in callbacks:
        if callback["class_path"].endswith("ModelCheckpoint"):
            callback["init_args"]["every_n_train_steps"] = every
    if gate:
        callbacks.insert(0, {"class_path": "sigterm_gate.SigtermGate", "init_args": gate_args or {"step": gate_step}})
    config["trainer"]["callbacks"] = callbacks
    path.write_text(yaml.safe_dump(config))
    return path


@contextlib.contextmanager
def _at_repo():
    """Run from the repository root (the configs' relative paths), back to the old folder afterwards."""
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        yield
    finally:
        os.chdir(cwd)


def _in_process(*args: str):
    import wandb

    from cimq_pl.cli import CIMQCLI

    wandb.finish()
    return CIMQCLI(args=list(args))


def _interrupt(config: Path, folder: Path, step: int, extra: tuple = (), command: str = "fit",
               whole_group: bool = False) -> dict:
    """Run ``command`` in a subprocess, send it SIGTERM at the gate (to the whole process group, DataLoader
    workers included, when ``whole_group``); its exit status, stderr and last.ckpt (if any)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(
        [sys.executable, "-m", "cimq_pl", command, *COMMON, "--config", str(config), *extra,
         "--trainer.default_root_dir", str(folder)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=whole_group,
    )
    for line in process.stdout:
        if line.startswith("SIGTERM-GATE"):
            if whole_group:
                os.killpg(process.pid, signal.SIGTERM)
            else:
                process.send_signal(signal.SIGTERM)
            break
    _, stderr = process.communicate(timeout=300)
    last = folder / "checkpoints/last.ckpt"
    return {"returncode": process.returncode, "stderr": stderr,
            "last": torch.load(last, map_location="cpu", weights_only=True) if last.is_file() else None}


def _resume_command(stderr: str) -> list[str]:
    """The arguments of the resume command the CLI printed (after ``python -m cimq_pl``)."""
    line = next(line for line in stderr.splitlines() if line.startswith("error: stopped by SIGTERM"))
    return shlex.split(line.split("resume with: ", 1)[1])[3:]


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _same(a, b) -> bool:
    return torch.equal(a, b) if torch.is_tensor(a) else a == b


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The PTQ runs: two uninterrupted, one stopped mid-unit and one stopped while calibrating, each resumed."""
    root = tmp_path_factory.mktemp("reliability")
    with _at_repo():
        plain = _config(root / "ptq.yaml", gate=False)
        for name in ("a", "a2"):
            _in_process("fit", *COMMON, "--config", str(plain), "--trainer.default_root_dir", str(root / name))
        gated = _config(root / "ptq_gate.yaml", gate=True)
        interrupted = _interrupt(gated, root / "b", GATE_STEP)
        _in_process("fit", *COMMON, "--config", str(plain), "--trainer.default_root_dir", str(root / "b"),
                    "--ckpt_path", str(root / "b/checkpoints/last.ckpt"))
        # stopped while calibrating (before Lightning's own SIGTERM handler exists), then the printed command resumes
        gated = _config(root / "ptq_gate_calibration.yaml", gate=True, gate_args={"stage": "calibration"})
        calibrating = _interrupt(gated, root / "c", 0)
        _in_process(*_resume_command(calibrating["stderr"]))
    return root, plain, interrupted, calibrating


def test_sigterm_mid_block_saves_a_resumable_checkpoint_and_exits_143(runs):
    root, _, interrupted, _ = runs
    assert interrupted["returncode"] == 128 + signal.SIGTERM, interrupted["stderr"][-2000:]
    assert "error: stopped by SIGTERM during fit; resume with: python -m cimq_pl fit" in interrupted["stderr"]
    resume = _resume_command(interrupted["stderr"])
    assert resume[-2:] == ["--ckpt_path", str(root / "b/checkpoints/last.ckpt")]  # the real file, not a placeholder
    last = interrupted["last"]
    assert last["global_step"] == GATE_STEP and GATE_STEP % ITERS != 0  # strictly inside a unit
    assert last["epoch"] == 0  # PTQ is one epoch; the batch index says the unit: GATE_STEP // ITERS = unit 4 (0-based 3)
    assert last["optimizer_states"] and last["optimizer_states"][0]["state"]  # Adam moments are saved


def test_resumed_ptq_equals_uninterrupted_bit_for_bit(runs):
    root, _, _, _ = runs
    reference, resumed = _state(root / "a/checkpoints/ptq.ckpt"), _state(root / "b/checkpoints/ptq.ckpt")
    assert reference.keys() == resumed.keys()
    quantizer_keys = [k for k in reference if "quantizer" in k]
    assert any(k.endswith("rounding_logits") for k in quantizer_keys) and any(k.endswith("theta") for k in quantizer_keys)
    assert any(k.endswith("output_offset") and reference[k].abs().max() > 0 for k in reference)
    different = [k for k in reference if not _same(reference[k], resumed[k])]
    assert not different, different[:5]


def test_same_seed_and_config_give_bit_identical_quantizers(runs):
    root, _, _, _ = runs
    first, second = _state(root / "a/checkpoints/ptq.ckpt"), _state(root / "a2/checkpoints/ptq.ckpt")
    assert first.keys() == second.keys() and all(_same(first[k], second[k]) for k in first)


def test_sigterm_during_calibration_saves_the_calibrated_quantizers_and_resumes_exactly(runs):
    root, _, _, calibrating = runs
    assert calibrating["returncode"] == 128 + signal.SIGTERM, calibrating["stderr"][-2000:]
    saved = root / "c/checkpoints/calibrated.ckpt"
    assert f"SIGTERM during calibration: calibrated quantizers saved to {saved}" in calibrating["stderr"]
    assert _resume_command(calibrating["stderr"])[-2:] == ["--ckpt_path", str(saved)]
    checkpoint = torch.load(saved, map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 0  # stopped before the first reconstruction step
    reference, resumed = _state(root / "a/checkpoints/ptq.ckpt"), _state(root / "c/checkpoints/ptq.ckpt")
    flags = [v["initialized"] for k, v in checkpoint["state_dict"].items() if k.endswith("quantizer._extra_state")]
    assert len(flags) == sum(k.endswith("quantizer._extra_state") for k in reference) and all(flags)  # all calibrated
    different = [k for k in reference if not _same(reference[k], resumed[k])]
    assert reference.keys() == resumed.keys() and not different, different[:5]


def test_sigterm_to_the_process_group_during_test_is_one_line(runs, tmp_path):
    """SIGTERM to the whole group (the DataLoader workers too), as a job scheduler sends it: no worker traceback."""
    root, _, _, _ = runs
    gated = _config(tmp_path / "test_gate.yaml", gate=True, gate_args={"stage": "test", "step": 0})
    stopped = _interrupt(gated, tmp_path / "t", 0, ("--data.init_args.num_workers", "2", "--ckpt_path",
                                                    str(root / "a/checkpoints/ptq.ckpt")), command="test",
                         whole_group=True)
    assert stopped["returncode"] == 128 + signal.SIGTERM, stopped["stderr"][-2000:]
    assert "Traceback" not in stopped["stderr"], stopped["stderr"][-3000:]
    assert stopped["stderr"].strip().splitlines()[-1] == (
        "error: stopped by SIGTERM during test; nothing to resume: run the command again")


def test_resumed_and_uninterrupted_runs_test_the_same(runs):
    root, plain, _, _ = runs
    with _at_repo():
        accuracies = [
            _in_process("test", *COMMON, "--config", str(plain), "--trainer.default_root_dir", str(root / name),
                        "--ckpt_path", str(root / name / "checkpoints/ptq.ckpt")).trainer.callback_metrics["test/acc"].item()
            for name in ("a", "b")
        ]
    assert accuracies[0] == accuracies[1]
    assert accuracies[0] > 0.5  # W4A4, 4-bit ADC, 4 steps per unit, on the first 100 test images


QAT = ("--data.init_args.batch_size", "8", "--trainer.limit_train_batches", "5", "--trainer.max_epochs", "2")
QAT_GATE = 7  # epoch 1 (0-based), 2 of its 5 steps done


@pytest.fixture(scope="module", params=["configs/quant/cimq_qat.yaml", "configs/quant/low_adc_qat.yaml"])
def qat_runs(request, tmp_path_factory):
    """QAT (2 epochs of 5 steps of 8 augmented images; eager): uninterrupted, and stopped at step 7 then resumed.
    The plain QAT config, and the low-ADC recipe (only the input steps and ADC ranges learn, by distillation)."""
    source = request.param
    root = tmp_path_factory.mktemp("reliability_qat")
    args = (*QAT, "--model.simulation", "eager")
    with _at_repo():
        plain = _config(root / "qat.yaml", gate=False, source=source, every=1)
        _in_process("fit", *COMMON, "--config", str(plain), *args, "--trainer.default_root_dir", str(root / "a"))
        gated = _config(root / "qat_gate.yaml", gate=True, source=source, gate_step=QAT_GATE, every=1)
        interrupted = _interrupt(gated, root / "b", QAT_GATE, args)
        _in_process("fit", *COMMON, "--config", str(plain), *args, "--trainer.default_root_dir", str(root / "b"),
                    "--ckpt_path", str(root / "b/checkpoints/last.ckpt"))
    return root, interrupted, source


def test_qat_resumed_mid_epoch_equals_uninterrupted_bit_for_bit(qat_runs):
    root, interrupted, source = qat_runs
    assert interrupted["returncode"] == 128 + signal.SIGTERM, interrupted["stderr"][-2000:]
    assert interrupted["last"]["global_step"] == QAT_GATE and interrupted["last"]["epoch"] == 1
    reference = torch.load(root / "a/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    resumed = torch.load(root / "b/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert reference["global_step"] == resumed["global_step"] == 10
    weights = [k for k in reference["state_dict"] if k.endswith(".weight")]
    assert weights and any("quantizer" in k for k in reference["state_dict"])
    different = [k for k in reference["state_dict"] if not _same(reference["state_dict"][k], resumed["state_dict"][k])]
    assert not different, different[:5]
    if source.endswith("low_adc_qat.yaml"):  # from step 7 to 10 the recipe learned its quantizers and nothing else
        step7 = interrupted["last"]["state_dict"]
        moved = [k for k in reference["state_dict"] if not _same(reference["state_dict"][k], step7[k])]
        assert moved and all(".input_quantizer." in k or ".psum_quantizer." in k for k in moved), moved[:5]


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

    with _at_repo(), pytest.raises(SystemExit) as exit_info:
        main(["test", "--config", "configs/resnet20_cifar10.yaml", "--ckpt_path", str(truncated),
              "--trainer.logger", "false"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"cannot read ckpt_path {str(truncated)!r} as a weights-only torch file" in err
    assert "Traceback" not in err
