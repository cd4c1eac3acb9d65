"""torchmetrics metrics of cimq-pl (pure PyTorch + torchmetrics, no Lightning)."""

from cimq_pl.metrics.hardware import HardwareCostMetric, hardware_cost

__all__ = ["HardwareCostMetric", "hardware_cost"]
