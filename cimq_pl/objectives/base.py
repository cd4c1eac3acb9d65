"""The objective base class and the pieces every objective needs."""

from __future__ import annotations

import abc
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from cimq_pl.quant import iter_quantizers

__all__ = ["Objective", "logs_this_step", "quantizer_parameters", "sparsity_penalty"]


class Objective(abc.ABC):
    """A training recipe for :class:`~cimq_pl.module.CIMQModule`, chosen by its ``objective`` argument.

    An objective is plain configuration (its init arguments, what ``model.objective`` says in YAML) until the
    module calls :meth:`setup`, which builds whatever it needs from the model and the trainer.
    """

    def setup(self, module, stage: str) -> None:
        """Prepare ``module`` for ``stage`` (``fit``, ``validate``, ``test``, ``predict``), at the module's ``setup``:
        after every callback's ``setup``, before a checkpoint is restored and optimizers are configured."""

    @property
    def makes_train_batches(self) -> bool:
        """Whether the fit trains on :meth:`train_dataloader` instead of the datamodule's train loader."""
        return False

    def train_dataloader(self) -> DataLoader:
        """The objective's own train loader (only when :attr:`makes_train_batches`)."""
        raise TypeError(f"{type(self).__name__} trains on the datamodule's train loader")

    @abc.abstractmethod
    def training_step(self, module, batch: Any, batch_idx: int) -> torch.Tensor:
        """The loss of one training batch (``batch_idx`` counts the batches of the epoch)."""

    @abc.abstractmethod
    def configure_optimizers(self, module) -> Any:
        """Lightning's ``configure_optimizers`` for ``module``."""


def quantizer_parameters(model: nn.Module, include_frozen: bool = False) -> dict[str, list[nn.Parameter]]:
    """Learnable quantizer parameters of every CIM layer of ``model``, by kind.

    Weight step sizes are left out (PTQ keeps them at their calibrated values; QAT learns them with the
    weights). A non-learnable ADC clip (``learn_clip=False``) is never returned.

    Args:
        model: a network or part of one.
        include_frozen: also return parameters whose ``requires_grad`` is off right now (a PTQ block that is
            not being reconstructed); a non-learnable ADC clip stays out.

    Returns:
        ``{"rounding": AdaRound logits, "step": input step sizes, "clip": ADC clip thetas (and offsets)}``.
    """
    groups: dict[str, list[nn.Parameter]] = {"rounding": [], "step": [], "clip": []}
    for _, role, quantizer in iter_quantizers(model):
        if not quantizer.enabled:
            continue
        for name, param in quantizer.named_parameters(recurse=False):
            if role == "weight" and name == "step":
                continue
            if role == "psum" and not quantizer.learn_clip:
                continue
            if not (param.requires_grad or include_frozen):
                continue
            kind = {"rounding_logits": "rounding", "theta": "clip", "offset": "clip"}.get(name, "step")
            groups[kind].append(param)
    return groups


def logs_this_step(module) -> bool:
    """Whether Lightning sends this training step's on-step metrics to the loggers: every
    ``trainer.log_every_n_steps`` steps and when the fit stops (True outside a fit).

    A ``self.log`` call costs about 0.4 ms on the CPU (Lightning moves the value into its result collection),
    about 1% of a PTQ step each; an on-step value logged on other steps reaches only the progress bar, and is
    replaced before a logger sees it.
    """
    trainer = getattr(module, "_trainer", None)
    connector = getattr(trainer, "_logger_connector", None)
    return True if connector is None else bool(connector.should_update_logs)


def sparsity_penalty(model: nn.Module) -> torch.Tensor | None:
    """Sum of the bit-sparsity penalties the input quantizers recorded in the last forward, or None.

    Each enabled input quantizer with ``sparsity_weight > 0`` records ``sparsity_weight x expected 1 bits per
    code`` while training (SPEC 4.1); reading the sum clears the records.
    """
    total = None
    for *_, quantizer in iter_quantizers(model, ("input",)):
        penalty = getattr(quantizer, "last_sparsity_penalty", None)
        if penalty is not None:
            total = penalty if total is None else total + penalty
            quantizer.last_sparsity_penalty = None
    return total
