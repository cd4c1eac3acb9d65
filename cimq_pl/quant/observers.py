"""Observers: initialise clip ranges (alpha) from data, per group, vectorised over groups.

Data reaches an observer as a 2-D tensor ``(items, samples)``: an *item* is the finest unit that owns a clip
value (a weight element, an ADC channel, a whole activation tensor) and its samples are the values it saw.
At compute time each item is mapped to a *group* (the granularity of the quantizer, e.g. one group per crossbar
tile), and one clip value per group is returned.

Methods:
    ``"minmax"``: alpha = max |x| (signed) or max(x, 0) (unsigned) over the group.
    ``"percentile"``: alpha = the given percentile of |x| (signed) or of x (unsigned).
    ``"mse"``: alpha minimising the squared quantization error, searched over ``n_candidates`` fractions of
        the min-max alpha, evaluated for all groups at once.

`mse_range` (`RangeObserver.compute_range`) searches an asymmetric range [low, high] per group instead (an ADC with
a learned offset, `PsumQuantizer` ``asymmetric``).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

OBSERVER_METHODS = ("minmax", "percentile", "mse")
_QUANTILE_MAX_ELEMENTS = 2**24 - 1
_MSE_BLOCK_ELEMENTS = 2**20  # samples per block of the MSE search (4 MiB of float32: stays in the L3 cache; measured)
_EPS = 1e-8


def quantize_with_alpha(
    x: torch.Tensor,
    alpha: torch.Tensor,
    qmin: int,
    qmax: int,
    levels: int,
    project: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> torch.Tensor:
    """Fake-quantize ``x`` with step ``alpha / levels`` (no gradient tricks; used for the clip search)."""
    step = alpha / levels
    normalized = torch.clamp(x / step, qmin, qmax)
    codes = project(normalized) if project is not None else torch.round(normalized)
    return codes * step


def _squared_error(
    samples: torch.Tensor,
    item_alpha: torch.Tensor,
    qmin: int,
    qmax: int,
    levels: int,
    project: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> torch.Tensor:
    """Per item, the summed squared error of `quantize_with_alpha` over its samples: the same operations in the
    same order, done in place on one temporary instead of five (the search runs it for every candidate)."""
    step = item_alpha / levels
    codes = torch.div(samples, step).clamp_(qmin, qmax)
    codes = project(codes) if project is not None else codes.round_()
    return codes.mul_(step).sub_(samples).square_().sum(1)


def _group_max(values: torch.Tensor, group_index: torch.Tensor, n_groups: int) -> torch.Tensor:
    out = torch.zeros(n_groups, dtype=values.dtype, device=values.device)
    return out.scatter_reduce(0, group_index, values, reduce="amax", include_self=True)


def minmax_clip(
    item_min: torch.Tensor, item_max: torch.Tensor, group_index: torch.Tensor, n_groups: int, signed: bool
) -> torch.Tensor:
    """Min-max alpha per group from per-item running minima and maxima.

    Args:
        item_min: (items,) running minimum of each item.
        item_max: (items,) running maximum of each item.
        group_index: (items,) int64 group of each item.
        n_groups: number of groups.
        signed: symmetric range (max |x|) when True, else [0, max x].

    Returns:
        (n_groups,) clip values, at least 1e-8.
    """
    magnitude = torch.maximum(item_max, -item_min) if signed else item_max.clamp_min(0)
    return _group_max(magnitude, group_index, n_groups).clamp_min(_EPS)


def percentile_clip(
    samples: torch.Tensor, group_index: torch.Tensor, n_groups: int, signed: bool, percentile: float
) -> torch.Tensor:
    """Percentile alpha per group from ``samples`` (items, m), vectorised with a NaN-padded quantile."""
    values = samples.abs() if signed else samples.clamp_min(0)
    order = torch.argsort(group_index, stable=True)
    sorted_groups = group_index[order]
    counts = torch.bincount(group_index, minlength=n_groups)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(group_index.numel(), device=group_index.device) - starts[sorted_groups]
    width = int(counts.max()) * values.shape[1]
    if n_groups * width > _QUANTILE_MAX_ELEMENTS:  # torch.quantile's input limit: subsample columns
        keep = max(1, _QUANTILE_MAX_ELEMENTS // (n_groups * int(counts.max())))
        values = values[:, torch.randperm(values.shape[1], device=values.device)[:keep]]
    padded = torch.full(
        (n_groups, int(counts.max()), values.shape[1]), float("nan"), dtype=values.dtype, device=values.device
    )
    padded[sorted_groups, position] = values[order]
    alpha = torch.nanquantile(padded.flatten(1), percentile / 100.0, dim=1)
    return torch.nan_to_num(alpha, nan=_EPS).clamp_min(_EPS)


def mse_clip(
    samples: torch.Tensor,
    group_index: torch.Tensor,
    n_groups: int,
    qmin: int,
    qmax: int,
    levels: int,
    n_candidates: int = 80,
    min_fraction: float = 0.05,
    project: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    block_elements: Optional[int] = _MSE_BLOCK_ELEMENTS,
) -> torch.Tensor:
    """MSE-optimal alpha per group: argmin over candidate fractions of the min-max alpha.

    Args:
        samples: (items, m) values.
        group_index: (items,) group of each item.
        n_groups: number of groups.
        qmin: smallest integer code.
        qmax: largest integer code.
        levels: steps between 0 and alpha (step = alpha / levels).
        n_candidates: fractions tried, evenly spaced in [min_fraction, 1].
        min_fraction: smallest fraction of the min-max alpha tried.
        project: optional projection of clamped normalised values to allowed codes (default: round).
        block_elements: samples per block of items the candidates are tried on in turn (at least one item);
            None: one block, every candidate over all items at once. The result is the same bit for bit.

    Returns:
        (n_groups,) clip values.
    """
    signed = qmin < 0
    item_min, item_max = samples.amin(1), samples.amax(1)
    full_alpha = minmax_clip(item_min, item_max, group_index, n_groups, signed)
    fractions = torch.linspace(min_fraction, 1.0, n_candidates, device=samples.device, dtype=samples.dtype)
    alphas = [(full_alpha * fraction,) for fraction in fractions]
    item_error = _blocked_item_errors(
        samples, group_index, len(alphas), block_elements,
        lambda candidate, rows, groups: _squared_error(rows, alphas[candidate][0][groups].unsqueeze(1), qmin, qmax,
                                                       levels, project))
    (best_alpha,) = _least_error_per_group(alphas, item_error, group_index, n_groups, (full_alpha,))
    return best_alpha.clamp_min(_EPS)


def _blocked_item_errors(samples: torch.Tensor, group_index: torch.Tensor, n_candidates: int,
                         block_elements: Optional[int], error: Callable) -> torch.Tensor:
    """(n_candidates, items) error of every candidate on every item, ``error(candidate, rows, groups)`` on a
    cache-sized block of items at a time: the candidates reread the block from cache instead of streaming all
    samples from memory once per candidate (each item's error is the same row-wise operations either way, so the
    result is bit for bit that of one pass over all items per candidate; ``block_elements`` None: that one pass)."""
    items = samples.shape[0]
    item_error = torch.empty(n_candidates, items, dtype=samples.dtype, device=samples.device)
    block = max(1, items if block_elements is None else block_elements // max(1, samples.shape[1]))
    for start in range(0, items, block):
        rows, groups = samples[start:start + block], group_index[start:start + block]
        for candidate in range(n_candidates):
            item_error[candidate, start:start + block] = error(candidate, rows, groups)
    return item_error


def _least_error_per_group(candidates: list, item_error: torch.Tensor, group_index: torch.Tensor, n_groups: int,
                           initial: tuple) -> tuple:
    """Per group, the candidate (a tuple of (n_groups,) tensors) whose items' errors sum least, the first one on a
    tie; ``initial`` where no candidate's error is finite. Every group is compared at once."""
    best_error = torch.full((n_groups,), float("inf"), dtype=item_error.dtype, device=item_error.device)
    best = tuple(value.clone() for value in initial)
    for candidate, error in zip(candidates, item_error):
        group_error = torch.zeros_like(best_error).index_add_(0, group_index, error)
        better = group_error < best_error
        best_error = torch.where(better, group_error, best_error)
        best = tuple(torch.where(better, value, kept) for value, kept in zip(candidate, best))
    return best


