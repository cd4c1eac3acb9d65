"""The accuracy-energy front of the additive model, and the assignment a budget picks from it.

Choosing one setting per layer to minimise the summed loss change under an energy budget is a multiple-choice
knapsack. We solve it **exactly** by dynamic programming over Pareto fronts rather than greedily: layer after
layer, every front point is extended with every candidate of the next layer and the dominated combinations
(no less energy and no less loss than another) are dropped. The result is the whole front of the additive
model, from which an energy budget (least loss within it) or a loss budget (least energy within it) is read
off, and which the plot draws.

Why not greedy on sensitivity per joule: a greedy walk only reaches the lower convex hull of the front and
can stop short of the budget when one step is large (a layer whose 3 -> 4-bit step is expensive but worth it),
and it needs the candidates of each layer to be convex in (energy, loss), which measured sensitivities are not.
The DP costs milliseconds for ResNet-20 (20 layers x 4 settings: the front stays at a few thousand points);
beyond ``max_points`` it is thinned to the best point per energy bin, which bounds the error by one bin.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from cimq_pl.errors import ConfigError
from cimq_pl.search.sensitivity import SensitivityTable

__all__ = ["FrontPoint", "pareto_front", "select"]


@dataclass(frozen=True)
class FrontPoint:
    """One non-dominated assignment of the additive model.

    Attributes:
        energy_uj: predicted energy per image, uJ.
        loss: predicted loss against the float network (the table's metric).
        latency_us: predicted latency per image, us.
        choice: the setting index of each searched layer (`SensitivityTable.settings`).
    """

    energy_uj: float
    loss: float
    latency_us: float
    choice: tuple


def _prune(points: list) -> list:
    """Keep the points no other beats on both energy and loss (sorted by energy, loss strictly falling)."""
    points.sort(key=lambda p: (p[0], p[1]))
    kept, best = [], float("inf")
    for point in points:
        if point[1] < best:
            kept.append(point)
            best = point[1]
    return kept


def _thin(points: list, max_points: int) -> list:
    """At most ``max_points``: the least-loss point in each of ``max_points`` equal energy bins."""
    low, high = points[0][0], points[-1][0]
    width = (high - low) / max_points or 1.0
    best: dict = {}
    for point in points:
        key = min(int((point[0] - low) / width), max_points - 1)
        if key not in best or point[1] < best[key][1]:
            best[key] = point
    return _prune(list(best.values()))


def pareto_front(table: SensitivityTable, max_points: int = 20000) -> list[FrontPoint]:
    """The Pareto front (energy, loss) of every assignment of the table's settings, by dynamic programming.

    Args:
        table: the measured sensitivities (invalid settings of a layer are left out).
        max_points: the most points kept between layers (see the module docstring).

    Returns:
        Points sorted by rising energy and falling loss, values predicted by `SensitivityTable.predict`.
    """
    front = [(0.0, 0.0, 0.0, ())]
    for l in range(len(table.layers)):
        options = [(s, table.energy_uj[l][s], table.loss[l][s], table.latency_us[l][s])
                   for s in range(len(table.settings)) if table.valid(l, s)]
        if table.is_edge(l) and table.current[l] is None:  # an edge layer may also stay as configured
            options.append((None, 0.0, 0.0, 0.0))
        front = _prune([(e + de, loss + dl, lat + dt, choice + (s,))
                        for e, loss, lat, choice in front for s, de, dl, dt in options])
        if len(front) > max_points:
            front = _thin(front, max_points)
    return [FrontPoint(table.reference_energy_uj + e, table.reference_loss + loss, table.reference_latency_us + lat,
                       choice) for e, loss, lat, choice in front]


def select(front: Sequence[FrontPoint], kind: str, budget: float, tolerance: float = 1e-9) -> FrontPoint:
    """The front point a budget picks.

    Args:
        front: `pareto_front`'s points.
        kind: ``"energy"``: the least-loss point within ``budget`` uJ per image; ``"loss"``: the least-energy point
            whose loss is within ``budget``.
        budget: uJ per image, or a loss in the table's metric.
        tolerance: relative slack for rounding (a uniform setting used as the budget is always feasible).

    Raises:
        ConfigError: when no assignment meets the budget (the message gives the reachable range).
    """
    if kind not in ("energy", "loss"):
        raise ValueError(f"kind={kind!r} is invalid: expected 'energy' or 'loss'")
    slack = tolerance * max(abs(budget), 1e-30)
    spent = (lambda point: point.energy_uj) if kind == "energy" else (lambda point: point.loss)
    other = (lambda point: point.loss) if kind == "energy" else (lambda point: point.energy_uj)
    feasible = [point for point in front if spent(point) <= budget + slack]
    if not feasible:
        if kind == "energy":
            raise ConfigError(f"search.energy_budget={budget:.6g} uJ/image is below every assignment of the candidates: "
                              f"the cheapest needs {front[0].energy_uj:.6g} uJ/image")
        raise ConfigError(f"search.loss_budget={budget:.6g} is below every assignment of the candidates: the most "
                          f"accurate has a predicted loss of {front[-1].loss:.6g}")
    return min(feasible, key=lambda point: (other(point), spent(point)))


def budget_value(table: SensitivityTable, kind: str, value, fraction: float = 1.0) -> tuple[float, Optional[tuple]]:
    """The numeric budget of ``value`` (a number, a setting dict naming a uniform setting, or None: the configured
    network's energy), and the uniform assignment it names (None for a number); a setting's budget is taken at
    ``fraction`` of its predicted energy or loss."""
    if value is None:
        return table.reference_energy_uj, None
    if isinstance(value, dict):
        index = table.settings.index(value)
        choice = table.uniform(index)
        if choice is None:
            bad = next(table.layers[l] for l in range(len(table.layers))
                       if not table.valid(l, index) and not table.is_edge(l))
            raise ConfigError(f"search.{kind}_budget: the uniform setting {value} is invalid for layer {bad!r}: "
                              f"{table.notes[table.layers.index(bad)][index]}")
        energy, loss, _ = table.predict(choice)
        return fraction * (energy if kind == "energy" else loss), choice
    return float(value), None
