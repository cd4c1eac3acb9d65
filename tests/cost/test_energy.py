"""`EnergyTable`: NeuroSim's SAR numbers, the shipped YAML, YAML round trip and bad-YAML errors."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cimq_pl.cost import DEFAULT_ENERGY_TABLE_PATH, EnergyTable
from cimq_pl.cost.energy import REFERENCE_CELL_MEAN_US
from cimq_pl.errors import ConfigError


def test_sar_adc_model_of_neurosim():
    table = EnergyTable()
    # P(b) = (0.538 b + 4.3753) uW over (b + 1) ns; uW x ns = fJ.
    assert table.adc_fj(4) == pytest.approx((0.538 * 4 + 4.3753) * 5)  # 32.64 fJ
    assert table.adc_fj(5) == pytest.approx(42.39, abs=0.01)  # "about 42 fJ at 5 bits"
    assert table.adc_fj(8) == pytest.approx(78.11, abs=0.01)  # "about 78 fJ at 8 bits"
    assert table.adc_time_ns(4) == 5.0
    # an ideal ADC (None) is charged as the 8-bit baseline ADC
    assert table.adc_fj(None) == table.adc_fj(8) and table.charged_adc_bits(None) == 8
    # cell current flows during the conversion: 4.86 uW x (b + 1) ns
    assert table.cell_read_fj(4) == pytest.approx(4.86 * 5)
    assert table.wordline_fj(128) == pytest.approx(1.4 + 0.28 * 128)


def test_shipped_yaml_is_the_default_table():
    assert DEFAULT_ENERGY_TABLE_PATH.is_file()
    assert EnergyTable.from_yaml(DEFAULT_ENERGY_TABLE_PATH) == EnergyTable()


def test_yaml_round_trip(tmp_path):
    table = EnergyTable(name="mine", adc_power_uw_per_bit=1.0, cell_read_uw=0.3, ideal_adc_bits=6, columns_per_adc=8)
    path = tmp_path / "table.yaml"
    table.to_yaml(path)
    assert EnergyTable.from_yaml(path) == table


def test_partial_yaml_keeps_defaults(tmp_path):
    path = tmp_path / "partial.yaml"
    path.write_text("# only the ADC differs\nadc_power_uw_offset: 2.0\n")
    table = EnergyTable.from_yaml(path)
    assert table.adc_power_uw_offset == 2.0 and table.shift_add_fj == EnergyTable().shift_add_fj


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("adc_fj: 3.0\n", r"unknown key\(s\) \['adc_fj'\].*expected some of \[.*'adc_power_uw_per_bit'"),
        ("shift_add_fj: -1.5\n", r"shift_add_fj=-1\.5 is invalid: expected a number >= 0"),
        ("cell_read_uw: fast\n", r"cell_read_uw='fast' is invalid: expected a finite number >= 0"),
        ("cell_read_uw: .inf\n", r"cell_read_uw=inf is invalid: expected a finite number >= 0"),
        ("ideal_adc_bits: 17\n", r"ideal_adc_bits=17 is invalid: expected an integer in \[1, 16\]"),
        ("columns_per_adc: 0\n", r"columns_per_adc=0 is invalid: expected an integer >= 1"),
        ("- 1\n- 2\n", r"expected a mapping of energy constants, got list"),
        ("adc_ns_per_bit: [1, 2\n", r"is not valid YAML"),
    ],
)
def test_bad_yaml_is_rejected_with_the_key_and_what_is_allowed(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        EnergyTable.from_yaml(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"'.*nope\.yaml' does not exist: expected a YAML file"):
        EnergyTable.from_yaml(tmp_path / "nope.yaml")


@given(
    slope=st.floats(0, 10), offset=st.floats(0, 10), per_bit=st.floats(0, 5), ns0=st.floats(0, 5),
    cell=st.floats(0, 10), bits=st.integers(1, 15),
)
def test_more_adc_bits_never_cost_less_per_event(slope, offset, per_bit, ns0, cell, bits):
    table = EnergyTable(adc_power_uw_per_bit=slope, adc_power_uw_offset=offset, adc_ns_per_bit=per_bit,
                        adc_ns_offset=ns0, cell_read_uw=cell)
    assert table.adc_fj(bits + 1) >= table.adc_fj(bits)
    assert table.cell_read_fj(bits + 1) >= table.cell_read_fj(bits)


def test_cell_read_energy_scales_with_the_device_conductance():
    """P = V^2 G: the default device is the table's own cell (same table); twice the conductances, twice the cell
    read energy; nothing else changes."""
    from cimq_pl.quant import DeviceSpec

    table = EnergyTable()
    assert table.for_device(None) is table and table.for_device(DeviceSpec()) is table
    doubled = table.for_device(DeviceSpec(g_on=2e6 / 6e3, g_off=2e6 / 900e3))
    assert doubled.cell_read_fj(4) == pytest.approx(2 * table.cell_read_fj(4))
    assert doubled.adc_fj(4) == table.adc_fj(4) and doubled.wordline_fj(128) == table.wordline_fj(128)
    high_resistance = table.for_device(DeviceSpec(g_on=10.0, g_off=1.0))  # 100 kOhm / 1 MOhm cells
    assert high_resistance.cell_read_uw == pytest.approx(table.cell_read_uw * 5.5 / REFERENCE_CELL_MEAN_US)
