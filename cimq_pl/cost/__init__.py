"""Hardware cost model of cimq-pl (SPEC section 5): pure PyTorch, never imports Lightning.

Public API: `EnergyTable` (per-event energies, YAML-loadable), `LayerInfo` / `describe_layers` /
`gather_counts` / `take_counts` (what the model reads from CIM layers, summed by `HardwareCostMetric`),
`layer_cost` / `network_cost` / `hw_efficiency` (the analytic model), `build_baseline` (the conventional
baseline), `cost_report` (cost of a configuration without training; ``python -m cimq_pl cost``), table and
plot helpers.
"""

from cimq_pl.cost.baseline import BASELINE_ADC_BITS, baseline_options, build_baseline
from cimq_pl.cost.energy import DEFAULT_ENERGY_TABLE_PATH, EnergyTable
from cimq_pl.cost.layers import (
    COUNTER_NAMES,
    LayerInfo,
    describe_layers,
    gather_counts,
    reset_counts,
    take_counts,
    uncosted_layers,
)
from cimq_pl.cost.model import COMPONENTS, LayerCost, NetworkCost, hw_efficiency, layer_cost, network_cost
from cimq_pl.cost.plots import plot_accuracy_vs_energy, plot_energy_breakdown, read_summaries
from cimq_pl.cost.tables import (
    LAYER_COLUMNS,
    SUMMARY_COLUMNS,
    format_table,
    layer_rows,
    summary_row,
    write_csv_atomic,
)

__all__ = [
    "BASELINE_ADC_BITS",
    "COMPONENTS",
    "COUNTER_NAMES",
    "CostReport",
    "DEFAULT_ENERGY_TABLE_PATH",
    "EnergyTable",
    "LAYER_COLUMNS",
    "LayerCost",
    "LayerInfo",
    "NetworkCost",
    "SUMMARY_COLUMNS",
    "baseline_options",
    "build_baseline",
    "cost_report",
    "describe_layers",
    "evaluate_cost",
    "format_table",
    "gather_counts",
    "hw_efficiency",
    "layer_cost",
    "layer_rows",
    "network_cost",
    "plot_accuracy_vs_energy",
    "plot_energy_breakdown",
    "read_summaries",
    "reset_counts",
    "summary_row",
    "take_counts",
    "uncosted_layers",
    "write_csv_atomic",
]


def __getattr__(name):
    # The report module is imported lazily so that ``python -m cimq_pl.cost.report`` runs it only once.
    if name in ("CostReport", "cost_report", "evaluate_cost"):
        from cimq_pl.cost import report

        return getattr(report, name)
    raise AttributeError(f"module 'cimq_pl.cost' has no attribute {name!r}")
