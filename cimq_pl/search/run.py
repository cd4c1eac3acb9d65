"""`search_precision`: measure the sensitivities, build the front, pick the assignment a budget allows, and
(``verify``) measure it and every uniform setting as whole calibrated networks.

Pure PyTorch: the Lightning side (`CIMQTrainer.search`, ``python -m cimq_pl search``) only builds the model and
the data, draws the progress bar and writes the files (`cimq_pl.search.report`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from cimq_pl.cost.energy import EnergyTable
from cimq_pl.quant.overrides import layer_overrides
from cimq_pl.search.bench import NetworkPoint, SearchBench
from cimq_pl.search.config import SearchConfig, setting_label
from cimq_pl.search.front import FrontPoint, budget_value, pareto_front, select
from cimq_pl.search.sensitivity import SensitivityTable, measure_sensitivity, searched_layers

__all__ = ["MeasuredPoint", "SearchResult", "search_precision"]


@dataclass
class MeasuredPoint:
    """A point of the plot: an assignment, predicted by the additive model and (``verify``) measured.

    Attributes:
        label: ``"configured"``, ``"searched"`` or a uniform setting (``"adc_bits=4"``).
        kind: ``"configured"``, ``"searched"`` or ``"uniform"``.
        choice: the setting index per searched layer (None for the configured network).
        predicted_energy_uj, predicted_loss, predicted_latency_us: the additive model's values.
        measured: the whole network calibrated and measured (None without ``verify``).
    """

    label: str
    kind: str
    choice: Optional[tuple]
    predicted_energy_uj: float
    predicted_loss: float
    predicted_latency_us: float
    measured: Optional[NetworkPoint] = None


@dataclass
class SearchResult:
    """What `search_precision` found.

    Attributes:
        table: the sensitivities.
        front: the predicted Pareto front.
        chosen: the front point the budget picked.
        budget: ``(kind, value, description)``: ``"energy"`` or ``"loss"``, the number, how it was given.
        overrides: ``model.cim_overrides`` of the chosen assignment (every searched layer by name, plus the
            configured overrides of the other layers), the mapping ``cim_overrides.yaml`` holds.
        points: the configured network, the uniform settings and the searched assignment.
        seconds: wall time of the sensitivity trials and of the verification, s.
        start: what every measurement started from: ``"calibration only"`` or ``"after PTQ"`` (``init_from``).
    """

    table: SensitivityTable
    front: list
    chosen: FrontPoint
    budget: tuple
    overrides: dict
    points: list = field(default_factory=list)
    seconds: dict = field(default_factory=dict)
    start: str = "calibration only"

    @property
    def searched(self) -> MeasuredPoint:
        """The searched assignment's point."""
        return next(point for point in self.points if point.kind == "searched")

    def point(self, label: str) -> Optional[MeasuredPoint]:
        """The point labelled ``label`` (e.g. ``"adc_bits=4"``), or None."""
        return next((point for point in self.points if point.label == label), None)


def _chosen_overrides(model: nn.Module, table: SensitivityTable, choice: Sequence[int],
                      configured: Optional[dict]) -> dict:
    """The override mapping of ``choice``: the configured overrides resolved per layer (exact names, model order),
    with each searched layer's chosen setting on top."""
    from cimq_pl.quant.layers import _CIMLayerBase
    from cimq_pl.quant.registry import cim_layer_type_for

    # the layers convert_to_cim saw: the CIM layers and the eligible float layers it left digital
    names = [name for name, module in model.named_modules()
             if isinstance(module, _CIMLayerBase) or cim_layer_type_for(module) is not None]
    resolved = layer_overrides(names, configured) if configured else {}
    for name, setting in table.assignment(choice).items():
        resolved.setdefault(name, {}).update(setting)
    return {name: resolved[name] for name in names if name in resolved}


