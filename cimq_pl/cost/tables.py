"""Per-layer and summary tables of a `NetworkCost`: rows for CSV / W&B, a readable text table, atomic CSV files."""

from __future__ import annotations

import csv
import io
import math
import os
import tempfile
from pathlib import Path
from typing import Optional, Sequence, Union

from cimq_pl.cost.model import COMPONENTS, NetworkCost, hw_efficiency

__all__ = ["LAYER_COLUMNS", "SUMMARY_COLUMNS", "format_table", "layer_rows", "summary_row", "write_csv_atomic"]

#: Columns of the per-layer table; counts and energies are per image; bit-widths are each layer's own (its
#: spec, with any per-layer override of the macro applied); ``adc_range_settings`` is per layer, not per image
#: (the ADC ranges programmed when the layer is loaded, `LayerInfo.adc_range_settings`).
LAYER_COLUMNS = (
    "layer", "arrays", "adc_bits", "adc_range_settings", "weight_bits", "input_bits", "ideal_adc", "float_inputs",
    "macs", "adc_conversions", "input_bits_fed",
    "input_ones_fed", "bit_density", "wordline_activations", "cell_reads", "shift_add_ops", "scale_ops",
    *(f"energy_{name}_uj" for name in COMPONENTS), "energy_uj", "energy_share", "tops_per_w", "latency_us",
)

#: Columns of the one-row summary table (per image); ``baseline_*`` and the efficiency are empty without a
#: baseline, ``accuracy`` without an accuracy.
SUMMARY_COLUMNS = (
    "run", "stage", "images", "arrays", "macs", "energy_per_image_uj", "tops_per_w", "bit_density",
    "latency_us_per_image", *(f"energy_{name}_uj" for name in COMPONENTS), "adc_share",
    "baseline_energy_per_image_uj", "baseline_tops_per_w", "baseline_bit_density", "hw_efficiency_vs_baseline",
    "accuracy", "energy_table",
)

_COUNTS = ("macs", "adc_conversions", "input_bits_fed", "input_ones_fed", "wordline_activations", "cell_reads",
           "shift_add_ops", "scale_ops")


def layer_rows(cost: NetworkCost) -> list:
    """One dict per layer with the `LAYER_COLUMNS` (counts and energies per image; uJ, us)."""
    total = cost.total_fj
    rows = []
    for layer in cost.layers:
        info = layer.info
        row = {"layer": layer.name, "arrays": layer.arrays, "adc_bits": layer.adc_bits,
               "weight_bits": info.weight_bits if info is not None else None,
               "input_bits": info.input_bits if info is not None else None,
               "adc_range_settings": info.adc_range_settings if info is not None else None,
               "ideal_adc": layer.ideal_adc, "float_inputs": layer.float_inputs}
        row.update({name: layer.per_image(name) for name in _COUNTS})
        row["bit_density"] = layer.bit_density
        row.update({f"energy_{name}_uj": layer.energy_fj[name] / max(cost.images, 1) / 1e9 for name in COMPONENTS})
        row["energy_uj"] = layer.energy_per_image_uj
        row["energy_share"] = layer.total_fj / total if total else 0.0
        row["tops_per_w"] = layer.tops_per_w
        row["latency_us"] = layer.latency_ns / max(cost.images, 1) / 1e3
        rows.append(row)
    return rows


def summary_row(
    cost: NetworkCost,
    baseline: Optional[NetworkCost] = None,
    run: str = "",
    stage: str = "",
    accuracy: Optional[float] = None,
) -> dict:
    """The `SUMMARY_COLUMNS` of one evaluation (network totals per image, baseline and efficiency if given)."""
    breakdown = cost.breakdown_per_image_uj()
    row = {
        "run": run, "stage": stage, "images": cost.images, "arrays": cost.arrays, "macs": cost.macs_per_image,
        "energy_per_image_uj": cost.energy_per_image_uj, "tops_per_w": cost.tops_per_w,
        "bit_density": cost.bit_density, "latency_us_per_image": cost.latency_us_per_image,
        **{f"energy_{name}_uj": breakdown[name] for name in COMPONENTS}, "adc_share": cost.share("adc"),
        "baseline_energy_per_image_uj": None, "baseline_tops_per_w": None, "baseline_bit_density": None,
        "hw_efficiency_vs_baseline": None, "accuracy": accuracy, "energy_table": cost.table.name,
    }
    if baseline is not None:
        row.update(
            baseline_energy_per_image_uj=baseline.energy_per_image_uj,
            baseline_tops_per_w=baseline.tops_per_w,
            baseline_bit_density=baseline.bit_density,
            hw_efficiency_vs_baseline=hw_efficiency(baseline, cost),
        )
    return row


