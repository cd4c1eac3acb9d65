"""Sweeps of CIMQ on ResNet-20 (W4A4): one argument of the full set changed at a time.

Each point is `configs/quant/cimq_ptq.yaml` with one argument changed (the others at the preset's values:
ADC 4, 128x128 arrays, uniform input codes at twice the calibrated step, keep probability p = 0.5, `int8`
first conv and classifier, one weight scale per array column, one ADC range per column, QDrop's learning
rates x10), measured by `runner.measure` (fit + test on ``cifar10_lossless``). Swept: ADC bits, array size,
max one-bits k, p, and issue 15's pieces each taken out of the full set (edge layers on the arrays, one
weight scale per array, one ADC range per array, QDrop's learning rates, the calibrated input step).
Writes ``sweeps.csv`` and ``pareto.png``: accuracy against energy per image of every point, with the
ablation's settings (``ablation.csv``, when present) and the Pareto front (no other point is both more
accurate and cheaper). The ADC points are the ablation's CIMQ rows: they are reused from ``ablation.csv``
when it holds them, measured otherwise.

    python benchmarks/sweeps.py            # ~35 min on 2 cores after ablation.py (8 new points)
    python benchmarks/sweeps.py --smoke    # tiny data, 2 steps per unit
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional

from runner import ResultStore, Setting, base_parser, markdown_table, prepare, run_settings

SWEEPS = {
    "adc_bits": (8, 5, 4, 3),  # the ablation's CIMQ rows
    "array": (64, 128),
    "max_ones": (0, 2),  # 0 = uniform codes (the presets' codes since issue 15), 2 = codes with at most 2 ones
    "keep_prob": (0.5, 1.0),  # 1.0 = no dropping
    # issue 15's pieces, each taken out of the full set: the preset's value first, then the one before it
    "edge_layers": ("int8", "cim"),  # first conv and classifier at 8 bits (ideal ADC), or on the 4-bit arrays
    "weight_granularity": ("array_channel", "array"),
    "psum_granularity": ("column", "array"),
    "lr_scale": (10.0, 1.0),  # the three reconstruction learning rates, as a multiple of QDrop's
    "step_scale": (2.0, 1.0),  # the input step, as a multiple of the calibrated one
}
# cimq_ptq.yaml's values: a point at one of them is the CIMQ row itself
BASE = {"adc_bits": 4, "array": 128, "max_ones": 0, "keep_prob": 0.5, "edge_layers": "int8",
        "weight_granularity": "array_channel", "psum_granularity": "column", "lr_scale": 10.0, "step_scale": 2.0}
# sweeps whose values are other rows (technique configs) rather than a `Setting` field
ROW_SWEEPS = {"edge_layers": {"int8": "cimq", "cim": "cimq_edges_on_arrays"}}


def sweep_settings(iters: int, sweeps: dict = SWEEPS) -> list[tuple[str, object, Setting]]:
    """``(swept argument, value, setting)`` for every sweep point; the CIMQ default is left unset (same key as
    the ablation's CIMQ row, so it is measured once)."""
    base = Setting("resnet20", "cimq", weight_bits=4, input_bits=4, adc_bits=4, iters=iters)
    points = []
    for name, values in sweeps.items():
        for value in values:
            if value == BASE[name]:
                setting = base
            elif name in ROW_SWEEPS:
                setting = replace(base, row=ROW_SWEEPS[name][value])
            else:
                setting = replace(base, **{name: value})
            points.append((name, value, setting))
    return points


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (energy, accuracy) points that no other point beats on both (lower energy, higher accuracy)."""
    front, best = [], float("-inf")
    for energy, accuracy in sorted(points, key=lambda p: (p[0], -p[1])):
        if accuracy > best:
            front.append((energy, accuracy))
            best = accuracy
    return front


def plot(groups: dict[str, list[tuple[float, float]]], path: Path) -> Path:
    """Accuracy against energy per image, one marker per group, the Pareto front of all points joined."""
    from cimq_pl.cost.plots import finish_figure, new_figure

    figure = new_figure(6.5, 4.5)
    axes = figure.add_subplot(1, 1, 1)
    for label, points in groups.items():
        if points:
            axes.plot(*zip(*points), "o", label=label, alpha=0.8)
    front = pareto_front([p for points in groups.values() for p in points])
    axes.plot(*zip(*front), "k-", linewidth=1, label="Pareto front")
    return finish_figure(figure, axes, path, "energy per image (uJ, NeuroSim 22 nm table)",
                         "top-1 accuracy (cifar10_lossless, 1,000)", "ResNet-20 W4A4: accuracy vs energy")


def _point(row: dict) -> Optional[tuple[float, float]]:
    if row.get("test/energy_per_image_uj", "") in ("", None):
        return None
    return float(row["test/energy_per_image_uj"]), float(row["test/acc"])


def tables(points: list[tuple[str, object, dict]]) -> str:
    """Markdown: one table per swept argument (accuracy, energy, efficiency, bit density, fit time)."""
    out = []
    for name in dict.fromkeys(p[0] for p in points):
        lines = [{"value": ("uniform" if name == "max_ones" and value == 0 else value), **row}
                 for swept, value, row in points if swept == name]
        columns = ["value", "test/acc", "test/energy_per_image_uj", "test/hw_efficiency_vs_baseline",
                   "test/bit_density", "fit_seconds"]
        headers = [name, "test/acc", "uJ/image", "efficiency vs baseline", "bit density", "fit s"]
        out.append(f"**sweep of {name}** (the others as in `cimq_ptq.yaml`)\n\n"
                   + markdown_table(lines, columns, headers))
    return "\n\n".join(out)


def main(argv: Optional[list[str]] = None) -> list[tuple[str, object, dict]]:
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=100, help="reconstruction steps per unit (suite preset: 100)")
    args = parser.parse_args(argv)
    extra = prepare(args)
    sweeps = SWEEPS
    if args.smoke:
        sweeps = {"adc_bits": (4,), "array": (64,), "max_ones": (1,)}  # keep_prob: the same code path, left out for CI time
    points = sweep_settings(2 if args.smoke else args.iters, sweeps)
    ablation = args.out_dir / "ablation.csv"
    store = ResultStore(args.out_dir / "sweeps.csv", reuse=[ablation])
    unique = list({setting.key: (setting, False) for _, _, setting in points}.values())
    rows = {row["key"]: row for row in run_settings(unique, store, args.work_dir, extra)}
    measured = [(name, value, rows[setting.key]) for name, value, setting in points]
    print("\n" + tables(measured))
    groups: dict[str, list] = {f"CIMQ, {name} sweep": [] for name in sweeps}
    for name, _, row in measured:
        if _point(row):
            groups[f"CIMQ, {name} sweep"].append(_point(row))
    if ablation.is_file():
        import csv

        with open(ablation, newline="") as stream:
            for row in csv.DictReader(stream):
                if row["model"] == "resnet20" and row["row"] != "cimq" and _point(row) and row["weight_bits"] == "4":
                    groups.setdefault(f"ablation: {row['row']}", []).append(_point(row))
    picture = plot(groups, args.out_dir / "pareto.png")
    print(f"\nwrote {store.path} and {picture}")
    return measured


if __name__ == "__main__":
    main()
