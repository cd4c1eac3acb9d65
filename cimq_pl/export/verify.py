"""`compare_with_model`: how closely an export's integer executor reproduces the fake-quant model."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn


@dataclass
class Agreement:
    """Executor vs fake-quant model over the same images.

    Attributes:
        images: images compared.
        same_predictions: images whose top-1 class is the same for both.
        max_relative_logit_error: max over images of max|logits_exec - logits_model| / max|logits_model|.
        max_absolute_logit_error: max over images and classes of |logits_exec - logits_model|.
        model_correct: images the fake-quant model classifies correctly (labels given).
        executor_correct: images the executor classifies correctly.
        model_seconds: wall time of the fake-quant model's forward passes (s).
        executor_seconds: wall time of the executor's forward passes (s).
    """

    images: int = 0
    same_predictions: int = 0
    max_relative_logit_error: float = 0.0
    max_absolute_logit_error: float = 0.0
    model_correct: int = 0
    executor_correct: int = 0
    model_seconds: float = 0.0
    executor_seconds: float = 0.0

    def update(self, model_logits: torch.Tensor, executor_logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add one batch (logits (N, classes), labels (N,))."""
        difference = (executor_logits - model_logits).abs()
        scale = model_logits.abs().amax(1).clamp_min(torch.finfo(model_logits.dtype).tiny)
        self.images += labels.numel()
        self.same_predictions += int((executor_logits.argmax(1) == model_logits.argmax(1)).sum())
        self.max_relative_logit_error = max(self.max_relative_logit_error, float((difference.amax(1) / scale).max()))
        self.max_absolute_logit_error = max(self.max_absolute_logit_error, float(difference.max()))
        self.model_correct += int((model_logits.argmax(1) == labels).sum())
        self.executor_correct += int((executor_logits.argmax(1) == labels).sum())

    @property
    def predictions_equal(self) -> bool:
        """Whether every image got the same top-1 class."""
        return self.same_predictions == self.images


@torch.no_grad()
def compare_with_model(model: nn.Module, executor: nn.Module, batches: Iterable) -> Agreement:
    """Run both on every ``(images, labels)`` batch (model in eval mode) and return their `Agreement`."""
    was_training = model.training
    model.eval()
    agreement = Agreement()
    try:
        for images, labels in batches:
            start = time.perf_counter()
            model_logits = model(images)
            middle = time.perf_counter()
            executor_logits = executor(images)
            agreement.model_seconds += middle - start
            agreement.executor_seconds += time.perf_counter() - middle
            agreement.update(model_logits, executor_logits, labels)
    finally:
        model.train(was_training)
    return agreement


__all__ = ["Agreement", "compare_with_model"]
