"""Integer codes cut into digits: the input cycles and the weight slices a crossbar macro sees (SPEC 3).

`split_input_cycles` gives the digits fed to the wordlines in each input cycle, `split_weight_slices` the
digits programmed into each cell slice (and the reference-column digit of offset slicing). The CIM layers
simulate with them and the export (`cimq_pl.export.layers`) writes the cells from them, so both read the same
digits. Shifts, widths and weights come from the layer's `TileGeometry`.
"""

from __future__ import annotations

import torch

from cimq_pl.quant.ste import constant_tensor
from cimq_pl.quant.tiling import TileGeometry


def digit_planes(values, shifts, widths, offset: int, qmin: int, qmax: int, exact: bool) -> torch.Tensor:
    """The digits of `_DigitSplit` without autograd: shape (len(shifts), *values.shape), values' dtype.

    The digit planes keep the memory layout of ``values`` (channels-last codes give channels-last planes).
    """
    view = (-1,) + (1,) * values.dim()
    int_dtype = torch.int16 if max(abs(qmin), abs(qmax)) + offset < 2**15 else torch.int32
    if exact:  # values already hold integer codes in [qmin, qmax]
        integer, residual = values.to(int_dtype), None
    else:
        floored = torch.clamp(torch.floor(values), qmin, qmax)
        integer, residual = floored.to(int_dtype), values - floored
    if offset:
        integer = integer + offset
    shift = constant_tensor(tuple(shifts), int_dtype, values.device).view(view)
    mask = constant_tensor(tuple(2**w - 1 if w else -1 for w in widths), int_dtype, values.device).view(view)
    digits = torch.bitwise_and(torch.bitwise_right_shift(integer.unsqueeze(0), shift), mask).to(values.dtype)
    if residual is not None:
        digits[0] += residual
    return digits


class _DigitSplit(torch.autograd.Function):
    """Split integer-valued codes into weighted digits: values = sum_k weights[k] * digits[k].

    Digit k is ``floor((ip + offset) / 2^shift_k) mod 2^width_k`` (no modulus when width_k is 0: a signed top
    digit), where ``ip = clamp(floor(values), qmin, qmax)``; the residual ``values - ip`` (AdaRound soft codes,
    QDrop full-precision values) is added to digit 0, whose weight is 1. Backward (straight-through):
    d values = mean_k(d digits[k] / weights[k]), exact when every digit sees the same gradient.
    """

    @staticmethod
    def forward(ctx, values, shifts, widths, weights, offset, qmin, qmax, exact):
        ctx.weights = weights
        return digit_planes(values, shifts, widths, offset, qmin, qmax, exact)

    @staticmethod
    def backward(ctx, grad_digits):
        inverse = constant_tensor(tuple(1.0 / (w * len(ctx.weights)) for w in ctx.weights), grad_digits.dtype,
                                  grad_digits.device).view((-1,) + (1,) * (grad_digits.dim() - 1))
        return (grad_digits * inverse).sum(0), None, None, None, None, None, None, None


def split_input_cycles(
    codes: torch.Tensor, geometry: TileGeometry, bits: int, signed: bool, code_range: tuple, exact: bool = False
):
    """Input digits per cycle, shape (n_cycles, *codes.shape), and the cycle shift-add weights.

    ``exact`` promises integer codes within ``code_range`` (skips the floor/residual pass)."""
    digit_bits, cycle_weights = geometry.input_cycles(signed, bits)
    shifts = geometry.input_digit_shifts(signed, bits)
    digits = _DigitSplit.apply(codes, shifts, digit_bits, cycle_weights, 0, *code_range, exact)
    return digits, cycle_weights


def split_weight_slices(codes: torch.Tensor, geometry: TileGeometry, code_range: tuple, exact: bool = False):
    """Weight digits per cell slice, shape (n_weight_slices, *codes.shape), their shift-add weights and the
    reference-column digit (0 without offset slicing)."""
    shifts = geometry.slice_shifts()
    weights = geometry.slice_weights()
    if geometry.weight_slicing == "offset":
        digits = _DigitSplit.apply(
            codes, shifts, geometry.slice_bits, weights, 2 ** (geometry.weight_bits - 1), *code_range, exact
        )
        return digits, weights, geometry.offset_reference_digit()
    widths = geometry.slice_bits[:-1] + (0,)
    return _DigitSplit.apply(codes, shifts, widths, weights, 0, *code_range, exact), weights, 0


__all__ = ["digit_planes", "split_input_cycles", "split_weight_slices"]
