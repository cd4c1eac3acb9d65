"""QAT by distillation from the float network: the loss by hand, the teacher, and a CLI fit that uses it."""

from __future__ import annotations

import math

import pytest
import torch

from cimq_pl.errors import ConfigError
from cimq_pl.module import CIMQModule
from cimq_pl.objectives import DistillationObjective
from cimq_pl.objectives.distillation import distillation_loss
from cimq_pl.quant import CIMSpec, iter_quantizers
from cimq_pl.quant.reconstruction import float_mode
from conftest import CIFAR10, RESNET20


def test_distillation_loss_by_hand():
    student = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    teacher = torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    # row 1: p_t = (1, e^2, 1) / (2 + e^2), p_s = (e^2, 1, 1) / (2 + e^2); row 2: equal logits, KL 0
    z = 2 + math.e**2
    p_t = [1 / z, math.e**2 / z, 1 / z]
    p_s = [math.e**2 / z, 1 / z, 1 / z]
    kl_row1 = sum(t * (math.log(t) - math.log(s)) for t, s in zip(p_t, p_s))
    assert distillation_loss(student, teacher, 1.0).item() == pytest.approx(kl_row1 / 2, rel=1e-6)
    # T = 2: the logits halved, the KL times 4
    z2 = 2 + math.e
    p_t2, p_s2 = [1 / z2, math.e / z2, 1 / z2], [math.e / z2, 1 / z2, 1 / z2]
    kl2 = sum(t * (math.log(t) - math.log(s)) for t, s in zip(p_t2, p_s2))
    assert distillation_loss(student, teacher, 2.0).item() == pytest.approx(4 * kl2 / 2, rel=1e-6)
    assert distillation_loss(teacher, teacher, 1.0).item() == 0.0


def test_distillation_loss_gradient_reaches_the_student_only():
    student = torch.randn(4, 10, requires_grad=True)
    teacher = torch.randn(4, 10, requires_grad=True)
    distillation_loss(student, teacher, 3.0).backward()
    assert student.grad.abs().sum() > 0 and teacher.grad is None


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": 0}, r"temperature=0 is invalid: expected > 0"),
    ({"temperature": -1.0}, r"temperature=-1.0 is invalid"),
    ({"temperature": True}, r"temperature=True is invalid"),
    ({"ce_weight": -0.5}, r"ce_weight=-0.5 is invalid: expected >= 0"),
    ({"quantizer_lr_scale": 0}, r"quantizer_lr_scale=0 is invalid"),
])
def test_bad_settings_name_the_value(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        DistillationObjective(**kwargs)


def test_the_teacher_is_the_float_network_frozen_and_outside_the_checkpoint():
    from cimq_pl.datamodules import CIFAR10DataModule

    images = next(iter(CIFAR10DataModule(root=str(CIFAR10), num_workers=0, calibration_size=32,
                                         eval_batch_size=32).calibration_dataloader()))[0]
    module = CIMQModule("cifar_resnet20", 10, str(RESNET20), cim=CIMSpec(rows=128, cols=128, adc_bits=4),
                        objective=DistillationObjective())
    objective = module.objective
    objective.setup(module, "test")
    assert objective.teacher is None  # only a fit builds one
    objective.setup(module, "fit")
    teacher = objective.teacher
    module.model.eval()
    with torch.no_grad(), float_mode(module.model):
        expected = module.model(images)
    with torch.no_grad():
        assert torch.equal(teacher(images), expected)
        next(module.model.parameters()).add_(1.0)  # training the student leaves the teacher as it was
        assert torch.equal(teacher(images), expected)
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    assert all(not q.enabled for *_, q in iter_quantizers(teacher))
    assert all(q.enabled for *_, q in iter_quantizers(module.model))
    assert not any("teacher" in key for key in module.state_dict())


def test_qat_with_distillation_through_the_cli(run_cli):
    """`cimq_qat.yaml` with ``model.objective: DistillationObjective``: the QAT callback takes it and the fit logs
    ``train/kd``, the KL of the quantized network to the float one (> 0), and no cross-entropy (ce_weight 0)."""
    cli = run_cli("fit", "--config", "configs/resnet20_cifar10.yaml", "--config", "configs/quant/cimq_qat.yaml",
                  "--data.root", str(CIFAR10), "--model.pretrained", str(RESNET20),
                  "--model.objective", "cimq_pl.objectives.DistillationObjective",
                  "--model.objective.init_args.temperature", "2.0",
                  "--data.init_args.calibration_size", "32", "--data.init_args.batch_size", "8",
                  "--data.init_args.num_workers", "0", "--trainer.limit_train_batches", "2",
                  "--trainer.limit_val_batches", "0")
    objective = cli.model.objective
    assert isinstance(objective, DistillationObjective) and objective.temperature == 2.0
    metrics = cli.trainer.callback_metrics
    assert "train/kd" in metrics and "train/ce" not in metrics
    assert 0 < float(metrics["train/kd"]) < 5.0
    assert cli.trainer.global_step == 2
