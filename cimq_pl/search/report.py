"""What a search writes: the chosen assignment as a config ``fit`` takes, the tables, the plot, a summary.

Files (in `SearchConfig.output_dir`), each written atomically:

* ``cim_overrides.yaml``: ``model: {cim_overrides: {layer: {field: value}}}``, every searched layer by exact
  name in model order, with the run's other overrides kept (``--config`` it after the technique config);
* ``sensitivity.csv``: `SENSITIVITY_COLUMNS`, one row per (layer, setting);
* ``front.csv``: the predicted Pareto front (energy, loss, latency, the assignment);
* ``points.csv``: the configured network, the uniform settings and the searched assignment, predicted (the
  objective) and measured (whole networks: KL from the float network, accuracies; `POINT_COLUMNS`);
* ``search.png``: against energy per image, the predicted objective (front, uniform settings, searched point,
  budget) and what the verified networks measured (accuracy).
"""

from __future__ import annotations

import math
import os
import tempfile
import textwrap
from pathlib import Path
from typing import Optional

import yaml

from cimq_pl.cost.plots import finish_figure, new_figure
from cimq_pl.cost.tables import write_csv_atomic
from cimq_pl.search.config import setting_label
from cimq_pl.search.run import SearchResult
from cimq_pl.search.sensitivity import SENSITIVITY_COLUMNS

__all__ = ["FRONT_COLUMNS", "OVERRIDES_FILE", "POINT_COLUMNS", "format_summary", "overrides_yaml", "plot_search",
           "write_search_files"]

OVERRIDES_FILE = "cim_overrides.yaml"
FRONT_COLUMNS = ("energy_uj", "loss", "latency_us", "assignment")
POINT_COLUMNS = ("label", "kind", "predicted_energy_uj", "predicted_loss", "predicted_latency_us", "energy_uj", "loss",
                 "latency_us", "bit_density", "accuracy", "test_accuracy", "energy_vs_configured", "assignment")
_METRIC = {"kl": "KL(float || quantized), nats/image", "mse": "logit MSE"}
_OBJECTIVE = {"fisher": "Fisher-weighted error (summed over searched layers)", "kl": "KL from the float network",
              "mse": "logit MSE from the float network"}