def mse_range(
    samples: torch.Tensor,
    group_index: torch.Tensor,
    n_groups: int,
    n_steps: int,
    points: int = 24,
    also: Optional[tuple] = None,
    block_elements: Optional[int] = _MSE_BLOCK_ELEMENTS,
) -> tuple:
    """MSE-optimal range [low, high] per group of an asymmetric quantizer with ``n_steps + 1`` levels spread evenly
    over it: argmin over a grid of ``points x points`` candidates, low a fraction of the group's minimum and high
    one of its maximum (fractions 1/points ... 1), plus the candidate ``also``.

    Args:
        samples: (items, m) values.
        group_index: (items,) group of each item.
        n_groups: number of groups.
        n_steps: steps between low and high (2^b - 1 for b bits).
        points: grid points per bound.
        also: optional ``(low, high)`` (n_groups,) candidate tried too (e.g. the best symmetric range), so the
            result is never worse than it on ``samples``.
        block_elements: samples per block of items (as in `mse_clip`).

    Returns:
        ``(low, high)``, each (n_groups,), high > low.
    """
    empty = torch.zeros(n_groups, dtype=samples.dtype, device=samples.device)  # a group no item reads keeps 0
    group_min = empty.scatter_reduce(0, group_index, samples.amin(1), reduce="amin", include_self=False)
    group_max = empty.scatter_reduce(0, group_index, samples.amax(1), reduce="amax", include_self=False)
    fractions = torch.linspace(1.0 / points, 1.0, points, device=samples.device, dtype=samples.dtype)
    candidates = [(group_min * a, group_max * b) for a in fractions for b in fractions]
    if also is not None:
        candidates.append(tuple(bound.to(samples) for bound in also))
    candidates = [(low, torch.maximum(high, low + _EPS)) for low, high in candidates]

    def squared_error(candidate, rows, groups):
        low, high = candidates[candidate]
        item_low = low[groups].unsqueeze(1)
        step = ((high - low) / n_steps)[groups].unsqueeze(1)
        codes = torch.sub(rows, item_low).div_(step).round_().clamp_(0, n_steps)
        return codes.mul_(step).add_(item_low).sub_(rows).square_().sum(1)

    item_error = _blocked_item_errors(samples, group_index, len(candidates), block_elements, squared_error)
    return _least_error_per_group(candidates, item_error, group_index, n_groups, candidates[0])


