"""`UniformQuantizer`: LSQ fake quantizer (learnable step size, straight-through rounding) and its base class."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from cimq_pl.quant.dropping import keep_mask
from cimq_pl.quant.observers import RangeObserver
from cimq_pl.quant.ste import clip_levels, code_range, lsq_grad_factor, round_ste, scale_grad


def check_bits(bits: int) -> None:
    """Raise `ValueError` unless ``bits`` (a quantizer's code width) is an integer in [1, 16]."""
    if not 1 <= bits <= 16:
        raise ValueError(f"bits={bits!r} is invalid: expected an integer in [1, 16]")


def check_choice(name: str, value: str, allowed: tuple) -> None:
    """Raise `ValueError` unless ``value`` (argument ``name``) is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is invalid: expected one of {list(allowed)}")


class QuantizerBase(nn.Module):
    """The life cycle and switches every quantizer shares.

    Life cycle: ``start_observing()`` -> forward passes (values pass through, the observer records them) ->
    ``finish_observing()`` (scales/ranges from what was seen) -> learning (PTQ/QAT) -> frozen (weights:
    `WeightQuantizer.harden_` / `bake_rounding_`). A quantizer used before it was initialised initialises
    itself from its first input (its weight, for weights).

    Attributes:
        enabled: False makes the quantizer the identity (float values pass through, no cycles or slices).
        observe: True while observing (set by ``start_observing``, cleared by ``finish_observing``).
        keep_prob: QDrop keep probability p, or None for no dropping. In training mode each element keeps its
            quantized value with probability p and its full-precision value otherwise (fresh draw per element
            per call); never applied in eval mode.
        initialized: whether scales/ranges were set (by ``init_from_observer`` or lazily from the first
            batch seen while enabled). Saved in the state_dict as extra state.
    """

    #: Settings (`QuantizerOptions` fields without their role prefix) that change in place, keeping calibration.
    SETTINGS: tuple = ("keep_prob",)

    def __init__(self, observer: str = "minmax", keep_prob: Optional[float] = None, **observer_kwargs) -> None:
        super().__init__()
        self.enabled = True
        self.observe = False
        self.keep_prob = keep_prob
        self.initialized = False
        self.observer = RangeObserver(observer, **observer_kwargs)

    @property
    def dropping(self) -> bool:
        """Whether QDrop is active for the next call (training mode and ``keep_prob`` set)."""
        return self.training and self.keep_prob is not None

    def drop_mask(self, like: torch.Tensor, channels_last: Optional[bool] = None) -> torch.Tensor:
        """Bool mask, True where an element keeps its quantized value (probability ``keep_prob``, `keep_mask`)."""
        return keep_mask(like, self.keep_prob, channels_last)

    def start_observing(self) -> None:
        """Forget what the observer saw; until ``finish_observing`` values pass through it unquantized."""
        self.observer.reset()
        self.observe = True

    def finish_observing(self) -> None:
        """Stop observing; when the observer saw data, take the scales/ranges from it (``init_from_observer``)."""
        if self.observe:
            self.observe = False
            if self.observer.has_data:
                self.init_from_observer()

    @torch.no_grad()
    def adopt_calibration_(self, old: "QuantizerBase") -> bool:
        """Take over the calibrated tensors of ``old``, the quantizer this one replaces, when all their shapes fit.

        Returns:
            Whether this quantizer is now initialised from ``old`` (False: ``old`` was not calibrated, or a
            scale/range changed shape, e.g. another granularity, and calibration must run again).
        """
        if not old.initialized:
            return False
        mine = {k: v for k, v in self.state_dict(keep_vars=True).items() if "." not in k and torch.is_tensor(v)}
        theirs = {k: v for k, v in old.state_dict(keep_vars=True).items() if "." not in k and torch.is_tensor(v)}
        if any(k in theirs and theirs[k].shape != v.shape for k, v in mine.items()) or not set(theirs) & set(mine):
            return False
        for name, tensor in mine.items():
            if name in theirs:
                tensor.copy_(theirs[name])
        self.initialized = True
        return True

    def get_extra_state(self) -> Any:
        return {"initialized": self.initialized}

    def set_extra_state(self, state: Any) -> None:
        self.initialized = bool(state["initialized"])


class UniformQuantizer(QuantizerBase):
    """Per-tensor uniform quantizer with a learnable step size (LSQ, Esser et al. ICLR 2020).

    ``y = step * clamp(round(x / step), qmin, qmax)`` with a straight-through round; the step's gradient is
    scaled by 1/sqrt(numel_per_sample * qmax) when ``grad_scaling``.

    Args:
        bits: code bits.
        signed: two's-complement codes [-2^(b-1), 2^(b-1)-1] when True, [0, 2^b-1] when False, decided at
            initialisation from the observed minimum (< 0 means signed) when None.
        observer: observer method, ``"minmax"``, ``"percentile"`` or ``"mse"``.
        grad_scaling: apply LSQ gradient scaling to the step.
        **observer_kwargs: forwarded to `RangeObserver`.

    Raises:
        ValueError: when bits is outside [1, 16].
    """

    def __init__(
        self,
        bits: int,
        signed: Optional[bool] = True,
        observer: str = "minmax",
        grad_scaling: bool = True,
        keep_prob: Optional[float] = None,
        **observer_kwargs,
    ) -> None:
        super().__init__(observer, keep_prob, **observer_kwargs)
        check_bits(bits)
        self.bits = bits
        self.signed = signed
        self.grad_scaling = grad_scaling
        self.step = nn.Parameter(torch.ones(1))

    def adopt_calibration_(self, old: QuantizerBase) -> bool:
        adopted = super().adopt_calibration_(old)
        if adopted:
            self.signed = old.signed
        return adopted

    def get_extra_state(self) -> Any:
        return {"initialized": self.initialized, "signed": self.signed}

    def set_extra_state(self, state: Any) -> None:
        self.initialized = bool(state["initialized"])
        self.signed = state["signed"]

    @property
    def code_range(self) -> tuple:
        """(qmin, qmax) integer codes; an unresolved sign counts as unsigned."""
        return code_range(self.bits, bool(self.signed))

    def project(self, normalized: torch.Tensor) -> torch.Tensor:
        """Map clamped normalised values to allowed integer codes (nearest integer here)."""
        return torch.round(normalized)

    def _step_for(self, x: torch.Tensor) -> torch.Tensor:
        step = self.step.abs() + 1e-12
        if self.grad_scaling:
            per_sample = x[0].numel() if x.dim() > 1 else x.numel()
            step = scale_grad(step, lsq_grad_factor(per_sample, self.code_range[1]))
        return step

    @torch.no_grad()
    def init_from_observer(self) -> None:
        """Set ``step`` (and an unresolved ``signed``) from the observer, then reset the observer."""
        if self.signed is None:
            self.signed = bool(self.observer.item_min.min() < 0)
        qmin, qmax = self.code_range
        levels = clip_levels(qmin, qmax)
        alpha = self.observer.compute(
            torch.zeros(1, dtype=torch.long, device=self.step.device), 1, qmin, qmax, levels, self.project
        )
        self.step.copy_(alpha / levels)
        self.initialized = True
        self.observer.reset()

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor) -> None:
        """Observe ``x`` alone and initialise from it."""
        self.observer.reset()
        self.observer.update(x.reshape(1, -1))
        self.init_from_observer()

    def codes(self, x: torch.Tensor) -> tuple:
        """Integer codes of ``x`` with straight-through gradients, and the step.

        Returns:
            ``(codes, step)``: codes has x's shape (integer-valued floats in [qmin, qmax]); with QDrop active,
            dropped elements hold ``x / step`` instead. ``step`` carries the LSQ gradient.
        """
        if not self.initialized:
            self.init_from_data(x)
        qmin, qmax = self.code_range
        step = self._step_for(x)
        normalized = x / step
        clamped = torch.clamp(normalized, qmin, qmax)
        codes = clamped + (self.project(clamped) - clamped).detach()
        if self.dropping:
            codes = torch.where(self.drop_mask(codes), codes, normalized)
        return codes, step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantized ``x`` (identity when disabled; observer update and identity when observing)."""
        if not self.enabled:
            return x
        if self.observe:
            self.observer.update(x.reshape(1, -1))
            return x
        codes, step = self.codes(x)
        return codes * step

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}, enabled={self.enabled}"


__all__ = ["QuantizerBase", "UniformQuantizer", "check_bits", "check_choice", "round_ste"]
