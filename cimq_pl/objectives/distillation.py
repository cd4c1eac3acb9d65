"""Knowledge distillation from the float network: a QAT loss that keeps the network near what PTQ reconstructed."""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from cimq_pl.errors import ConfigError
from cimq_pl.objectives.base import quantizer_parameters
from cimq_pl.objectives.task import TaskObjective, cosine_over_fit
from cimq_pl.quant import iter_quantizers

__all__ = ["DistillationObjective", "QuantizerDistillation", "distillation_loss"]


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 KL(softmax(teacher / T) || softmax(student / T))``, the mean over the batch (Hinton et al.).

    The ``T^2`` keeps the gradient's size independent of the temperature. Zero when the two logits agree.
    """
    teacher = F.log_softmax(teacher_logits.detach() / temperature, dim=1)
    student = F.log_softmax(student_logits / temperature, dim=1)
    return F.kl_div(student, teacher, reduction="batchmean", log_target=True) * temperature**2


class DistillationObjective(TaskObjective):
    """QAT that follows the float network: ``T^2 KL(teacher || student) + ce_weight x cross-entropy`` (plus the
    bit-sparsity regulariser), with `TaskObjective`'s optimizer and schedule.

    PTQ reconstructs the float network's outputs; the task loss on a few thousand labelled images pulls QAT away
    from that optimum (measured: QAT from the PTQ checkpoint lost 1-1.6 points at a 3-bit ADC). Distillation keeps
    the float network as the target and needs no labels.

    The teacher is a frozen copy of the network as the module built it, taken at ``setup`` of a fit, before
    `QuantizationAwareTraining` loads a PTQ checkpoint (``init_from``) or Lightning restores one: the pretrained
    float weights (BN folded), every quantizer off. It lives on the objective, not in the module, so it is in no
    checkpoint and no DDP wrapper; each process builds its own.

    Args:
        temperature: T > 0 of the softened distributions (1: the plain logits).
        ce_weight: weight of the labelled cross-entropy beside the distillation term (0: labels are not used).
        quantizer_lr_scale: as `TaskObjective`.

    Raises:
        ConfigError: temperature <= 0, ce_weight < 0 or quantizer_lr_scale <= 0.
    """

    def __init__(self, temperature: float = 1.0, ce_weight: float = 0.0, quantizer_lr_scale: float = 1.0):
        super().__init__(quantizer_lr_scale=quantizer_lr_scale)
        if isinstance(temperature, bool) or not temperature > 0:
            raise ConfigError(f"{type(self).__name__}.temperature={temperature!r} is invalid: expected > 0")
        if isinstance(ce_weight, bool) or not ce_weight >= 0:
            raise ConfigError(f"{type(self).__name__}.ce_weight={ce_weight!r} is invalid: expected >= 0")
        self.temperature, self.ce_weight = float(temperature), float(ce_weight)
        self.teacher: Optional[nn.Module] = None

    def setup(self, module, stage: str) -> None:
        if stage == "fit":
            self.teacher = float_teacher(module.model)

    def loss(self, module, logits: torch.Tensor, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.teacher is None:
            raise ConfigError("DistillationObjective has no teacher: its setup(module, 'fit') did not run (the module "
                              "calls it at the start of trainer.fit)")
        teacher = self.teacher.to(images.device)
        with torch.no_grad():
            teacher_logits = teacher(images)
        kd = distillation_loss(logits, teacher_logits, self.temperature)
        module.log("train/kd", kd)
        if self.ce_weight == 0:
            return kd
        return kd + self.ce_weight * super().loss(module, logits, images, labels)


class QuantizerDistillation(DistillationObjective):
    """QAT as one reconstruction of the whole network: `DistillationObjective`'s loss, but only the input step sizes
    and the ADC ranges (clip thetas, and offsets where the ranges are asymmetric) learn, with Adam at the PTQ
    preset's rates (``cimq_ptq.yaml``: 4e-4 and 1e-2) cosine-decayed over the fit; the weights, biases and weight
    steps stay as PTQ left them.

    The recipe for a low-ADC PTQ checkpoint (``configs/quant/low_adc_qat.yaml``): block reconstruction fits each
    block's quantizers to that block's output; this fits them all to the network's logits on the same train
    images. Measured (README "QAT for the low-ADC end"): on the 4,000 lossless train images it keeps or adds to
    PTQ, where QAT of the weights too, the task loss or the JPEG train images lost accuracy.

    The other parameters are frozen at ``setup`` (``requires_grad`` off), before Lightning wraps the model for DDP,
    so no rank waits for gradients that never come; a resumed fit freezes them again.

    Args:
        temperature: T > 0 of the softened distributions, as `DistillationObjective`.
        lr_step: Adam's learning rate of the input step sizes (> 0).
        lr_clip: Adam's learning rate of the ADC clips and offsets (> 0).
        lr_scale: multiplies both rates (> 0; 1.0: PTQ's own rates).

    Raises:
        ConfigError: a temperature, rate or scale that is not > 0; at ``configure_optimizers``, a model with no
            learnable input step or ADC range (no CIM quantizer on).
    """

    weight_lr = 0.0  # Adam's rate of everything else (weights, biases, weight steps); 0: frozen at setup

    def __init__(self, temperature: float = 1.0, lr_step: float = 4e-4, lr_clip: float = 1e-2, lr_scale: float = 1.0):
        super().__init__(temperature=temperature)
        for name, value in (("lr_step", lr_step), ("lr_clip", lr_clip), ("lr_scale", lr_scale)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"{type(self).__name__}.{name}={value!r} is invalid: expected > 0")
        self.lr_step, self.lr_clip = lr_step * lr_scale, lr_clip * lr_scale

    def setup(self, module, stage: str) -> None:
        super().setup(module, stage)
        if stage == "fit" and self.weight_lr == 0:
            for parameter in self._others(module):
                parameter.requires_grad_(False)

    def _learned(self, module) -> list:
        learned = quantizer_parameters(module.model)
        return [learned["step"], learned["clip"]]

    def _others(self, module) -> list:
        kept = {id(p) for group in self._learned(module) for p in group}
        return [p for p in module.parameters() if id(p) not in kept and p.requires_grad]

    def configure_optimizers(self, module):
        steps, clips = self._learned(module)
        if not steps and not clips:
            raise ConfigError(f"{type(self).__name__} learns the input steps and ADC ranges, but the model has no "
                              "learnable one: use it on a CIM model (model.cim) whose quantizers are on")
        rates = ((steps, self.lr_step), (clips, self.lr_clip))
        groups = [{"params": params, "lr": lr} for params, lr in rates if params]
        if self.weight_lr > 0:
            groups.append({"params": self._others(module), "lr": self.weight_lr})
        return cosine_over_fit(torch.optim.Adam(groups), module.trainer)


def float_teacher(model: nn.Module) -> nn.Module:
    """A frozen float copy of ``model``: its own Parameters (no gradient), every quantizer off, eval mode."""
    teacher = copy.deepcopy(model)
    for *_, quantizer in iter_quantizers(teacher):
        quantizer.enabled = False
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher.eval()
