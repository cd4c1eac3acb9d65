"""Per-layer rows, the text table, atomic CSV files and the pictures."""

import csv

import pytest

from cimq_pl.cost import (
    LAYER_COLUMNS,
    SUMMARY_COLUMNS,
    format_table,
    layer_rows,
    network_cost,
    plot_accuracy_vs_energy,
    plot_energy_breakdown,
    summary_row,
    write_csv_atomic,
)

from metrics.test_hardware_cost_metric import LAYERS, _random_counts


def _costs():
    return network_cost(LAYERS, _random_counts(0)), network_cost(LAYERS, _random_counts(1))


def test_layer_rows_add_up_to_the_totals():
    cost, _ = _costs()
    rows = layer_rows(cost)
    assert [row["layer"] for row in rows] == ["conv", "fc"]
    assert set(rows[0]) == set(LAYER_COLUMNS)
    assert sum(row["energy_uj"] for row in rows) == pytest.approx(cost.energy_per_image_uj)
    assert sum(row["energy_share"] for row in rows) == pytest.approx(1.0)
    for row in rows:
        assert row["energy_uj"] == pytest.approx(sum(row[f"energy_{c}_uj"] for c in
                                                     ("adc", "cell_read", "wordline", "shift_add", "scale")))
    assert rows[1]["ideal_adc"] and rows[1]["adc_bits"] == 8


def test_summary_and_text_table():
    cost, baseline = _costs()
    row = summary_row(cost, baseline, run="r", stage="test", accuracy=0.9)
    assert set(row) == set(SUMMARY_COLUMNS)
    assert row["hw_efficiency_vs_baseline"] == pytest.approx(baseline.energy_per_image_uj / cost.energy_per_image_uj)
    assert summary_row(cost)["hw_efficiency_vs_baseline"] is None
    text = format_table(cost, baseline, title="title")
    assert text.splitlines()[0] == "title" and "fc*" in text and "hardware efficiency" in text
    assert "* ideal ADC, charged as EnergyTable.ideal_adc_bits" in text


def test_csv_is_written_atomically(tmp_path):
    cost, _ = _costs()
    path = write_csv_atomic(tmp_path / "sub" / "layers.csv", layer_rows(cost), LAYER_COLUMNS)
    with open(path) as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == 2 and list(rows[0]) == list(LAYER_COLUMNS)
    assert [p.name for p in path.parent.iterdir()] == ["layers.csv"]  # no temporary file left


def test_pictures(tmp_path):
    cost, baseline = _costs()
    assert plot_energy_breakdown(cost, tmp_path / "energy.png").read_bytes()[:4] == b"\x89PNG"
    files = []
    for index, accuracy in enumerate((0.91, 0.88)):
        row = summary_row(cost if index else baseline, baseline, run=f"run{index}", accuracy=accuracy)
        files.append(write_csv_atomic(tmp_path / f"summary{index}.csv", [row], SUMMARY_COLUMNS))
    assert plot_accuracy_vs_energy(files, tmp_path / "acc.png").stat().st_size > 0
    with pytest.raises(ValueError, match="labels has 1 entries: expected one per summary file"):
        plot_accuracy_vs_energy(files, tmp_path / "x.png", labels=["a"])
    empty = write_csv_atomic(tmp_path / "empty.csv", [summary_row(cost)], SUMMARY_COLUMNS)
    with pytest.raises(ValueError, match="has both accuracy and energy_per_image_uj"):
        plot_accuracy_vs_energy([empty], tmp_path / "y.png")