def overrides_yaml(result: SearchResult, header: str = "") -> str:
    """The YAML text of ``cim_overrides.yaml``: commented header, then ``model.cim_overrides``."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    body = yaml.safe_dump({"model": {"cim_overrides": {name: dict(fields) for name, fields in result.overrides.items()}}},
                          sort_keys=False, default_flow_style=None, width=120)
    return "\n".join(lines + [body])


def _assignment_text(result: SearchResult, choice) -> str:
    return " ".join(f"{name}:{setting_label(setting)}" for name, setting in result.table.assignment(choice).items())


def _point_rows(result: SearchResult) -> list[dict]:
    configured = result.points[0].measured.energy_uj if result.points[0].measured else result.table.reference_energy_uj
    rows = []
    for point in result.points:
        measured = point.measured
        row = {"label": point.label, "kind": point.kind, "predicted_energy_uj": point.predicted_energy_uj,
               "predicted_loss": point.predicted_loss, "predicted_latency_us": point.predicted_latency_us}
        if measured is not None:
            row.update(energy_uj=measured.energy_uj, loss=measured.loss, latency_us=measured.latency_us,
                       bit_density=measured.cost.bit_density, accuracy=measured.accuracy,
                       test_accuracy=measured.test_accuracy, energy_vs_configured=measured.energy_uj / configured)
        if point.choice is not None:
            row["assignment"] = _assignment_text(result, point.choice)
        rows.append(row)
    return rows


def plot_search(result: SearchResult, path, title: str = "") -> Path:
    """Two panels against energy per image: the predicted objective (the front of the additive model, the uniform
    settings, the configured network and the searched assignment, with the budget), and what the verified
    networks measured (test accuracy when test images were given, else top-1 on the search images, else their
    loss against the float network)."""
    measured = [p for p in result.points if p.measured is not None]
    figure = new_figure(11.0 if measured else 6.5, 4.5)
    axes = figure.add_subplot(1, 2 if measured else 1, 1)
    front = result.front
    axes.plot([p.energy_uj for p in front], [p.loss for p in front], "-", color="0.6", linewidth=1,
              label=f"front of the additive model ({len(front)} assignments)")
    for point in result.points:
        axes.plot(point.predicted_energy_uj, point.predicted_loss, _MARKERS[point.kind], color=_COLOURS[point.kind],
                  markersize=12 if point.kind == "searched" else 7,
                  label=point.label if point.kind != "uniform" else None)
        if point.kind == "uniform":
            axes.annotate(point.label, (point.predicted_energy_uj, point.predicted_loss), textcoords="offset points",
                          xytext=(4, 4), fontsize=7)
    axes.plot([], [], "o", color=_COLOURS["uniform"], label="uniform settings")
    kind, budget, _ = result.budget
    if kind == "energy":
        axes.axvline(budget, color="tab:red", linestyle=":", linewidth=1, label="energy budget")
    else:
        axes.axhline(budget, color="tab:red", linestyle=":", linewidth=1, label="loss budget")
    objective = _OBJECTIVE.get(result.table.metric, result.table.metric)
    if title:
        figure.suptitle(textwrap.fill(title, 130), fontsize=7)
    if not measured:
        return finish_figure(figure, axes, path, "energy per image (uJ)", f"predicted {objective}",
                             "per-layer precision search: predicted (additive model)")
    axes.set_xlabel("energy per image (uJ)")
    axes.set_ylabel(f"predicted {objective}")
    axes.set_title("predicted (additive model)", fontsize=9)
    axes.legend(fontsize=6)
    right = figure.add_subplot(1, 2, 2)
    value, label = _measured_axis(measured, result.start)
    uniform = sorted((p for p in measured if p.kind == "uniform"), key=lambda p: p.measured.energy_uj)
    right.plot([p.measured.energy_uj for p in uniform], [value(p) for p in uniform], "--", color=_COLOURS["uniform"],
               linewidth=1, label="uniform settings")
    for point in measured:
        right.plot(point.measured.energy_uj, value(point), _MARKERS[point.kind], color=_COLOURS[point.kind],
                   markersize=12 if point.kind == "searched" else 7,
                   label=point.label if point.kind != "uniform" else None)
        if point.kind == "uniform":
            right.annotate(point.label, (point.measured.energy_uj, value(point)), textcoords="offset points",
                           xytext=(4, 4), fontsize=7)
    return finish_figure(figure, right, path, "energy per image (uJ)", label,
                         f"measured: whole networks, {result.start}")


_COLOURS = {"configured": "k", "uniform": "tab:blue", "searched": "tab:red"}
_MARKERS = {"configured": "s", "uniform": "o", "searched": "*"}


def _measured_axis(points, start: str) -> tuple:
    if all(p.measured.test_accuracy is not None for p in points):
        return (lambda p: p.measured.test_accuracy), f"top-1 accuracy, test images ({start})"
    if all(p.measured.accuracy is not None for p in points):
        return (lambda p: p.measured.accuracy), f"top-1 accuracy, search images ({start})"
    return (lambda p: p.measured.loss), "loss against the float network"


def _write_text_atomic(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def write_search_files(result: SearchResult, output_dir, header: str = "", title: str = "") -> list[Path]:
    """Write every file of the module docstring into ``output_dir``; returns their paths."""
    folder = Path(output_dir)
    written = [_write_text_atomic(folder / OVERRIDES_FILE, overrides_yaml(result, header))]
    written.append(write_csv_atomic(folder / "sensitivity.csv", result.table.rows(), SENSITIVITY_COLUMNS))
    front_rows = [{"energy_uj": p.energy_uj, "loss": p.loss, "latency_us": p.latency_us,
                   "assignment": _assignment_text(result, p.choice)} for p in result.front]
    written.append(write_csv_atomic(folder / "front.csv", front_rows, FRONT_COLUMNS))
    written.append(write_csv_atomic(folder / "points.csv", _point_rows(result), POINT_COLUMNS))
    written.append(plot_search(result, folder / "search.png", title))
    return written


def _number(value: Optional[float], digits: int = 4) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}g}"


def format_summary(result: SearchResult, title: str = "") -> str:
    """The uniform points beside the searched one (predicted and measured) and the chosen setting per layer."""
    table = result.table
    network = "mse" if table.metric == "mse" else "kl"
    lines = [title] if title else []
    lines.append(f"{'point':<22} {'pred uJ':>9} {'pred obj':>10} {'uJ/image':>9} {network:>8} {'acc':>7} "
                 f"{'test acc':>8}")
    lines.append("-" * len(lines[-1]))
    for point in result.points:
        measured = point.measured
        lines.append(
            f"{point.label:<22} {_number(point.predicted_energy_uj):>9} {_number(point.predicted_loss):>10} "
            f"{_number(measured.energy_uj if measured else None):>9} {_number(measured.loss if measured else None):>8} "
            f"{_number(measured.accuracy if measured else None, 3):>7} "
            f"{_number(measured.test_accuracy if measured else None, 3):>8}"
        )
    kind, budget, description = result.budget
    unit = "uJ/image" if kind == "energy" else "(objective)"
    lines.append(f"{kind} budget {budget:.6g} {unit} ({description}); objective: "
                 f"{_OBJECTIVE.get(table.metric, table.metric)}; {network}: {_METRIC[network]}; acc: top-1; both on "
                 f"{table.images} calibration images, {result.start}")
    chosen = table.assignment(result.chosen.choice)
    counts: dict = {}
    for setting in chosen.values():
        counts[setting_label(setting)] = counts.get(setting_label(setting), 0) + 1
    lines.append("searched assignment: " + ", ".join(f"{label} x{count}" for label, count in counts.items()))
    kept = [name for name, s in zip(table.layers, result.chosen.choice) if s is None]  # edge layers left as they are
    lines.append("  " + "; ".join([*(f"{name} {setting_label(setting)}" for name, setting in chosen.items()),
                                   *(f"{name} as configured" for name in kept)]))
    lines.append(f"sensitivity: {sum(1 for row in table.seconds for s in row if s > 0)} trials in "
                 f"{result.seconds.get('sensitivity', 0):.1f} s; verification {result.seconds.get('verify', 0):.1f} s; "
                 f"front of {len(result.front)} assignments")
    return "\n".join(lines)
