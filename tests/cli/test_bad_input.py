"""Fuzz-style bad input through the CLI: every malformed config, value, path or checkpoint gives a clear
``error:`` line naming the bad value, a non-zero exit, no traceback and no hang."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import CIFAR10, REPO, RESNET20

BASE = ["--config", "configs/resnet20_cifar10.yaml", "--data.root", str(CIFAR10), "--model.pretrained", str(RESNET20),
        "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--data.init_args.num_workers", "0"]
CONVENTIONAL = ["--config", "configs/quant/conventional.yaml"]


def _yaml(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _technique(tmp_path, callback: str, init_args: str) -> list[str]:
    """A technique config listing ``callback`` with ``init_args`` (a YAML flow mapping) before PTQ."""
    return ["--config", _yaml(tmp_path, "technique.yaml", f"""
model:
  cim: {{rows: 128, cols: 128, weight_bits: 4, input_bits: 4, dac_bits: 1, adc_bits: 4}}
  objective: {{class_path: cimq_pl.objectives.BlockReconstruction, init_args: {{iters_per_block: 0}}}}
trainer:
  callbacks:
    - class_path: cimq_pl.callbacks.{callback}
      init_args: {init_args}
    - class_path: cimq_pl.callbacks.PostTrainingQuantization
""")]


# (id, arguments after `fit`/`test` (a function of tmp_path), text the error line must contain)
CASES = [
    ("negative ADC bits", lambda t: [*CONVENTIONAL, "--model.cim.adc_bits", "-1"], "adc_bits"),
    ("ADC bits not a number", lambda t: [*CONVENTIONAL, "--model.cim.adc_bits", "four"], "four"),
    ("fractional weight bits", lambda t: [*CONVENTIONAL, "--model.cim.weight_bits", "1.5"], "1.5"),
    ("dac_bits > input_bits", lambda t: [*CONVENTIONAL, "--model.cim.dac_bits", "8"], "dac_bits"),
    ("zero array rows", lambda t: [*CONVENTIONAL, "--model.cim.rows", "0"], "rows"),
    ("unknown row split", lambda t: [*CONVENTIONAL, "--model.cim.row_split", "diagonal"], "diagonal"),
    ("negative classes", lambda t: ["--model.num_classes", "-3"], "num_classes"),
    ("unknown model", lambda t: ["--model.name", "not_a_model"], "not_a_model"),
    ("unknown model key", lambda t: ["--model.colour", "red"], "colour"),
    ("missing weights", lambda t: ["--model.pretrained", "/nonexistent/w.th"], "/nonexistent/w.th"),
    ("missing data", lambda t: ["--data.root", "/nonexistent/cifar"], "/nonexistent/cifar"),
    ("zero batch size", lambda t: ["--data.init_args.batch_size", "0"], "batch_size"),
    ("missing config", lambda t: ["--config", "/nonexistent/c.yaml"], "/nonexistent/c.yaml"),
    ("malformed YAML", lambda t: ["--config", _yaml(t, "bad.yaml", "model: {name: [unclosed\n")], "parsing config"),
    ("config of the wrong type", lambda t: ["--config", _yaml(t, "list.yaml", "model: [1, 2]\n")], "model"),
    ("unknown callback", lambda t: ["--trainer.callbacks+=cimq_pl.callbacks.NoSuchCallback"], "NoSuchCallback"),
    ("negative PTQ steps", lambda t: [*CONVENTIONAL, "--model.objective.init_args.iters_per_block", "-5"],
     "BlockReconstruction.iters_per_block=-5 is invalid"),
    ("reconstruction fit of two epochs", lambda t: [*CONVENTIONAL, "--model.objective.init_args.iters_per_block", "2",
                                                    "--trainer.max_epochs", "2"], "set trainer.max_epochs 1"),
    ("keep probability > 1", lambda t: _technique(t, "QuantDropping", "{keep_prob: 1.5}"), "keep_prob"),
    ("more one-bits than input bits", lambda t: _technique(t, "BitSparseActivations", "{max_ones: 9}"), "max_ones"),
    ("unknown dropping target", lambda t: _technique(t, "QuantDropping", "{targets: [weights]}"), "weights"),
    ("technique without a macro", lambda t: ["--trainer.callbacks+=cimq_pl.callbacks.ArraywiseWeights"], "model.cim"),
    ("mistyped macro key", lambda t: [*CONVENTIONAL, "--model.cim.adc_bit", "3"], "did you mean 'adc_bits'"),
    ("mistyped callback argument", lambda t: _technique(t, "BitSparseActivations", "{max_one: 2}"), "max_ones"),
    ("mistyped callback class", lambda t: ["--config", _yaml(t, "typo.yaml", TYPO)], "callbacks.BitSparseActivations?"),
    ("empty config file", lambda t: ["--config", _yaml(t, "empty.yaml", "# nothing\n")], "empty.yaml' is empty"),
    ("config file holding a list", lambda t: ["--config", _yaml(t, "a_list.yaml", "- 1\n")], "a_list.yaml' holds a list"),
    ("config file holding a scalar", lambda t: ["--config", _yaml(t, "scalar.yaml", "hello\n")], "scalar.yaml' holds"),
    ("mistyped data argument", lambda t: ["--data.init_args.batch_sise", "8"], "did you mean 'batch_size'"),
    ("mistyped trainer key", lambda t: ["--config", _yaml(t, "t.yaml", "trainer: {max_epoch: 1}\n")], "'max_epochs'"),
    ("short callback name", lambda t: ["--config", _yaml(t, "short.yaml", SHORT_NAME)], "Activations needs a CIM"),
    ("abbreviated trainer flag", lambda t: ["--trainer.max_epoch", "3"], "did you mean 'max_epochs'"),
    ("unknown callback in --without", lambda t: [*CONVENTIONAL, "--without", "QuantDropping"],
     "--without 'QuantDropping': no such callback in trainer.callbacks; listed: HardwareReport, PostTrainingQuantization"),
    ("more GPUs than the machine has", lambda t: ["--trainer.accelerator", "gpu", "--trainer.devices", "64"],
     "trainer.accelerator='gpu'"),
    ("negative programming variation", lambda t: [*CONVENTIONAL, "--model.device.programming_sigma", "-0.1"],
     "DeviceSpec.programming_sigma=-0.1 is invalid: expected a number >= 0"),
    ("stuck-at probabilities above 1", lambda t: [*CONVENTIONAL, "--model.device.stuck_off_prob", "0.7",
                                                  "--model.device.stuck_on_prob", "0.7"], "stuck_on_prob=0.7"),
    ("device without a macro", lambda t: ["--model.device.programming_sigma", "0.1"], "model.device needs"),
    ("mistyped device key", lambda t: [*CONVENTIONAL, "--model.device.programming_sigm", "0.1"],
     "model.device: unknown key 'programming_sigm' (did you mean 'programming_sigma'?"),
    ("unknown programming distribution", lambda t: [*CONVENTIONAL, "--model.device.programming_distribution", "uniform"],
     "'uniform' is not one of 'normal', 'lognormal'"),
    ("noise-aware training without a device", lambda t: [*CONVENTIONAL, "--trainer.callbacks+=NoiseAwareTraining"],
     "NoiseAwareTraining needs the device to train for: set model.device"),
    ("no Monte Carlo samples", lambda t: [*CONVENTIONAL, "--trainer.callbacks+=MonteCarloDevices",
                                          "--trainer.callbacks.samples", "0"], "MonteCarloDevices.samples=0"),
]
TYPO = "trainer:\n  callbacks:\n    - class_path: BitSparseActivation\n"
SHORT_NAME = "trainer:\n  callbacks:\n    - class_path: BitSparseActivations\n"  # resolved, then needs model.cim
# mistakes jsonargparse reports as a multi-line union dump: their error line must be short and name the cause
SHORT = {"ADC bits not a number", "fractional weight bits", "unknown row split", "unknown callback",
         "mistyped macro key", "mistyped callback argument", "mistyped callback class", "empty config file",
         "config file holding a list", "config file holding a scalar", "mistyped data argument", "mistyped trainer key",
         "short callback name", "abbreviated trainer flag", "negative programming variation",
         "stuck-at probabilities above 1", "unknown programming distribution"}


def _run_main(args: list[str], capsys, monkeypatch) -> tuple[int, str]:
    import logging

    from cimq_pl.cli import main

    monkeypatch.chdir(REPO)
    monkeypatch.setattr("sys.argv", ["cimq_pl"])
    logging.disable(logging.INFO)  # Lightning's info lines hold a stream of an earlier test's capture
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(args)
    finally:
        logging.disable(logging.NOTSET)
    return exit_info.value.code, capsys.readouterr().err


def _assert_clear(code, err: str, needle: str, short: bool = False) -> None:
    assert code not in (0, None), err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert lines, err[-2000:]
    assert any(needle in line for line in lines), lines
    if short:
        assert all(len(line) < 400 and "Union" not in line and "Does not validate" not in line for line in lines), lines


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_fit_input_is_one_clear_error(case, tmp_path, capsys, monkeypatch):
    label, args, needle = case
    code, err = _run_main(["fit", *BASE, *args(tmp_path)], capsys, monkeypatch)
    _assert_clear(code, err, needle, short=label in SHORT)


def _checkpoints(tmp_path):
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"\x00not a checkpoint" * 100)
    plain = tmp_path / "weights_only.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, plain)
    pickled_code = tmp_path / "code.ckpt"
    torch.save({"state_dict": {}, "pytorch-lightning_version": "2", "hook": subprocess.Popen}, pickled_code)
    return [
        ("missing", "/nonexistent/x.ckpt", "/nonexistent/x.ckpt"),
        ("garbage", str(garbage), "weights-only torch file"),
        ("float weights, not a fit checkpoint", str(RESNET20), "not a Lightning checkpoint"),
        ("foreign state dict", str(plain), "not a Lightning checkpoint"),
        ("needs code to load", str(pickled_code), "weights-only torch file"),
        ("a directory", str(tmp_path), "is a directory"),
    ]


def test_bad_checkpoints_are_refused_without_running_their_code(tmp_path, capsys, monkeypatch):
    for label, path, needle in _checkpoints(tmp_path):
        code, err = _run_main(["test", *BASE, *CONVENTIONAL, "--ckpt_path", path], capsys, monkeypatch)
        _assert_clear(code, err, needle)


def test_bad_input_exits_non_zero_from_the_shell_without_hanging():
    result = subprocess.run([sys.executable, "-m", "cimq_pl", "fit", *BASE, *CONVENTIONAL, "--model.cim.adc_bits", "-1"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and "adc_bits" in result.stderr
    assert "Traceback" not in result.stderr


def test_callback_help_takes_a_short_class_name():
    """``--trainer.callbacks.help`` resolves our callbacks' short names, as it does Lightning's."""
    args = ["fit", "--trainer.callbacks.help", "PostTrainingQuantization"]
    result = subprocess.run([sys.executable, "-m", "cimq_pl", *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--trainer.callbacks.checkpoint_name" in result.stdout


def test_a_run_refused_after_wandb_started_leaves_no_offline_run_folder(tmp_path, capsys, monkeypatch):
    args = ["fit", "--config", "configs/resnet20_cifar10.yaml", "--data.root", str(CIFAR10), "--model.pretrained",
            str(RESNET20), "--trainer.callbacks+=cimq_pl.callbacks.ArraywiseWeights",  # refused in setup: no macro
            "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"]
    code, err = _run_main(args, capsys, monkeypatch)
    _assert_clear(code, err, "ArraywiseWeights needs a CIM macro")
    assert (tmp_path / "wandb").is_dir()  # the W&B run had started
    assert not list((tmp_path / "wandb").glob("offline-run-*"))