class RangeObserver(nn.Module):
    """Accumulates statistics of ``(items, samples)`` batches and computes one clip value per group.

    Keeps running per-item minima and maxima, and for ``"percentile"``/``"mse"`` a random subsample of at most
    ``max_samples`` values per item. Nothing it holds is persistent: it is calibration scratch, not state.

    Args:
        method: ``"minmax"``, ``"percentile"`` or ``"mse"``.
        percentile: percentile (0-100] used by ``"percentile"``.
        n_candidates: candidates of the ``"mse"`` search.
        max_samples: values kept per item.

    Raises:
        ValueError: on an unknown method or a percentile outside (0, 100].
    """

    def __init__(
        self, method: str = "minmax", percentile: float = 99.99, n_candidates: int = 80, max_samples: int = 4096
    ) -> None:
        super().__init__()
        if method not in OBSERVER_METHODS:
            raise ValueError(f"observer method={method!r} is invalid: expected one of {list(OBSERVER_METHODS)}")
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile={percentile!r} is invalid: expected a value in (0, 100]")
        self.method = method
        self.percentile = percentile
        self.n_candidates = n_candidates
        self.max_samples = max_samples
        self.reset()

    def reset(self) -> None:
        """Forget everything observed."""
        self.item_min: Optional[torch.Tensor] = None
        self.item_max: Optional[torch.Tensor] = None
        self.samples: Optional[torch.Tensor] = None

    @property
    def has_data(self) -> bool:
        """Whether any batch was observed since the last reset."""
        return self.item_min is not None

    @torch.no_grad()
    def update(self, values: torch.Tensor) -> None:
        """Observe a batch of shape (items, m)."""
        values = values.detach()
        batch_min, batch_max = values.amin(1), values.amax(1)
        if self.item_min is None:
            self.item_min, self.item_max = batch_min, batch_max
        else:
            self.item_min = torch.minimum(self.item_min, batch_min)
            self.item_max = torch.maximum(self.item_max, batch_max)
        if self.method == "minmax":
            return
        if values.shape[1] > self.max_samples:
            values = values[:, torch.randperm(values.shape[1], device=values.device)[: self.max_samples]]
        self.samples = values if self.samples is None else torch.cat([self.samples, values], 1)
        if self.samples.shape[1] > self.max_samples:
            keep = torch.randperm(self.samples.shape[1], device=values.device)[: self.max_samples]
            self.samples = self.samples[:, keep]

    @torch.no_grad()
    def compute(
        self,
        group_index: torch.Tensor,
        n_groups: int,
        qmin: int,
        qmax: int,
        levels: int,
        project: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    ) -> torch.Tensor:
        """Clip value alpha of each group.

        Args:
            group_index: (items,) int64 group of each item.
            n_groups: number of groups.
            qmin: smallest code (negative means a signed, symmetric range).
            qmax: largest code.
            levels: steps between 0 and alpha.
            project: optional projection to allowed codes for the MSE search.

        Raises:
            RuntimeError: when nothing was observed.
        """
        if not self.has_data:
            raise RuntimeError("the observer has seen no data: run forward passes with observe=True first")
        signed = qmin < 0
        if self.method == "minmax":
            return minmax_clip(self.item_min, self.item_max, group_index, n_groups, signed)
        if self.method == "percentile":
            return percentile_clip(self.samples, group_index, n_groups, signed, self.percentile)
        return mse_clip(
            self.samples, group_index, n_groups, qmin, qmax, levels, self.n_candidates, project=project
        )


    @torch.no_grad()
    def compute_range(self, group_index: torch.Tensor, n_groups: int, n_steps: int, also: Optional[tuple] = None,
                      points: int = 24) -> tuple:
        """(low, high) per group of an asymmetric range by `mse_range` (needs samples: not for ``"minmax"``)."""
        if self.samples is None:
            raise RuntimeError(f"an asymmetric range needs observed samples, which the {self.method!r} observer "
                               "does not keep: use 'mse' or 'percentile'")
        return mse_range(self.samples, group_index, n_groups, n_steps, points, also)


class MinMaxObserver(RangeObserver):
    """`RangeObserver` with method ``"minmax"``."""

    def __init__(self, **kwargs) -> None:
        super().__init__(method="minmax", **kwargs)


class PercentileObserver(RangeObserver):
    """`RangeObserver` with method ``"percentile"``."""

    def __init__(self, percentile: float = 99.99, **kwargs) -> None:
        super().__init__(method="percentile", percentile=percentile, **kwargs)


class MSEObserver(RangeObserver):
    """`RangeObserver` with method ``"mse"``."""

    def __init__(self, n_candidates: int = 80, **kwargs) -> None:
        super().__init__(method="mse", n_candidates=n_candidates, **kwargs)
