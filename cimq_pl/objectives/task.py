"""Cross-entropy on the labels (plus the bit-sparsity regularizer): FP fine-tuning and QAT."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cimq_pl.errors import ConfigError
from cimq_pl.objectives.base import Objective, sparsity_penalty
from cimq_pl.quant import iter_quantizers
from cimq_pl.quant.diagnostics import check_finite
from cimq_pl.seeding import derive_seed, seed_step

__all__ = ["TaskObjective", "cosine_over_fit"]


class TaskObjective(Objective):
    """Task loss ``cross_entropy + sum(lambda x expected 1 bits)``, SGD with cosine decay over the run.

    The module's default objective (plain fine-tuning, and QAT with `QuantizationAwareTraining`). Network weights
    use the module's ``lr``, ``momentum`` and ``weight_decay``; quantizer parameters (weight and input step sizes,
    learnable ADC clips) use ``lr x quantizer_lr_scale`` without weight decay.

    Args:
        quantizer_lr_scale: learning-rate multiplier of the quantizer parameters.

    Raises:
        ConfigError: quantizer_lr_scale <= 0.
    """

    def __init__(self, quantizer_lr_scale: float = 1.0):
        if isinstance(quantizer_lr_scale, bool) or not quantizer_lr_scale > 0:
            raise ConfigError(f"TaskObjective.quantizer_lr_scale={quantizer_lr_scale!r} is invalid: expected > 0")
        self.quantizer_lr_scale = quantizer_lr_scale

    def training_step(self, module, batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        # the step's random draws (QDrop masks) depend on where the step is, not on what ran before: exact resume
        datamodule = getattr(getattr(module, "_trainer", None), "datamodule", None)
        rank = getattr(module, "global_rank", 0)
        seed_step(derive_seed(getattr(datamodule, "seed", 0), rank, module.current_epoch, batch_idx), images.device)
        logits = module(images)
        loss = self.loss(module, logits, images, labels)
        penalty = sparsity_penalty(module.model)
        if penalty is not None:
            module.log("train/sparsity_penalty", penalty)
            loss = loss + penalty
        check_finite(loss, module.model, images, where=f"training step {batch_idx} of epoch {module.current_epoch}")
        module.log("train/loss", loss, prog_bar=True)
        module.log("train/acc", (logits.argmax(1) == labels).float().mean())
        return loss

    def loss(self, module, logits: torch.Tensor, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The batch's loss before the bit-sparsity penalty: the cross-entropy (logged as ``train/ce``)."""
        ce = F.cross_entropy(logits, labels)
        module.log("train/ce", ce)
        return ce

    def configure_optimizers(self, module):
        hp = module.hparams
        quantizer = [
            p for *_, q in iter_quantizers(module.model) if q.enabled for p in q.parameters() if p.requires_grad
        ]
        quantizer_ids = {id(p) for p in quantizer}
        weights = [p for p in module.parameters() if p.requires_grad and id(p) not in quantizer_ids]
        groups = [{"params": weights, "weight_decay": hp.weight_decay}]
        if quantizer:
            groups.append({"params": quantizer, "weight_decay": 0.0, "lr": hp.lr * self.quantizer_lr_scale})
        return cosine_over_fit(torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum), module.trainer)


def cosine_over_fit(optimizer: torch.optim.Optimizer, trainer) -> dict:
    """Lightning's optimizer config of ``optimizer`` with its learning rates decayed by a cosine over the whole fit
    (per step, to 0 at ``trainer.estimated_stepping_batches``)."""

    def cosine(step: int) -> float:
        # The length of the fit is read at the first step, not here: asking Lightning for it now would build
        # the train loader before a checkpoint is restored, and a resumed fit would replay the wrong batches.
        return 1.0 if step == 0 else 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, trainer.estimated_stepping_batches))))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
