"""One run holds one experiment: a fit stopped by SIGTERM and resumed with the command the CLI printed goes on
in the same W&B run (offline here) and the same checkpoint folder, and the closing lines name its outputs."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys

import pytest
import yaml

from conftest import CIFAR10, REPO, RESNET20

pytestmark = pytest.mark.slow

GATE_STEP = 3  # unit 2 (layer1.0) of 2 steps per unit


def _cli(args: list[str], gate: bool) -> tuple[int, str, str]:
    """``python -m cimq_pl`` in a subprocess (stopped by SIGTERM at the gate line when ``gate``)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, "-m", "cimq_pl", *args], cwd=REPO, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines = []
    if gate:
        for line in process.stdout:
            lines.append(line)
            if line.startswith("SIGTERM-GATE"):
                process.send_signal(signal.SIGTERM)
                break
    out, err = process.communicate(timeout=600)
    return process.returncode, "".join(lines) + out, err


def test_a_resumed_fit_continues_the_same_run_in_the_same_folder(tmp_path):
    config = tmp_path / "ptq.yaml"
    objective = {"class_path": "cimq_pl.objectives.BlockReconstruction", "init_args": {"iters_per_block": 2, "batch_size": 8}}
    config.write_text(yaml.safe_dump({"model": {"objective": objective},
                                      "trainer": {"callbacks": [
        {"class_path": "sigterm_gate.SigtermGate", "init_args": {"step": GATE_STEP}},
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"save_last": True, "every_n_train_steps": 2, "save_on_exception": True}},
        {"class_path": "cimq_pl.callbacks.PostTrainingQuantization"},
    ]}}))
    args = ["fit", "--config", "configs/resnet20_cifar10.yaml", "--config", "configs/quant/conventional.yaml",
            "--config", str(config), "--data.root", str(CIFAR10), "--model.pretrained", str(RESNET20),
            "--data.init_args.calibration_size", "32", "--data.init_args.num_workers", "0",
            "--data.init_args.eval_batch_size", "25", "--trainer.limit_val_batches", "2",  # 50 images ("1" is all)
            "--trainer.enable_progress_bar", "false",
            "--trainer.logger.init_args.save_dir", str(tmp_path)]
    code, _, err = _cli(args, gate=True)
    assert code == 128 + signal.SIGTERM, err[-2000:]
    line = next(line for line in err.splitlines() if line.startswith("error: stopped by SIGTERM"))
    resume = shlex.split(line.split("resume with: ", 1)[1])
    assert resume[:4] == ["python", "-m", "cimq_pl", "fit"]
    checkpoint = resume[resume.index("--ckpt_path") + 1]
    run_id = checkpoint.split(os.sep)[-3]
    assert checkpoint == str(tmp_path / "cimq-pl" / run_id / "checkpoints" / "last.ckpt") and os.path.isfile(checkpoint)

    code, out, err = _cli(resume[3:], gate=False)
    assert code == 0, err[-3000:]
    runs = sorted(name for name in os.listdir(tmp_path / "wandb") if name.startswith("offline-run-"))
    assert len(runs) == 2 and all(run_id in name for name in runs), runs
    assert "dirpath has changed" not in err and "`weights_only` was not set" not in out + err
    closing = dict(line[len("[cimq] "):].split(": ", 1) for line in out.splitlines()
                   if line.startswith("[cimq] ") and ": " in line and line.split(": ", 1)[0][7:] in
                   ("run folder", "quantized model", "last checkpoint"))
    ptq = tmp_path / "cimq-pl" / run_id / "checkpoints" / "ptq.ckpt"
    assert closing["quantized model"] == str(ptq) and ptq.is_file()
    assert closing["run folder"].startswith(str(tmp_path / "wandb" / "offline-run-")) and run_id in closing["run folder"]
    assert os.path.dirname(closing["last checkpoint"]) == os.path.dirname(checkpoint)
