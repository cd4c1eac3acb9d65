"""`ActivationQuantizer`: LSQ input quantizer with an optional bit-sparse code set (SPEC 4.1)."""

from __future__ import annotations

from typing import Any, Optional

import torch

from cimq_pl.errors import ConfigError
from cimq_pl.quant.layout import is_channels_last
from cimq_pl.quant.ste import code_range, popcount
from cimq_pl.quant.uniform import UniformQuantizer


class ActivationQuantizer(UniformQuantizer):
    """Quantizer of the inputs a CIM layer feeds to its wordlines.

    Codes are ``bits``-bit integers, unsigned for layers fed by a ReLU and two's complement otherwise
    (``signed=None`` decides from calibration data). With ``max_ones = k < bits`` the codes are restricted to
    the *bit-sparse code set*: integers whose ``bits``-bit two's-complement pattern has at most k one bits.
    Values are projected to the nearest allowed code (ties to the smaller code) with a straight-through
    gradient; the step size is learned (LSQ).

    Args:
        bits: code bits b_a.
        signed: see `UniformQuantizer`.
        max_ones: most 1 bits allowed per code, None (or ``bits``) for the plain uniform quantizer.
        observer: ``"minmax"``, ``"percentile"`` or ``"mse"``.
        grad_scaling: LSQ gradient scaling of the step.
        sparsity_weight: lambda of the bit-sparsity regularizer (SPEC 4.1); 0 records no penalty.
        keep_prob: QDrop keep probability (see `QuantizerBase`).
        step_scale: factor on the step the observer initialises (above 1: smaller codes, fewer 1 bits).
        **observer_kwargs: forwarded to the observer.

    Attributes:
        last_sparsity_penalty: the penalty of the last training forward (cleared by whoever reads it).

    Raises:
        ValueError: when ``max_ones`` is outside [1, bits].
    """

    def __init__(
        self,
        bits: int,
        signed: Optional[bool] = None,
        max_ones: Optional[int] = None,
        observer: str = "minmax",
        grad_scaling: bool = True,
        sparsity_weight: float = 0.0,
        keep_prob: Optional[float] = None,
        step_scale: float = 1.0,
        **observer_kwargs,
    ) -> None:
        super().__init__(bits, signed, observer, grad_scaling, keep_prob, **observer_kwargs)
        if not 0 < step_scale < float("inf"):
            raise ValueError(f"step_scale={step_scale!r} is invalid: expected a finite number > 0")
        self.step_scale = step_scale
        if max_ones is not None and not 1 <= max_ones <= bits:
            raise ValueError(f"max_ones={max_ones!r} is invalid: expected an integer in [1, bits={bits}] or None")
        self.max_ones = max_ones
        self.sparsity_weight = sparsity_weight
        self.last_sparsity_penalty: Optional[torch.Tensor] = None
        self._tables: dict = {}

    SETTINGS = ("keep_prob", "sparsity_weight")

    @torch.no_grad()
    def init_from_observer(self) -> None:
        """The observer's step times ``step_scale`` (fewer 1 bits per code above 1)."""
        super().init_from_observer()
        if self.step_scale != 1.0:
            self.step.mul_(self.step_scale)

    def get_extra_state(self) -> Any:
        return {**super().get_extra_state(), "max_ones": self.max_ones}

    def set_extra_state(self, state: Any) -> None:
        """Load the calibration; the code set is the configured one (a checkpoint of another set is refused)."""
        saved = state.get("max_ones", self.max_ones)
        normalise = lambda k: None if k is None or k >= self.bits else k  # noqa: E731 - k >= bits: all codes
        if normalise(saved) != normalise(self.max_ones):
            raise ConfigError(
                f"the checkpoint's input codes have max_ones={saved} but this layer is configured with "
                f"max_ones={self.max_ones}: set BitSparseActivations.max_ones: {saved} (or recalibrate)"
            )
        super().set_extra_state(state)

    @property
    def sparse_codes(self) -> bool:
        """Whether codes are restricted to a bit-sparse set (max_ones < bits)."""
        return self.max_ones is not None and self.max_ones < self.bits

    def allowed_codes(self, device: Optional[torch.device] = None) -> tuple:
        """Sorted allowed codes and their popcounts, as float tensors on ``device``."""
        key = (bool(self.signed), self.max_ones, str(device))
        if key not in self._tables:
            qmin, qmax = code_range(self.bits, bool(self.signed))
            codes = torch.arange(qmin, qmax + 1, dtype=torch.float32)
            ones = popcount(codes, self.bits)
            if self.sparse_codes:
                keep = ones <= self.max_ones
                codes, ones = codes[keep], ones[keep]
            self._tables[key] = (codes.to(device), ones.to(device=device, dtype=torch.float32))
        return self._tables[key]

    def project(self, normalized: torch.Tensor) -> torch.Tensor:
        """Nearest allowed code of normalised values, ties to the smaller code (plain rounding without a sparse
        code set); values beyond the code range get the extreme allowed codes.

        The midpoints between allowed codes are multiples of 1/2, so ``v <= m`` exactly when
        ``ceil(2 v) <= 2 m``: a look-up table indexed by ``ceil(2 v)`` gives what a binary search over the
        midpoints gives, several times faster.
        """
        if not self.sparse_codes:
            return torch.round(normalized)
        qmin, qmax = code_range(self.bits, bool(self.signed))
        lut = self._projection_table(normalized.dtype, normalized.device)
        index = torch.ceil(normalized * 2).sub_(2 * qmin).clamp_(0, 2 * (qmax - qmin)).to(torch.int64)
        return torch.take(lut, index)

    def _projection_table(self, dtype: torch.dtype, device) -> torch.Tensor:
        """Allowed code nearest to every ``v`` with ``ceil(2 v) = t``, for t = 2 qmin ... 2 qmax."""
        key = ("lut", bool(self.signed), self.max_ones, dtype, str(device))
        if key not in self._tables:
            table, _ = self.allowed_codes()
            table = table.to(torch.float64)
            qmin, qmax = code_range(self.bits, bool(self.signed))
            doubled_midpoints = table[1:] + table[:-1]  # 2 m, integers
            t = torch.arange(2 * qmin, 2 * qmax + 1, dtype=torch.float64)
            index = (doubled_midpoints.view(1, -1) < t.view(-1, 1)).sum(1)  # midpoints m < v
            self._tables[key] = table[index].to(dtype=dtype, device=device)
        return self._tables[key]

    def codes(self, x: torch.Tensor) -> tuple:
        """As `UniformQuantizer.codes`; while training with ``sparsity_weight > 0`` it also records
        ``last_sparsity_penalty = sparsity_weight x expected_ones(x)`` for the training objective to add."""
        if self.training and self.sparsity_weight > 0 and torch.is_grad_enabled():
            self.last_sparsity_penalty = self.sparsity_weight * self.expected_ones(x)
        return super().codes(x)

    def expected_ones(self, x: torch.Tensor) -> torch.Tensor:
        """Differentiable surrogate of the mean number of 1 bits per code of ``x`` (for a sparsity regularizer).

        The clamped normalised value v = clamp(x / step) lies between two neighbouring allowed codes
        a_lo <= v <= a_hi; the surrogate interpolates their popcounts linearly:
        ``(1 - f) * ones(a_lo) + f * ones(a_hi)`` with ``f = (v - a_lo) / (a_hi - a_lo)``. It equals the true
        popcount at every allowed code, is piecewise linear in x and in the step, and its gradient pushes
        values towards neighbours with fewer 1 bits.

        Args:
            x: the quantizer's input.

        Returns:
            0-dim tensor: mean 1 bits per element (bits).
        """
        if not self.initialized:
            self.init_from_data(x)
        qmin, qmax = self.code_range
        table, ones = self.allowed_codes(x.device)
        table, ones = table.to(x.dtype), ones.to(x.dtype)
        v = torch.clamp(x / self._step_for(x), qmin, qmax)
        nhwc = is_channels_last(v)  # bucketize wants contiguous values: a channels-last tensor's NHWC view is one
        values = v.detach().permute(0, 2, 3, 1) if nhwc else v.detach()
        low = (torch.bucketize(values, table, right=True) - 1).clamp(0, table.numel() - 2)
        low = low.permute(0, 3, 1, 2) if nhwc else low
        a_low, a_high = table[low], table[low + 1]
        fraction = (v - a_low) / (a_high - a_low)
        return ((1 - fraction) * ones[low] + fraction * ones[low + 1]).mean()

    def extra_repr(self) -> str:
        return super().extra_repr() + f", max_ones={self.max_ones}"
