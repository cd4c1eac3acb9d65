"""Straight-through estimators and gradient-scaling helpers shared by the quantizers."""

from __future__ import annotations

import torch


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest (half to even) in the forward pass, identity gradient in the backward pass."""
    return x + (torch.round(x) - x).detach()


def floor_ste(x: torch.Tensor) -> torch.Tensor:
    """Floor in the forward pass, identity gradient in the backward pass."""
    return x + (torch.floor(x) - x).detach()


def project_ste(x: torch.Tensor, projected: torch.Tensor) -> torch.Tensor:
    """Return ``projected`` values with the gradient of ``x`` (straight-through projection)."""
    return x + (projected - x).detach()


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Identity in the forward pass; multiply the gradient by ``factor`` (LSQ gradient scaling)."""
    if factor == 1.0:
        return x
    scaled = x * factor
    return (x - scaled).detach() + scaled


def lsq_grad_factor(elements_per_step: int, qmax: int) -> float:
    """LSQ gradient scale g = 1 / sqrt(elements_per_step * Q_p) (Esser et al., ICLR 2020)."""
    return 1.0 / max(elements_per_step * max(qmax, 1), 1) ** 0.5


def code_range(bits: int, signed: bool) -> tuple:
    """Integer code range (qmin, qmax) of a ``bits``-bit two's-complement (signed) or unsigned code."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def clip_levels(qmin: int, qmax: int) -> int:
    """Steps between 0 and the clip value alpha: alpha = step * clip_levels (qmax, or |qmin| when qmax is 0)."""
    return qmax if qmax > 0 else -qmin


def popcount(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Number of 1 bits of integer-valued ``codes`` in their ``bits``-bit two's-complement pattern.

    Args:
        codes: integer-valued tensor (any float or int dtype), in [-2^(bits-1), 2^bits).
        bits: width of the pattern in bits.

    Returns:
        int64 tensor of the same shape.
    """
    pattern = torch.remainder(codes.to(torch.int64), 2**bits)
    ones = torch.zeros_like(pattern)
    for bit in range(bits):  # loop over bit positions of the code (<= 16), not over data
        ones += (pattern >> bit) & 1
    return ones


_CONSTANTS: dict = {}


def constant_tensor(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A cached 1-D tensor of ``values`` on ``device`` (no host-to-device copy per forward pass)."""
    key = (values, dtype, str(device))
    tensor = _CONSTANTS.get(key)
    if tensor is None:
        tensor = torch.tensor(values, dtype=dtype, device=device)
        _CONSTANTS[key] = tensor
    return tensor
