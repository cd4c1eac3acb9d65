"""QAT by distillation from the float network: the loss by hand, the teacher, and a CLI fit that uses it."""

from __future__ import annotations

import math

import pytest
import torch

from cimq_pl.errors import ConfigError
from cimq_pl.module import CIMQModule
from cimq_pl.objectives import DistillationObjective, QuantizerDistillation
from cimq_pl.objectives.distillation import distillation_loss
from cimq_pl.quant import CIMSpec, iter_quantizers
from cimq_pl.quant.reconstruction import float_mode
from conftest import CIFAR10, RESNET20, small_cim_module


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


def test_quantizer_distillation_trains_the_input_steps_and_adc_ranges_alone():
    """`QuantizerDistillation`: Adam over the input steps (4e-4) and ADC clips (1e-2), times ``lr_scale``; the
    weights, biases and weight steps are frozen at the fit's setup (before DDP wraps the model), not later."""
    module = small_cim_module(QuantizerDistillation())
    steps = [q.step for _, role, q in iter_quantizers(module.model) if role == "input"]
    clips = [q.theta for _, role, q in iter_quantizers(module.model) if role == "psum"]
    before = {id(p) for p in module.model.parameters() if p.requires_grad}
    module.objective.setup(module, "test")
    assert {id(p) for p in module.model.parameters() if p.requires_grad} == before  # only a fit freezes
    module.objective.setup(module, "fit")
    learning = {id(p) for p in module.model.parameters() if p.requires_grad}
    assert learning == {id(p) for p in steps + clips} and len(steps) == len(clips) == 2 and len(before) > 4
    groups = module.objective.configure_optimizers(module)["optimizer"].param_groups
    assert [g["lr"] for g in groups] == [4e-4, 1e-2]
    assert [[id(p) for p in g["params"]] for g in groups] == [[id(p) for p in steps], [id(p) for p in clips]]
    slower = small_cim_module(QuantizerDistillation(lr_scale=0.1, lr_clip=2e-2))
    slower.objective.setup(slower, "fit")
    rates = [g["lr"] for g in slower.objective.configure_optimizers(slower)["optimizer"].param_groups]
    assert rates == pytest.approx([4e-5, 2e-3])


def test_quantizer_distillation_refuses_bad_rates_and_a_model_without_quantizers():
    for name in ("lr_step", "lr_clip", "lr_scale", "temperature"):
        with pytest.raises(ConfigError, match=rf"QuantizerDistillation\.{name}=0 is invalid: expected > 0"):
            QuantizerDistillation(**{name: 0})
    module = small_cim_module(QuantizerDistillation())
    for *_, quantizer in iter_quantizers(module.model):
        quantizer.enabled = False
    with pytest.raises(ConfigError, match=r"no learnable one: use it on a CIM model"):
        module.objective.configure_optimizers(module)


def test_the_low_adc_qat_recipe_continues_a_low_adc_ptq_checkpoint_through_the_cli(run_cli):
    """The README's two commands on a tiny budget: PTQ with `cimq_ptq.yaml` + `low_adc.yaml`, then
    `low_adc_qat.yaml` from its checkpoint (``--trainer.callbacks.init_args.init_from``): QAT by distillation moves
    the input steps and ADC ranges PTQ left, and the learned parameters are those alone."""
    from cimq_pl.callbacks import PostTrainingQuantization

    model = ["--config", "configs/resnet20_cifar10.yaml"]
    tiny = ["--data.root", str(CIFAR10), "--model.pretrained", str(RESNET20), "--data.init_args.calibration_size", "32",
            "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "8", "--trainer.limit_val_batches", "0",
            "--model.simulation", "eager"]
    fit = run_cli("fit", *model, "--config", "configs/quant/cimq_ptq.yaml", "--config", "configs/quant/low_adc.yaml",
                  *tiny, "--model.objective.init_args.iters_per_block", "1",
                  "--model.objective.init_args.batch_size", "8")
    checkpoint = next(cb for cb in fit.trainer.callbacks if isinstance(cb, PostTrainingQuantization)).checkpoint_path
    ptq = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    qat = run_cli("fit", *model, "--config", "configs/quant/low_adc_qat.yaml", *tiny, "--trainer.max_steps", "2",
                  "--trainer.callbacks.init_args.init_from", str(checkpoint))
    assert isinstance(qat.model.objective, QuantizerDistillation) and qat.trainer.global_step == 2
    assert float(qat.trainer.callback_metrics["train/kd"]) > 0 and "train/ce" not in qat.trainer.callback_metrics
    learning = {name for name, p in qat.model.named_parameters() if p.requires_grad}
    assert learning and all(".input_quantizer." in n or ".psum_quantizer." in n for n in learning), sorted(learning)[:5]
    moved = {name for name, value in qat.model.state_dict().items()
             if name in ptq and "quantizer" in name and torch.is_tensor(value) and not torch.equal(value, ptq[name])}
    assert any(".input_quantizer." in n for n in moved) and any(".psum_quantizer." in n for n in moved)
