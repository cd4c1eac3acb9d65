"""Per-layer precision search for a CIM macro (``python -m cimq_pl search``): pure PyTorch, never imports Lightning.

Sensitivity of each layer to each candidate setting, calibration only (`SearchBench`, `measure_sensitivity`);
the exact Pareto front of the additive model by dynamic programming (`pareto_front`, `select`); the whole
search with its verification (`search_precision`); what it writes (`cimq_pl.search.report`: the
``model.cim_overrides`` YAML ``fit`` takes, CSVs, the plot). `SearchConfig` is imported eagerly (the CLI's
parser reads it); the rest when first used, so that building the CLI stays quick.
"""

from cimq_pl.search.config import SearchConfig, parse_setting, setting_label

_LAZY = {
    "LayerTrial": "bench", "NetworkPoint": "bench", "SearchBench": "bench", "logit_loss": "bench",
    "FrontPoint": "front", "pareto_front": "front", "select": "front",
    "MeasuredPoint": "run", "SearchResult": "run", "search_precision": "run",
    "SensitivityTable": "sensitivity", "measure_sensitivity": "sensitivity", "searched_layers": "sensitivity",
}

__all__ = ["SearchConfig", "parse_setting", "setting_label", *sorted(_LAZY)]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"cimq_pl.search.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'cimq_pl.search' has no attribute {name!r}")