def _number(value: float, width: int) -> str:
    if value == 0:
        return f"{0:>{width}}"
    magnitude = abs(value)
    text = f"{value:.3g}" if magnitude < 1e4 else f"{value:.3e}"
    return f"{text:>{width}}"


def format_table(cost: NetworkCost, baseline: Optional[NetworkCost] = None, title: str = "") -> str:
    """A readable per-layer table (per image) with the totals, the baseline and the efficiency."""
    header = (f"{'layer':<24} {'arrays':>6} {'adc':>4} {'density':>7} {'conv/img':>9} {'energy uJ':>9} "
              + " ".join(f"{name[:7] + '%':>8}" for name in COMPONENTS) + f" {'TOPS/W':>7}")
    lines = [title] if title else []
    lines += [header, "-" * len(header)]
    for layer in cost.layers:
        flags = ("*" if layer.ideal_adc else "") + ("!" if layer.float_inputs else "")
        total = layer.total_fj
        shares = " ".join(
            f"{100 * layer.energy_fj[name] / total if total else 0.0:>8.1f}" for name in COMPONENTS
        )
        lines.append(
            f"{(layer.name + flags)[:24]:<24} {layer.arrays:>6} {layer.adc_bits:>4} {layer.bit_density:>7.3f} "
            f"{_number(layer.per_image('adc_conversions'), 9)} {layer.energy_per_image_uj:>9.4f} {shares} "
            f"{layer.tops_per_w:>7.1f}"
        )
    lines.append("-" * len(header))
    shares = " ".join(f"{100 * cost.share(name):>8.1f}" for name in COMPONENTS)
    lines.append(
        f"{'total':<24} {cost.arrays:>6} {'':>4} {cost.bit_density:>7.3f} "
        f"{_number(cost.count_per_image('adc_conversions'), 9)} {cost.energy_per_image_uj:>9.4f} {shares} "
        f"{cost.tops_per_w:>7.1f}"
    )
    lines.append(f"images {cost.images}, MACs/image {cost.macs_per_image:.4g}, latency "
                 f"{cost.latency_us_per_image:.4g} us/image, energy table {cost.table.name}")
    if baseline is not None:
        ratio = hw_efficiency(baseline, cost)
        lines.append(
            f"baseline (conventional, {max(l.adc_bits for l in baseline.layers) if baseline.layers else '-'}-bit "
            f"min-max ADC): {baseline.energy_per_image_uj:.4f} uJ/image, {baseline.tops_per_w:.1f} TOPS/W, "
            f"density {baseline.bit_density:.3f} -> hardware efficiency "
            f"{'n/a' if math.isnan(ratio) else f'{ratio:.3f}x'}"
        )
    if any(layer.ideal_adc for layer in cost.layers):
        lines.append("* ideal ADC, charged as EnergyTable.ideal_adc_bits")
    if any(layer.float_inputs for layer in cost.layers):
        lines.append("! float inputs: no input bits counted, wordline and cell-read energy not charged")
    return "\n".join(lines)


def write_csv_atomic(path: Union[str, os.PathLike], rows: Sequence[dict], columns: Sequence[str]) -> Path:
    """Write ``rows`` as CSV to ``path`` atomically (temporary file in the same folder, then ``os.replace``).

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: ("" if value is None else value) for key, value in row.items()})
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", newline="") as stream:
            stream.write(buffer.getvalue())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
