"""`python -m cimq_pl export` end to end on ResNet-20 after the full CIMQ PTQ, and its bad inputs."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from cimq_pl.callbacks import PostTrainingQuantization
from cimq_pl.export import IntegerExecutor, compare_with_model
from conftest import CIFAR10, REPO, RESNET20

pytestmark = pytest.mark.slow

DATA = ["--config", "configs/resnet20_cifar10.yaml", "--data.root", str(CIFAR10), "--model.pretrained", str(RESNET20),
        "--data.init_args.eval_batch_size", "250"]
CIMQ = [*DATA, "--config", "configs/quant/cimq_ptq.yaml", "--data.init_args.calibration_size", "32",
        "--data.init_args.num_workers", "0"]
# two batches of 50 test images: enough to compare, sized for CI (`limit_test_batches 1` would read as "all")
FIRST_100 = ["--data.init_args.eval_batch_size", "50", "--trainer.limit_test_batches", "2"]


def test_cimq_ptq_export_reproduces_the_fake_quant_model_on_the_test_images(run_cli, tmp_path, capsys):
    fit = run_cli("fit", *CIMQ, "--trainer.limit_val_batches", "0",
                  "--model.objective.init_args.iters_per_block", "2", "--model.objective.init_args.batch_size", "16")
    ckpt = next(cb for cb in fit.trainer.callbacks if isinstance(cb, PostTrainingQuantization)).checkpoint_path
    export_dir = tmp_path / "resnet20_cimq"
    exported = run_cli("export", *CIMQ, *FIRST_100, "--ckpt_path", str(ckpt), "--dirpath", str(export_dir))
    fake_acc = exported.trainer.callback_metrics["test/acc"].item()
    manifest = json.loads((export_dir / "manifest.json").read_text())
    assert manifest["reference"]["fake_quant_test"]["test/acc"] == pytest.approx(fake_acc, abs=0)
    assert fake_acc > 0.5  # 2 reconstruction steps per unit; FP is 0.915 on the 1,000 test images

    # the integer executor against the fake-quant model, image by image, on the same 100 test images
    batches = itertools.islice(exported.datamodule.test_dataloader(), 2)
    agreement = compare_with_model(exported.model.model, IntegerExecutor(export_dir), batches)
    print(f"\nexecutor vs fake-quant on {agreement.images} images: {agreement}")
    assert agreement.images == 100
    assert agreement.predictions_equal
    assert agreement.max_relative_logit_error <= 1e-4
    assert agreement.model_correct / 100 == pytest.approx(fake_acc, abs=1e-6)

    # round trip: the export alone, loaded back into the LightningModule, tests to the same accuracy
    reloaded = run_cli("test", *DATA, *FIRST_100, "--model.export", str(export_dir))
    assert reloaded.model.is_export and not list(reloaded.model.parameters())
    assert reloaded.trainer.callback_metrics["test/acc"].item() == pytest.approx(fake_acc, abs=1e-6)
    assert reloaded.trainer.callback_metrics["test/loss"].item() == pytest.approx(
        exported.trainer.callback_metrics["test/loss"].item(), rel=1e-4)


def _main(args, capsys, monkeypatch, tmp_path):
    from cimq_pl.cli import main

    monkeypatch.chdir(REPO)
    monkeypatch.setattr("sys.argv", ["cimq_pl"])
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return exit_info.value.code, err


def test_bad_export_commands_are_one_clear_error(tmp_path, capsys, monkeypatch):
    code, err = _main(["test", *DATA, "--model.export", str(tmp_path / "nowhere")], capsys, monkeypatch, tmp_path)
    assert code == 2 and f"export '{tmp_path / 'nowhere'}': no such directory" in err

    (tmp_path / "taken").mkdir()
    code, err = _main(["export", *CIMQ, "--dirpath", str(tmp_path / "taken")], capsys, monkeypatch, tmp_path)
    assert code == 2 and "already exists: choose another dirpath or set overwrite" in err

    code, err = _main(["export", *DATA, "--dirpath", str(tmp_path / "float")], capsys, monkeypatch, tmp_path)
    assert code == 2 and "export needs a CIM model" in err

    code, err = _main(["export", *CIMQ, "--dirpath", str(tmp_path / "raw")], capsys, monkeypatch, tmp_path)
    assert code == 2 and "quantizers are not calibrated" in err  # no --ckpt_path: nothing to export yet
    assert not (tmp_path / "raw").exists()


def test_an_export_is_inference_only(tmp_path, capsys, monkeypatch):
    from cimq_pl.export import export_model
    from cimq_pl.module import CIMQModule
    from cimq_pl.quant import CIMSpec, calibrate_

    torch.manual_seed(0)
    module = CIMQModule(cim=CIMSpec(first_layer="int8", last_layer="int8"))  # cimq_ptq.yaml's macro
    calibrate_(module.model, [torch.randn(4, 3, 32, 32)])
    export_dir = export_model(module.model, module.cim, tmp_path / "export", (3, 32, 32),
                              {"model": {"name": "cifar_resnet20", "num_classes": 10}})
    code, err = _main(["fit", *DATA, "--model.export", str(export_dir)], capsys, monkeypatch, tmp_path)
    assert code == 2 and "is inference only: use test, validate or predict" in err
    code, err = _main(["test", *CIMQ, "--model.export", str(export_dir)], capsys, monkeypatch, tmp_path)
    assert code == 2 and "cannot act on model.export" in err
    code, err = _main(["test", *DATA, "--model.num_classes", "100", "--model.export", str(export_dir)], capsys,
                      monkeypatch, tmp_path)
    assert code == 2 and "model.num_classes=100 disagrees with the export" in err
    code, err = _main(["test", *DATA, "--model.cim.adc_bits", "8", "--model.export", str(export_dir)], capsys,
                      monkeypatch, tmp_path)
    assert code == 2 and "disagrees with the export" in err and "leave model.cim unset" in err