def search_precision(model: nn.Module, batches: Sequence[torch.Tensor], config: SearchConfig,
                     table: Optional[EnergyTable] = None, labels: Optional[Sequence[torch.Tensor]] = None,
                     test_batches: Optional[Sequence] = None, configured_overrides: Optional[dict] = None,
                     seed: int = 0, progress: Optional[Callable[[str], None]] = None,
                     on_start: Optional[Callable[[int], None]] = None,
                     reconstructed: Optional[dict] = None) -> SearchResult:
    """Search per-layer settings of ``model`` under ``config``'s budget.

    Args:
        model: a converted network (BN folded, technique options applied); calibrated here, restored after.
        batches: the search images (calibration split) on the model's device.
        config: candidates, layers, budget, metric, verification.
        table: per-event energies.
        labels: labels of ``batches`` (accuracy on the search images), or None.
        test_batches: ``(images, labels)`` test batches for the verified points' test accuracy, or None.
        configured_overrides: the model's ``model.cim_overrides`` (kept in the written overrides).
        seed: seeds every calibration.
        progress: called after every trial and verified point with a short description.
        on_start: called with the number of progress steps in all: first before the trials, then (``verify``)
            again once the verified points are known.
        reconstructed: ``model``'s state dict after PTQ (``search.init_from``): search from the reconstructed
            network instead of the calibrated one (`SearchBench`'s argument).

    Raises:
        ConfigError: a bad ``search.layers`` pattern, or a budget no assignment meets.
    """
    import time

    layers = searched_layers(model, config.layers)
    common, own = config.settings(), config.own_settings(layers)
    input_trials = any("input_bits" in setting for setting in [*common, *(s for o in own.values() for s in o)])
    bench = SearchBench(model, batches, config.metric, table, labels, config.replay, input_trials, seed, reconstructed)
    kind, value, fraction = config.budget()
    trials = sum(len(own.get(name, common)) for name in layers)
    if on_start is not None:  # called again with the verified points' number once they are known
        on_start(trials + (len(common) + 1 if config.verify else 0))
    start = time.perf_counter()
    sensitivity = measure_sensitivity(bench, layers, common, progress, own)
    settings = sensitivity.settings
    seconds = {"sensitivity": time.perf_counter() - start}
    front = pareto_front(sensitivity)
    budget, _ = budget_value(sensitivity, kind, value, fraction)
    scaled = "" if fraction == 1.0 else f"{fraction:g} x "
    description = ("the configured network's energy" if value is None else
                   f"{scaled}uniform {setting_label(value)}" if isinstance(value, dict) else f"{budget:g}")
    chosen = select(front, kind, budget)
    reference = bench.reference
    points = [MeasuredPoint("configured", "configured", None, reference.energy_uj, sensitivity.reference_loss,
                            reference.latency_us, reference)]
    for index in range(len(settings)):
        choice = sensitivity.uniform(index)
        if choice is not None:
            points.append(MeasuredPoint(setting_label(settings[index]), "uniform", choice, *sensitivity.predict(choice)))
    points.append(MeasuredPoint("searched", "searched", chosen.choice, chosen.energy_uj, chosen.loss, chosen.latency_us))
    start = time.perf_counter()
    if config.verify:
        if on_start is not None:
            on_start(trials + len(points) - 1)
        if test_batches:
            reference_test = bench.measure(model, test_batches).test_accuracy
            points[0].measured = NetworkPoint(reference.loss, reference.cost, reference.accuracy, reference_test)
        for point in points[1:]:
            if list(point.choice) == sensitivity.current:  # the configured network itself: measured already
                point.measured = points[0].measured
            else:
                specs = {name: bench.model.get_submodule(name).spec.replace(**setting)
                         for name, setting in sensitivity.assignment(point.choice).items()}
                point.measured = bench.measure(bench.network_with(specs), test_batches)
            if progress is not None:
                progress(f"verify {point.label}")
    seconds["verify"] = time.perf_counter() - start
    return SearchResult(
        table=sensitivity, front=front, chosen=chosen, budget=(kind, budget, description),
        overrides=_chosen_overrides(model, sensitivity, chosen.choice, configured_overrides), points=points,
        seconds=seconds, start="calibration only" if reconstructed is None else "after PTQ",
    )
