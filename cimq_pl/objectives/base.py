"""The objective protocol and the pieces every objective needs."""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from cimq_pl.quant import iter_quantizers

__all__ = ["Objective", "quantizer_parameters", "sparsity_penalty"]


class Objective(Protocol):
    """A training recipe for :class:`~cimq_pl.module.CIMQModule`."""

    def training_step(self, module, batch: Any, batch_idx: int) -> torch.Tensor: ...

    def configure_optimizers(self, module) -> Any: ...


def quantizer_parameters(model: nn.Module, include_frozen: bool = False) -> dict[str, list[nn.Parameter]]:
    """Learnable quantizer parameters of every CIM layer of ``model``, by kind.

    Weight step sizes are left out (PTQ keeps them at their calibrated values; QAT learns them with the
    weights). A non-learnable ADC clip (``learn_clip=False``) is never returned.

    Args:
        model: a network or part of one.
        include_frozen: also return parameters whose ``requires_grad`` is off right now (a PTQ block that is
            not being reconstructed); a non-learnable ADC clip stays out.

    Returns:
        ``{"rounding": AdaRound logits, "step": input step sizes, "clip": ADC clip thetas}``.
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
            kind = {"rounding_logits": "rounding", "theta": "clip"}.get(name, "step")
            groups[kind].append(param)
    return groups


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
