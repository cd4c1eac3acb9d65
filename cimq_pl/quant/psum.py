"""`PsumQuantizer`: the b_p-bit ADC reading every array column, with an APoT-style learned clip (SPEC 4.3).

Partial sums are in integer code units (sum of input digits x weight digits over an array's rows). An ADC of
b_p bits maps a partial sum p to the code ``clamp(round(p / step), qmin, qmax)`` with ``step = alpha / levels``:

* signed columns (a slice holding signed weight digits, or float inputs): two's-complement codes
  [-2^(b_p-1), 2^(b_p-1)-1], ``levels = 2^(b_p-1)-1`` (1 when b_p = 1), so the range is [-alpha-step, alpha];
* unsigned columns (offset-binary or lower two's-complement slices with unsigned inputs, reference columns):
  codes [0, 2^b_p-1], ``levels = 2^b_p-1``, range [0, alpha].

``alpha = alpha0 * exp(theta)``: alpha0 is a buffer set from calibration statistics of p, theta is learned.

The output ``step * code`` is differentiated with a straight-through round, so d out / d alpha is
``(code - p/step) / levels`` for unclipped values and ``code / levels`` for clipped ones: the gradient flows
from both (the reparameterized clipping function of APoT, Li et al. ICLR 2020), not only from clipped values
as in PACT.

An *asymmetric* ADC (``asymmetric=True``) also has a learned offset z per range, in steps: the code is
``clamp(round(p / step - z), qmin, qmax)`` and its value ``step * (code + z)``, so the 2^b_p levels span
[step (qmin + z), step (qmax + z)] wherever the partial sums lie (an ADC whose reference ladder starts at a
programmable voltage). The offset's share of the cycle sum, ``step z sum_j w_j``, is one constant per column that
the macro adds with the bias. Calibration places [lo, hi] by a grid search of least squared error
(`observers.mse_range`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from cimq_pl.quant.layout import is_channels_last
from cimq_pl.quant.observers import OBSERVER_METHODS
from cimq_pl.quant.ste import clip_levels, code_range, constant_tensor
from cimq_pl.quant.uniform import QuantizerBase, check_bits, check_choice

PSUM_GRANULARITIES = ("layer", "array", "column")
#: How an ADC's range (alpha0) is set from the calibration partial sums: the observers, or ``"auto"``.
PSUM_OBSERVERS = (*OBSERVER_METHODS, "auto")
#: ``observer="auto"``: ADCs of at least this many bits start from the min-max range of the partial sums, narrower
#: ones from the MSE-optimal clip. At 8 bits the MSE clip cuts the rare large partial sums that carry the
#: network's strongest features, and costs more accuracy than its finer steps win (README, "ADC ranges").
AUTO_MINMAX_ADC_BITS = 6


def resolve_psum_observer(observer: str, bits: Optional[int]) -> str:
    """The observer an ADC of ``bits`` bits uses for ``observer`` (``"auto"`` resolved by `AUTO_MINMAX_ADC_BITS`;
    ``"mse"`` for an ideal ADC, ``bits`` None, which has no range to set)."""
    check_choice("observer", observer, PSUM_OBSERVERS)
    if observer != "auto":
        return observer
    return "minmax" if bits is not None and bits >= AUTO_MINMAX_ADC_BITS else "mse"


#: ``asymmetric="auto"``: ADCs of at most this many bits get asymmetric ranges (a learned offset per range), wider
#: ones symmetric ranges. Measured on ResNet-20 W4A4 (README, "Asymmetric ADC ranges"): +4.0 points after PTQ at
#: 2 bits, level at 3 (mean of three fits), where the range search's calibration time buys nothing.
AUTO_ASYMMETRIC_MAX_ADC_BITS = 2
PSUM_ASYMMETRIC = (False, True, "auto")


def is_psum_asymmetric_choice(asymmetric) -> bool:
    """Whether ``asymmetric`` is one of `PSUM_ASYMMETRIC` (a bool or ``"auto"``; not 0 or 1)."""
    return isinstance(asymmetric, bool) or asymmetric == "auto"


def resolve_psum_asymmetric(asymmetric, bits: Optional[int]) -> bool:
    """Whether an ADC of ``bits`` bits has asymmetric ranges for ``asymmetric`` (True, False or ``"auto"``,
    resolved by `AUTO_ASYMMETRIC_MAX_ADC_BITS`; False for an ideal ADC, ``bits`` None)."""
    if not is_psum_asymmetric_choice(asymmetric):
        raise ValueError(f"asymmetric={asymmetric!r} is invalid: expected one of {list(PSUM_ASYMMETRIC)}")
    if isinstance(asymmetric, bool):
        return asymmetric
    return bits is not None and bits <= AUTO_ASYMMETRIC_MAX_ADC_BITS


def cycle_sum(values: torch.Tensor, cycle_weights: tuple) -> torch.Tensor:
    """Shift-add over input cycles stacked in the batch dimension.

    Args:
        values: (n_cycles * N, C, H, W), cycle-major in the batch dimension.
        cycle_weights: shift-add weight (int) of each cycle.

    Returns:
        (N, C, H, W): ``sum_j cycle_weights[j] * values[j]``, one matrix-vector product.
    """
    n_cycles = len(cycle_weights)
    if n_cycles == 1:
        return values if cycle_weights[0] == 1 else values * cycle_weights[0]
    weights = constant_tensor(tuple(cycle_weights), values.dtype, values.device)
    if is_channels_last(values):  # sum over the NHWC view, no copy; the result is channels-last too
        nhwc = values.permute(0, 2, 3, 1)
        summed = torch.matmul(weights.unsqueeze(0), nhwc.reshape(n_cycles, -1))
        return summed.view(values.shape[0] // n_cycles, *nhwc.shape[1:]).permute(0, 3, 1, 2)
    summed = torch.matmul(weights.unsqueeze(0), values.reshape(n_cycles, -1))
    return summed.view(values.shape[0] // n_cycles, *values.shape[1:])


def _adc_levels_(normalized, offset, qmin, qmax, count_clipped: bool):
    """The ADC on partial sums already divided by their step, in place: ``clamp(round(p - z), qmin, qmax) + z``
    (z the offset in steps, None: 0). Returns how many values fell outside [qmin, qmax] (None unless
    ``count_clipped``)."""
    view = (1, -1, 1, 1)
    if offset is not None:
        normalized.sub_(offset.view(view))
    clipped = None
    if count_clipped:
        clipped = ((normalized < qmin.view(view)) | (normalized > qmax.view(view))).sum()
    normalized.round_()
    torch.clamp(normalized, qmin.view(view), qmax.view(view), out=normalized)
    if offset is not None:
        normalized.add_(offset.view(view))
    return clipped


@torch.no_grad()
def _adc_cycle_sum_inplace(psums, step, offset, qmin, qmax, cycle_weights, count_clipped: bool):
    """`_ADCCycleSum.forward` without autograd, converting ``psums`` in place (same values, fewer passes)."""
    view = (1, -1, 1, 1)
    normalized = psums.div_(step.view(view))
    clipped = _adc_levels_(normalized, offset, qmin, qmax, count_clipped)
    return cycle_sum(normalized, cycle_weights).mul_(step.view(view)), clipped


class _ADCCycleSum(torch.autograd.Function):
    """Fused ADC + cycle shift-add: u = step * sum_j w_j * (clamp(round(p_j / step - z), qmin, qmax) + z), with
    z the ADC's offset in steps (None: 0, the symmetric range).

    Saves only p; the codes are recomputed in the backward pass. Straight-through round; gradients for p
    (zero where clipped), for the per-channel step (APoT/LSQ form) and for z (a clipped value moves with it, an
    unclipped one does not).
    """

    @staticmethod
    def forward(ctx, psums, step, offset, qmin, qmax, cycle_weights, count_clipped: bool):
        view = (1, -1, 1, 1)
        normalized = psums / step.view(view)
        clipped = _adc_levels_(normalized, offset, qmin, qmax, count_clipped)
        summed = cycle_sum(normalized, cycle_weights)
        summed.mul_(step.view(view))
        ctx.save_for_backward(psums, step, offset, qmin, qmax)
        ctx.cycle_weights = cycle_weights
        if clipped is None:
            clipped = psums.new_zeros((), dtype=torch.long)
        ctx.mark_non_differentiable(clipped)
        return summed, clipped

    @staticmethod
    def backward(ctx, grad_summed, _grad_clipped):
        psums, step, offset, qmin, qmax = ctx.saved_tensors
        view = (1, -1, 1, 1)
        n_cycles = len(ctx.cycle_weights)
        normalized = psums / step.view(view)
        if offset is not None:
            normalized = normalized - offset.view(view)
        inside = (normalized >= qmin.view(view)) & (normalized <= qmax.view(view))
        codes = torch.clamp(torch.round(normalized), qmin.view(view), qmax.view(view))
        shape = (n_cycles, -1, *psums.shape[1:])
        weights = constant_tensor(tuple(ctx.cycle_weights), grad_summed.dtype, grad_summed.device)
        weighted_grad = grad_summed.unsqueeze(0) * weights.view(-1, 1, 1, 1, 1)
        grad_psums = grad_step = grad_offset = None
        if ctx.needs_input_grad[0]:
            grad_psums = (weighted_grad * inside.view(shape)).reshape(psums.shape)
        if ctx.needs_input_grad[1]:  # d u / d step: code + z - p / step inside, code + z where clipped
            outside_value = 0 if offset is None else -offset.view(view)
            local = (codes - torch.where(inside, normalized, outside_value)).view(shape)
            grad_step = (weighted_grad * local).sum(dim=(0, 1, 3, 4))
        if offset is not None and ctx.needs_input_grad[2]:  # d u / d z: step where clipped, 0 inside
            grad_offset = (weighted_grad * (~inside).view(shape)).sum(dim=(0, 1, 3, 4)) * step
        return grad_psums, grad_step, grad_offset, None, None, None, None


class PsumQuantizer(QuantizerBase):
    """ADC model: b_p-bit quantizer of every partial sum, with alpha per layer, per array or per column.

    ``alpha`` has shape (n_kinds, 1, 1) for ``granularity="layer"``, (n_kinds, n_row_arrays, n_col_blocks) for
    ``"array"`` and (n_kinds, n_row_arrays, n_columns) for ``"column"``. A *kind* is a weight slice
    (0 = least significant) or, last, the offset reference column; ``n_row_arrays = groups * n_row_blocks``.
    With ``"column"`` every physical bitline has its own range, as every bitline has its own ADC: a slice's entry
    is indexed by the output column within its conv group (0..C_out/g - 1), a reference column's by its column
    block (entries of the reference kind past n_col_blocks are never read).

    Args:
        bits: ADC resolution b_p.
        n_kinds: weight slices plus reference columns kinds (1 + 1 with offset slicing).
        n_row_arrays: groups * n_row_blocks of the layer.
        n_col_blocks: column blocks of the layer.
        granularity: ``"array"`` (default, SPEC 4.3), ``"layer"`` or ``"column"``.
        n_columns: output columns per conv group (C_out/g, at least n_col_blocks); read by ``"column"`` only.
        observer: alpha0 initialisation, ``"mse"`` (default), ``"minmax"`` (the conventional baseline ADC),
            ``"percentile"``, or ``"auto"`` (min-max from `AUTO_MINMAX_ADC_BITS` bits, MSE below).
        learn_clip: whether theta (and the offset) is trainable (False: the conventional, fixed min-max ADC).
        asymmetric: give every range a learned offset z (in steps; see the module docstring), calibrated with the
            range by `observers.mse_range` whatever ``observer`` says; ``"auto"``: for ADCs of at most
            `AUTO_ASYMMETRIC_MAX_ADC_BITS` bits.
        keep_prob: QDrop keep probability of the ADC codes (see `QuantizerBase`).
        **observer_kwargs: forwarded to the observer.

    Raises:
        ValueError: on an unknown granularity, bits outside [1, 16] or ``n_columns < n_col_blocks``.
    """

    def __init__(
        self,
        bits: int,
        n_kinds: int = 1,
        n_row_arrays: int = 1,
        n_col_blocks: int = 1,
        granularity: str = "array",
        n_columns: int = 1,
        observer: str = "mse",
        learn_clip: bool = True,
        keep_prob: Optional[float] = None,
        asymmetric: bool | str = False,
        **observer_kwargs,
    ) -> None:
        check_bits(bits)
        asymmetric = resolve_psum_asymmetric(asymmetric, bits)
        observer = "mse" if asymmetric else resolve_psum_observer(observer, bits)  # a range search needs samples
        super().__init__(observer, keep_prob, **observer_kwargs)
        check_choice("granularity", granularity, PSUM_GRANULARITIES)
        self.bits = bits
        self.granularity = granularity
        if granularity == "column" and n_columns < n_col_blocks:
            raise ValueError(f"n_columns={n_columns} is invalid: expected at least n_col_blocks={n_col_blocks}")
        per_row_array = {"layer": (1, 1), "array": (n_row_arrays, n_col_blocks), "column": (n_row_arrays, n_columns)}
        shape = (n_kinds, *per_row_array[granularity])
        self.register_buffer("alpha0", torch.ones(shape))
        self.theta = nn.Parameter(torch.zeros(shape), requires_grad=learn_clip)
        self.offset = nn.Parameter(torch.zeros(shape), requires_grad=learn_clip) if asymmetric else None
        self.learn_clip = learn_clip
        self._range_cache: dict = {}
        self._observed_groups: Optional[torch.Tensor] = None
        self._observed_signed: Optional[torch.Tensor] = None

    SETTINGS = ("keep_prob", "learn_clip")

    @property
    def learn_clip(self) -> bool:
        """Whether theta learns (PTQ/QAT); False keeps the calibrated range."""
        return self._learn_clip

    @learn_clip.setter
    def learn_clip(self, learn: bool) -> None:
        self._learn_clip = bool(learn)
        self.theta.requires_grad_(self._learn_clip)
        if self.offset is not None:
            self.offset.requires_grad_(self._learn_clip)

    @property
    def asymmetric(self) -> bool:
        """Whether every range has a learned offset (see the module docstring)."""
        return self.offset is not None

    def adopt_calibration_(self, old: QuantizerBase) -> bool:
        """`QuantizerBase.adopt_calibration_`, except that a switch between symmetric and asymmetric ranges, or an
        asymmetric ADC of other bits than ``old`` (offsets are in steps of its resolution), calibrates again."""
        asymmetric = getattr(old, "asymmetric", False)
        if asymmetric != self.asymmetric or (asymmetric and getattr(old, "bits", None) != self.bits):
            return False
        return super().adopt_calibration_(old)

    def alpha(self) -> torch.Tensor:
        """Clip values alpha = alpha0 * exp(theta), in partial-sum code units."""
        return self.alpha0 * torch.exp(self.theta)

    def group_of(self, kind: torch.Tensor, row_array: torch.Tensor, col_block: torch.Tensor,
                 column: torch.Tensor) -> torch.Tensor:
        """Flat index into ``alpha`` of channels described by (kind, row array, column block, column) tensors.

        ``column`` is the output column within the conv group for a weight slice, the column block for a
        reference column (read by ``"column"`` granularity only).
        """
        _, n_rows, n_cols = self.alpha0.shape
        if self.granularity == "layer":
            return kind
        return (kind * n_rows + row_array) * n_cols + (column if self.granularity == "column" else col_block)

    def channel_params(self, group: torch.Tensor, signed: torch.Tensor) -> tuple:
        """Per-channel (step, qmin, qmax) for channels with alpha index ``group`` and signedness ``signed``."""
        key = (id(signed), self.bits, self.alpha0.dtype, signed.device)
        cached = self._range_cache.get(key)
        if cached is None or cached[0] is not signed:
            cached = (signed, *self._code_ranges(signed))
            self._range_cache[key] = cached
        _, levels, qmin, qmax = cached
        step = self.alpha().reshape(-1)[group] / levels
        return step, qmin, qmax

    def _code_ranges(self, signed: torch.Tensor) -> tuple:
        """(levels, qmin, qmax) per entry of the bool tensor ``signed``, in alpha0's dtype: the signed or unsigned
        code range of a b_p-bit ADC and its steps between 0 and alpha."""
        s_min, s_max = code_range(self.bits, True)
        u_min, u_max = code_range(self.bits, False)
        dtype = self.alpha0.dtype
        levels = torch.where(signed, float(clip_levels(s_min, s_max)), float(clip_levels(u_min, u_max))).to(dtype)
        qmin = torch.where(signed, float(s_min), float(u_min)).to(dtype)
        qmax = torch.where(signed, float(s_max), float(u_max)).to(dtype)
        return levels, qmin, qmax

    def channel_offset(self, group: torch.Tensor) -> Optional[torch.Tensor]:
        """Per-channel offset z (in steps) of channels with alpha index ``group``; None for a symmetric ADC."""
        return None if self.offset is None else self.offset.reshape(-1)[group]

    @torch.no_grad()
    def observe_psums(self, psums: list, groups: list, signed: list) -> None:
        """Feed the observer with partial sums of all parts of one forward pass; when not observing (an
        uninitialised ADC used directly), initialise from them at once, as the other quantizers do lazily.

        Args:
            psums: tensors (B, C_i, H, W) of raw partial sums.
            groups: (C_i,) alpha index of each channel.
            signed: (C_i,) bool signedness of each channel.
        """
        items = torch.cat([p.detach().transpose(0, 1).reshape(p.shape[1], -1) for p in psums], 0)
        self._observed_groups = torch.cat(groups)
        self._observed_signed = torch.cat(signed)
        self.observer.update(items)
        if not self.observe:
            self.init_from_observer()

    @torch.no_grad()
    def init_from_observer(self) -> None:
        """Set alpha0 from the observed partial sums (theta reset to 0), then reset the observer.

        An entry no channel reads (the reference kind past n_col_blocks with ``"column"``) gets alpha0 = 1."""
        n_groups = self.alpha0.numel()
        groups, signed = self._observed_groups, self._observed_signed
        group_signed = torch.zeros(n_groups, dtype=torch.long, device=groups.device)
        group_signed = group_signed.scatter_reduce(0, groups, signed.long(), reduce="amax").bool()
        alphas = []
        for is_signed in (False, True):
            qmin, qmax = code_range(self.bits, is_signed)
            alphas.append(self.observer.compute(groups, n_groups, qmin, qmax, clip_levels(qmin, qmax)))
        alpha = torch.where(group_signed, alphas[1], alphas[0])
        offset = None
        if self.offset is not None:
            alpha, offset = self._asymmetric_ranges(groups, n_groups, group_signed, alpha)
        used = torch.bincount(groups, minlength=n_groups) > 0
        alpha = torch.where(used, alpha, torch.ones_like(alpha))
        self.alpha0.copy_(alpha.view_as(self.alpha0))
        self.theta.zero_()
        if offset is not None:
            self.offset.copy_(torch.where(used, offset, 0).view_as(self.offset))
        self.initialized = True
        self.observer.reset()

    def _asymmetric_ranges(self, groups, n_groups, group_signed, symmetric_alpha) -> tuple:
        """(alpha, offset) per group of the range [lo, hi] of least squared error on the observed partial sums
        (`observers.mse_range`, which also tries the symmetric range ``symmetric_alpha``)."""
        levels, qmin, qmax = (t.to(symmetric_alpha) for t in self._code_ranges(group_signed))
        step = symmetric_alpha / levels
        n_steps = 2**self.bits - 1
        low, high = self.observer.compute_range(groups, n_groups, n_steps, (qmin * step, qmax * step))
        step = (high - low) / n_steps
        return step * levels, low / step - qmin

    def quantize_codes(self, psums: torch.Tensor, step: torch.Tensor, qmin: torch.Tensor, qmax: torch.Tensor,
                       offset: Optional[torch.Tensor] = None):
        """ADC codes of ``psums`` (B, C, H, W) with straight-through rounding (unfused path); ``offset`` the
        per-channel z of an asymmetric ADC (codes of ``p / step - z``).

        The gradient is `_ADCCycleSum`'s: the identity where ``qmin <= p / step - z <= qmax`` (bounds included),
        zero outside. ``torch.clamp`` with tensor bounds would halve it at the bounds (its backward splits ties),
        and a partial sum of exactly 0 at an unsigned ADC's ``qmin = 0`` is common with sparse inputs.
        """
        view = (1, -1, 1, 1)
        normalized = psums / step.view(view)
        if offset is not None:
            normalized = normalized - offset.view(view)
        constant = normalized.detach()
        inside = (constant >= qmin.view(view)) & (constant <= qmax.view(view))
        codes = torch.clamp(torch.round(constant), qmin.view(view), qmax.view(view))
        return torch.where(inside, normalized, constant) + (codes - constant)

    def convert_and_sum(
        self,
        psums: torch.Tensor,
        group: torch.Tensor,
        signed: torch.Tensor,
        cycle_weights: tuple,
        count_clipped: bool = False,
        return_codes: bool = False,
        overwrite: bool = False,
    ) -> tuple:
        """ADC-convert partial sums and shift-add them over cycles.

        Args:
            psums: (n_cycles * N, C, H, W) raw partial sums, cycle-major in the batch dimension.
            group: (C,) alpha index of each channel (see `group_of`).
            signed: (C,) bool, signed ADC range per channel.
            cycle_weights: shift-add weight (int) of each cycle.
            count_clipped: also count partial sums outside [qmin, qmax] * step (clipped by the ADC).
            return_codes: also return the integer ADC codes (unfused path; for tests and export).
            overwrite: ``psums`` may be overwritten; where no gradient is needed the conversion then runs in place.

        Returns:
            ``(summed, clipped, codes)``: summed (N, C, H, W) = sum_j w_j * step * code_j (or of the raw
            values where QDrop keeps them, or when disabled/observing); clipped a 0-dim int64 tensor or None;
            codes (n_cycles * N, C, H, W) or None.
        """
        if not self.enabled or self.observe:
            return cycle_sum(psums, cycle_weights), None, None
        step, qmin, qmax = self.channel_params(group, signed)
        offset = self.channel_offset(group)
        learning = torch.is_grad_enabled() and (step.requires_grad or (offset is not None and offset.requires_grad))
        if overwrite and not (self.dropping or return_codes or learning):
            return _adc_cycle_sum_inplace(psums, step, offset, qmin, qmax, cycle_weights, count_clipped) + (None,)
        if not (self.dropping or return_codes):
            summed, clipped = _ADCCycleSum.apply(psums, step, offset, qmin, qmax, cycle_weights, count_clipped)
            return summed, (clipped if count_clipped else None), None
        view = (1, -1, 1, 1)
        clipped = None
        if count_clipped:
            normalized = psums.detach() / step.detach().view(view)
            if offset is not None:
                normalized = normalized - offset.detach().view(view)
            clipped = ((normalized < qmin.view(view)) | (normalized > qmax.view(view))).sum()
        codes = self.quantize_codes(psums, step, qmin, qmax, offset)
        values = (codes if offset is None else codes + offset.view(view)) * step.view(view)
        if self.dropping:
            values = torch.where(self.drop_mask(values), values, psums)
        return cycle_sum(values, cycle_weights), clipped, (codes.detach() if return_codes else None)

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, granularity={self.granularity}, alpha_shape={tuple(self.alpha0.shape)}, "
                f"asymmetric={self.asymmetric}, enabled={self.enabled}")


__all__ = ["PsumQuantizer", "cycle_sum"]


