"""`benchmarks/efficiency_bound.py`: the density an efficiency target needs, checked by hand on a two-layer report."""

from __future__ import annotations

import csv
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import efficiency_bound  # noqa: E402

LAYER_COLUMNS = ("layer", "adc_bits", "ideal_adc", "input_bits_fed", "input_ones_fed", "energy_adc_uj",
                 "energy_cell_read_uj", "energy_wordline_uj", "energy_shift_add_uj", "energy_scale_uj", "energy_uj")


def _report(folder, baseline_uj: float) -> None:
    rows = [  # an int8 edge layer (kept whole) and one array layer at ADC 5, density 20 / 100
        dict(layer="conv1", adc_bits=8, ideal_adc=True, input_bits_fed=50, input_ones_fed=25, energy_adc_uj=0.01,
             energy_cell_read_uj=0.08, energy_wordline_uj=0.005, energy_shift_add_uj=0.003, energy_scale_uj=0.002,
             energy_uj=0.1),
        dict(layer="layer1.0.conv1", adc_bits=5, ideal_adc=False, input_bits_fed=100, input_ones_fed=20,
             energy_adc_uj=0.06, energy_cell_read_uj=0.5, energy_wordline_uj=0.02, energy_shift_add_uj=0.03,
             energy_scale_uj=0.01, energy_uj=0.62)]
    with open(folder / efficiency_bound.LAYERS, "w", newline="") as stream:
        writer = csv.DictWriter(stream, LAYER_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    (folder / efficiency_bound.SUMMARY).write_text(f"run,baseline_energy_per_image_uj\nx,{baseline_uj}\n")


def test_the_bound_by_hand(tmp_path, capsys):
    _report(tmp_path, 1.0)
    result = efficiency_bound.main(["--report", str(tmp_path), "--adc-bits", "4", "--target", "2"])
    adc = 0.06 * (0.538 * 4 + 4.3753) * 5 / ((0.538 * 5 + 4.3753) * 6)  # SAR energy per conversion, 4 over 5 bits
    fixed = 0.1 + adc + 0.03 + 0.01  # the whole edge layer, the ADC at 4 bits, shift-adds, scales
    per_density = (0.5 * 5 / 6 + 0.02) / 0.2  # cell reads last (b + 1) ns: 5 over 6; wordlines as they are
    assert result["fixed_uj"] == pytest.approx(fixed) and result["per_density_uj"] == pytest.approx(per_density)
    assert result["density"] == pytest.approx(0.2)
    assert result["needed_density"] == pytest.approx((1.0 / 2 - fixed) / per_density)
    assert result["ceiling"] == pytest.approx(1.0 / fixed)
    assert f"2x needs an array-layer density of {(0.5 - fixed) / per_density:.4f}" in capsys.readouterr().out


def test_a_folder_without_the_report_is_one_clear_line(tmp_path):
    with pytest.raises(SystemExit, match=r"hardware_test_summary.csv does not exist"):
        efficiency_bound.main(["--report", str(tmp_path)])
