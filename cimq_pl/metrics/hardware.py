"""`HardwareCostMetric`: CIM event counters accumulated over an evaluation, costed at ``compute`` (SPEC 5).

DDP-safe by construction (torchmetrics habit): the only state is one (layers x counters) int64 tensor of
sums, reduced with ``"sum"`` across processes; ``update`` only adds, ``compute`` only combines the summed
counters with the analytic cost model. `hardware_cost` is the functional twin.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torchmetrics import Metric

from cimq_pl.cost.energy import EnergyTable
from cimq_pl.cost.layers import COUNTER_NAMES, LayerInfo
from cimq_pl.cost.model import NetworkCost, network_cost

__all__ = ["HardwareCostMetric", "hardware_cost"]


def _hardware_cost_update(counts: torch.Tensor, n_layers: int) -> torch.Tensor:
    """Validate one update's counters: a (n_layers, len(COUNTER_NAMES)) integer tensor, returned as int64."""
    expected = (n_layers, len(COUNTER_NAMES))
    if not isinstance(counts, torch.Tensor) or tuple(counts.shape) != expected:
        shape = tuple(counts.shape) if isinstance(counts, torch.Tensor) else type(counts).__name__
        raise ValueError(f"counts has shape {shape}: expected {expected} (layers x counters {list(COUNTER_NAMES)})")
    if counts.is_floating_point() or counts.is_complex():
        raise ValueError(f"counts has dtype {counts.dtype}: expected an integer dtype (event counts)")
    return counts.to(torch.long)


def _hardware_cost_compute(counts: torch.Tensor, layers: Sequence[LayerInfo], table: EnergyTable) -> NetworkCost:
    return network_cost(layers, counts, table)


def hardware_cost(counts: torch.Tensor, layers: Sequence[LayerInfo], table: Optional[EnergyTable] = None) -> NetworkCost:
    """Functional twin of `HardwareCostMetric`: the `NetworkCost` of summed counters.

    Args:
        counts: (len(layers), len(COUNTER_NAMES)) integer counters (`cimq_pl.cost.gather_counts`).
        layers: `LayerInfo` per layer.
        table: per-event energies (default `EnergyTable()`).

    Raises:
        ValueError: on a wrong shape or a floating dtype.
    """
    return _hardware_cost_compute(_hardware_cost_update(counts, len(layers)), layers, table or EnergyTable())


class HardwareCostMetric(Metric):
    """Sums the event counters of a network's CIM layers; ``compute`` returns their `NetworkCost`.

    Args:
        layers: `LayerInfo` per CIM layer (`cimq_pl.cost.describe_layers(model)`), in the order of the rows
            passed to ``update``.
        table: per-event energies (default `EnergyTable()`).
        **kwargs: forwarded to `torchmetrics.Metric` (e.g. ``sync_on_compute``).

    Example:
        >>> metric = HardwareCostMetric(describe_layers(model))
        >>> for images in loader:
        ...     model(images)                       # layers with collect_stats=True
        ...     metric.update(gather_counts(layers))
        ...     reset_counts(layers)
        >>> metric.compute().energy_per_image_uj
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, layers: Sequence[LayerInfo], table: Optional[EnergyTable] = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.layers = tuple(layers)
        self.table = table or EnergyTable()
        self.add_state(
            "counts", default=torch.zeros(len(self.layers), len(COUNTER_NAMES), dtype=torch.long), dist_reduce_fx="sum"
        )

    def update(self, counts: torch.Tensor) -> None:
        """Add one batch's counters, a (layers, counters) integer tensor."""
        self.counts += _hardware_cost_update(counts, len(self.layers)).to(self.counts.device)

    def compute(self) -> NetworkCost:
        """The `NetworkCost` of the counters summed over updates (and processes)."""
        return _hardware_cost_compute(self.counts, self.layers, self.table)
