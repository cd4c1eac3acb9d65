"""What input bit density a hardware-efficiency target needs, from a measured network's per-layer cost report.

Issue 15 asks for 2.22x the conventional baseline's efficiency at ADC 4. In the cost model (README "Hardware cost")
the `int8` edge layers, the shift-adds and the scale multiplies do not depend on the array layers' input bits, and
the ADC energy depends on the resolution alone; the cell reads and wordline activations of the array layers scale
with their input bit density. This script reads the `HardwareReport` tables of a measured run (its W&B files folder:
``hardware_test_layers.csv`` and ``hardware_test_summary.csv``), moves every array layer to ``--adc-bits`` (ADC and
cell-read energies scaled per conversion by the energy table), and prints the fixed energy, the energy per unit of
density, and the array layers' density at which ``--target`` x the baseline's efficiency is reached.

    python benchmarks/efficiency_bound.py --report runs/benchmarks/wandb/offline-run-<...>/files
    python benchmarks/efficiency_bound.py --report <folder> --adc-bits 4 --target 2.22 [--energy-table my.yaml]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Optional

from cimq_pl.callbacks.hardware_report import report_file_name
from cimq_pl.cost.energy import EnergyTable

LAYERS, SUMMARY = report_file_name("test", "layers.csv"), report_file_name("test", "summary.csv")


def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise SystemExit(f"--report: {path} does not exist (a HardwareReport run's files folder holds {LAYERS} and "
                         f"{SUMMARY})")
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


def bound(layers: list[dict], baseline_uj: float, adc_bits: int, target: float, table: EnergyTable) -> dict:
    """The energies (uJ per image) of the report's network with its array layers at ``adc_bits``, and the array
    layers' input bit density that gives ``target`` x the baseline's efficiency (``baseline_uj`` / energy)."""
    edges = [row for row in layers if row["ideal_adc"] == "True"]
    arrays = [row for row in layers if row["ideal_adc"] != "True"]

    def total(rows, key, scale=lambda row: 1.0):
        return sum(float(row[key]) * scale(row) for row in rows)

    adc = total(arrays, "energy_adc_uj", lambda row: table.adc_fj(adc_bits) / table.adc_fj(int(row["adc_bits"])))
    cells = total(arrays, "energy_cell_read_uj",
                  lambda row: table.cell_read_fj(adc_bits) / table.cell_read_fj(int(row["adc_bits"])))
    density = total(arrays, "input_ones_fed") / total(arrays, "input_bits_fed")
    fixed = {"edge layers": total(edges, "energy_uj"), "ADC": adc, "shift-add": total(arrays, "energy_shift_add_uj"),
             "scale": total(arrays, "energy_scale_uj")}
    per_density = (cells + total(arrays, "energy_wordline_uj")) / density  # uJ per unit of array-layer density
    fixed_uj = sum(fixed.values())
    return {"fixed": fixed, "fixed_uj": fixed_uj, "per_density_uj": per_density, "density": density,
            "energy_uj": fixed_uj + per_density * density, "baseline_uj": baseline_uj,
            "needed_density": (baseline_uj / target - fixed_uj) / per_density,
            "ceiling": baseline_uj / fixed_uj}


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--report", type=Path, required=True,
                        help=f"a HardwareReport run's files folder ({LAYERS}, {SUMMARY})")
    parser.add_argument("--adc-bits", type=int, default=4, help="ADC resolution of the array layers (4)")
    parser.add_argument("--target", type=float, default=2.22, help="efficiency against the baseline (2.22)")
    parser.add_argument("--energy-table", type=Path, default=None, help="the run's energy table YAML (the default)")
    args = parser.parse_args(argv)
    if args.adc_bits < 1 or args.target <= 0:
        parser.error(f"--adc-bits={args.adc_bits} must be >= 1 and --target={args.target:g} > 0")
    table = EnergyTable.from_yaml(args.energy_table) if args.energy_table else EnergyTable()
    baseline = float(_rows(args.report / SUMMARY)[0]["baseline_energy_per_image_uj"])
    result = bound(_rows(args.report / LAYERS), baseline, args.adc_bits, args.target, table)
    fixed = ", ".join(f"{name} {value:.4f}" for name, value in result["fixed"].items())
    print(f"array layers at ADC {args.adc_bits}: fixed {result['fixed_uj']:.4f} uJ/image ({fixed}), "
          f"{result['fixed_uj'] / baseline:.0%} of the baseline's {baseline:.4f}")
    print(f"cell reads + wordlines: {result['per_density_uj']:.4f} uJ/image per unit of array-layer input bit density "
          f"(the report's density {result['density']:.4f}: {result['energy_uj']:.4f} uJ/image, "
          f"{baseline / result['energy_uj']:.2f}x)")
    print(f"{args.target:g}x needs an array-layer density of {result['needed_density']:.4f} or less "
          f"({1 - result['needed_density'] / result['density']:.0%} below the report's); at density 0: "
          f"{result['ceiling']:.2f}x")
    return result


if __name__ == "__main__":
    main()
