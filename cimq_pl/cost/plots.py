"""Pictures of the hardware cost: energy breakdown per layer, accuracy against energy across runs (PNG files).

Matplotlib is used through its object API with the Agg canvas (no pyplot state, no display needed).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Optional, Sequence, Union

from cimq_pl.cost.model import COMPONENTS, NetworkCost

__all__ = ["finish_figure", "new_figure", "plot_accuracy_vs_energy", "plot_energy_breakdown", "read_summaries", "save_figure"]

_LABELS = {"adc": "ADC", "cell_read": "cell read", "wordline": "wordline", "shift_add": "shift-add",
           "scale": "scale multiply"}
PathLike = Union[str, os.PathLike]


def new_figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas (no pyplot state, no display), ``width`` x ``height`` inches."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure, path: PathLike) -> Path:
    """Write ``figure`` to ``path`` atomically (format from the suffix, default PNG); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.tmp{path.suffix}")
    figure.savefig(temporary, format=path.suffix.lstrip(".") or "png")
    os.replace(temporary, path)
    return path


def finish_figure(figure, axes, path: PathLike, xlabel: str, ylabel: str, title: str, legend: bool = True) -> Path:
    """Label ``axes``, add the legend, lay ``figure`` out and write it to ``path`` (atomically)."""
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize=9)
    if legend:
        axes.legend(fontsize=7)
    figure.tight_layout()
    return save_figure(figure, path)


def plot_energy_breakdown(cost: NetworkCost, path: PathLike, title: Optional[str] = None) -> Path:
    """Stacked bars: energy per image of every layer, split by component (uJ). Written atomically.

    Args:
        cost: the network's cost.
        path: PNG file to write.
        title: figure title (default: totals).

    Returns:
        The path written.
    """
    figure = new_figure(max(6.0, 0.35 * len(cost.layers) + 2), 4.2)
    axes = figure.add_subplot(1, 1, 1)
    names = [layer.name for layer in cost.layers]
    positions = range(len(names))
    bottom = [0.0] * len(names)
    for component in COMPONENTS:
        values = [layer.energy_fj[component] / max(cost.images, 1) / 1e9 for layer in cost.layers]
        axes.bar(positions, values, bottom=bottom, label=_LABELS[component], width=0.8)
        bottom = [b + v for b, v in zip(bottom, values)]
    axes.set_xticks(list(positions))
    axes.set_xticklabels(names, rotation=70, ha="right", fontsize=7)
    title = title or f"{cost.energy_per_image_uj:.3f} uJ/image, {cost.tops_per_w:.1f} TOPS/W ({cost.table.name})"
    return finish_figure(figure, axes, path, "", "energy per image (uJ)", title)


def read_summaries(paths: Sequence[PathLike]) -> list:
    """Rows of summary CSVs (see `cimq_pl.cost.tables.SUMMARY_COLUMNS`), numbers parsed, empty cells None.

    Raises:
        FileNotFoundError: when a file does not exist.
    """
    rows = []
    for path in paths:
        with open(path, newline="") as stream:
            for row in csv.DictReader(stream):
                parsed = {}
                for key, value in row.items():
                    if value in ("", None):
                        parsed[key] = None
                        continue
                    try:
                        parsed[key] = float(value)
                    except ValueError:
                        parsed[key] = value
                parsed["source"] = str(path)
                rows.append(parsed)
    return rows


def plot_accuracy_vs_energy(
    summaries: Sequence[PathLike], path: PathLike, labels: Optional[Sequence[str]] = None
) -> Path:
    """Scatter of accuracy against energy per image, one point per run (benchmarks).

    Each run's baseline (conventional, 8-bit ADC) is drawn as a hollow marker at its energy, joined to the
    run, when the summary holds it (no baseline accuracy is measured, so it shares the run's accuracy).

    Args:
        summaries: summary CSV files written by `HardwareReport` or the cost report (one row per run).
        path: PNG file to write.
        labels: one label per file (default: the ``run`` column, else the file name).

    Returns:
        The path written.

    Raises:
        ValueError: when ``labels`` has the wrong length or no row has both an accuracy and an energy.
    """
    if labels is not None and len(labels) != len(summaries):
        raise ValueError(f"labels has {len(labels)} entries: expected one per summary file ({len(summaries)})")
    figure = new_figure(6.0, 4.2)
    axes = figure.add_subplot(1, 1, 1)
    plotted = 0
    for index, file in enumerate(summaries):
        for row in read_summaries([file]):
            energy, accuracy = row.get("energy_per_image_uj"), row.get("accuracy")
            if energy is None or accuracy is None:
                continue
            label = labels[index] if labels is not None else (row.get("run") or Path(file).stem)
            points = axes.plot([energy], [accuracy], "o", label=str(label))
            baseline = row.get("baseline_energy_per_image_uj")
            if baseline is not None:
                color = points[0].get_color()
                axes.plot([baseline], [accuracy], "o", mfc="none", color=color)
                axes.plot([baseline, energy], [accuracy, accuracy], ":", color=color, linewidth=0.8)
            plotted += 1
    if not plotted:
        raise ValueError(f"no row of {[str(s) for s in summaries]} has both accuracy and energy_per_image_uj")
    return finish_figure(figure, axes, path, "energy per image (uJ)", "top-1 accuracy",
                         "accuracy vs energy (hollow: conventional 8-bit-ADC baseline)")
