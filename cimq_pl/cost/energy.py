"""`EnergyTable`: the per-event energies (fJ) and timings (ns) of the hardware cost model (SPEC section 5).

Every default below is taken from, or derived with stated assumptions from, DNN+NeuroSim V1.3 (Peng et al.,
"DNN+NeuroSim: An End-to-End Benchmarking Framework for Compute-in-Memory Accelerators with Versatile Device
Technologies", IEDM 2019; source files ``SarADC.cpp``, ``SubArray.cpp``, ``Param.cpp``, ``Technology.cpp``,
``constant.h``) at its default design point: 22 nm PTM low-power transistors (V_dd = 0.85 V), 1 GHz clock,
1T1R RRAM cells (R_on = 6 kOhm, R_off = 900 kOhm, access transistor sized to R_on x 0.25), a SAR ADC per
read column. Digital operations are Horowitz's 45 nm figures ("Computing's energy problem", ISSCC 2014)
scaled to 22 nm by C x V^2: (22 / 45) x (0.85 / 0.9)^2 = 0.436.

| event | default | derivation |
|---|---|---|
| ADC conversion of b bits | (0.538 b + 4.3753) uW x (b + 1) ns: 32.6 fJ at 4 bits, 42.4 fJ at 5, 78.1 fJ at 8 | NeuroSim ``SarADC::GetColumnPower``, 22 nm LP, bias term; latency ``SarADC::CalculateLatency`` |
| cell read (per active cell, per conversion) | 4.86 uW x (b + 1) ns: 24.3 fJ at 4 bits, 43.7 fJ at 8 | the column-current term of the same fit, 0.072341 / R_col W, with R_col the parallel of the active cells; one cell at the mean of the on and off conductances, 1/2 (1/7.5k + 1/901.5k) S. NeuroSim books it inside its ADC energy; we report it apart |
| wordline activation | 1.4 fJ + 0.28 fJ x cols | ``SubArray`` 1T1R parallel read: C_row x V_dd^2 per selected row, C_row = 0.2 fF/um wire over 12 F = 0.264 um per cell plus the gate of an 11.5 F access transistor, (5.245 + 8.004) x 1e-10 F/m x 0.253 um = 0.335 fF: 0.388 fF x 0.85^2 = 0.28 fJ per cell; driver (switch-matrix flip-flop and transmission gate) ~2 x 1 fF x 0.85^2 = 1.4 fJ (assumption) |
| shift-add | 23 fJ per op | a 16-bit add: Horowitz 8-bit 0.03 pJ, 32-bit 0.1 pJ, interpolated 0.053 pJ, x 0.436 |
| scale multiply | 87 fJ per op | an 8-bit x 8-bit multiply: Horowitz 0.2 pJ x 0.436 |

Not modelled (identical between a configuration and its baseline at the same bit-widths, or outside the
macro): buffers, interconnect, pooling and activation units, leakage, weight programming.

**Real devices** (`cimq_pl.quant.DeviceSpec`, ``model.device``). Of these energies only the cell read depends
on the device's conductances: at the same read voltage a cell draws P = V^2 G, so `EnergyTable.for_device`
scales ``cell_read_uw`` by the device's mean conductance (g_on + g_off) / 2 over that of the cell the table is
derived for (NeuroSim's 6 kOhm / 900 kOhm, `REFERENCE_CELL_MEAN_US`; the access transistor's series resistance
is not rescaled). The default `DeviceSpec` is that cell, so its factor is exactly 1. Not modelled: the ADC
resolution or averaging that ADC noise and offsets may call for (the ADC energy depends on its bits only),
the one digital multiply per layer output of drift compensation, refresh or re-programming against drift,
and the extra column of a differential pair (a signed slice is costed as one column, as before).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from cimq_pl.errors import ConfigError

__all__ = ["DEFAULT_ENERGY_TABLE_PATH", "EnergyTable", "REFERENCE_CELL_MEAN_US"]

#: The YAML copy of the defaults shipped with the repository (``configs/energy/neurosim_22nm.yaml``).
DEFAULT_ENERGY_TABLE_PATH = Path(__file__).resolve().parents[2] / "configs" / "energy" / "neurosim_22nm.yaml"

_MAX_BITS = 16

#: Mean conductance (uS) of the cell ``cell_read_uw`` is derived for: NeuroSim's 1 / 6 kOhm and 1 / 900 kOhm.
REFERENCE_CELL_MEAN_US = (1e6 / 6e3 + 1e6 / 900e3) / 2


@dataclass(frozen=True)
class EnergyTable:
    """Per-event energies and timings of a CIM macro (defaults: DNN+NeuroSim, 22 nm, see the module docstring).

    Attributes:
        name: label of the table (printed in reports).
        adc_power_uw_per_bit: SAR ADC power slope, uW per output bit.
        adc_power_uw_offset: SAR ADC power at 0 bits, uW.
        adc_ns_per_bit: SAR conversion time per output bit, ns (one comparator cycle at 1 GHz).
        adc_ns_offset: SAR conversion time at 0 bits (sampling), ns.
        ideal_adc_bits: resolution charged for layers with an ideal ADC (``adc_bits=None``), bits. An ideal ADC
            is a simulation device; the hardware still converts, so it is charged as this many bits (8, the
            conventional baseline's ADC) and the layer is flagged ``ideal_adc``.
        cell_read_uw: power drawn by one active cell (on a wordline driven with a 1 bit, in a column that is
            converted) while its column is converted, uW; the read lasts the ADC conversion time.
        wordline_fj_per_cell: energy to raise one wordline of one array, per cell (column) it crosses, fJ.
        input_driver_fj: energy of the wordline driver per activation, fJ.
        shift_add_fj: energy of one shift-add of an ADC output (or a row-block result) into an accumulator, fJ.
        scale_multiply_fj: energy of one digital multiply by a scale factor, fJ.
        columns_per_adc: columns sharing one ADC (time-multiplexed); only the latency depends on it.

    Raises:
        ConfigError: when a value is negative, not finite, of the wrong type, or out of range; the message
            names the field, the value and what is allowed.
    """

    name: str = "neurosim_22nm"
    adc_power_uw_per_bit: float = 0.538
    adc_power_uw_offset: float = 4.3753
    adc_ns_per_bit: float = 1.0
    adc_ns_offset: float = 1.0
    ideal_adc_bits: int = 8
    cell_read_uw: float = 4.86
    wordline_fj_per_cell: float = 0.28
    input_driver_fj: float = 1.4
    shift_add_fj: float = 23.0
    scale_multiply_fj: float = 87.0
    columns_per_adc: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"EnergyTable.name={self.name!r} is invalid: expected a non-empty string")
        for item in fields(self):
            if item.name == "name":
                continue
            value = getattr(self, item.name)
            if item.type in (int, "int"):
                low = 1
                high = _MAX_BITS if item.name == "ideal_adc_bits" else None
                if isinstance(value, bool) or not isinstance(value, int) or value < low or (high and value > high):
                    allowed = f"an integer in [{low}, {high}]" if high else f"an integer >= {low}"
                    raise ConfigError(f"EnergyTable.{item.name}={value!r} is invalid: expected {allowed}")
            else:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise ConfigError(f"EnergyTable.{item.name}={value!r} is invalid: expected a finite number >= 0")
                if value < 0:
                    raise ConfigError(f"EnergyTable.{item.name}={value!r} is invalid: expected a number >= 0")
                object.__setattr__(self, item.name, float(value))

    # ------------------------------------------------------------------ per-event energies
    def charged_adc_bits(self, adc_bits: Optional[int]) -> int:
        """ADC resolution charged for a layer: ``adc_bits``, or ``ideal_adc_bits`` for an ideal ADC (None)."""
        return self.ideal_adc_bits if adc_bits is None else int(adc_bits)

    def adc_time_ns(self, adc_bits: Optional[int]) -> float:
        """Duration of one conversion, ns: ``adc_ns_per_bit * b + adc_ns_offset`` ((b + 1) ns by default)."""
        bits = self.charged_adc_bits(adc_bits)
        return self.adc_ns_per_bit * bits + self.adc_ns_offset

    def adc_fj(self, adc_bits: Optional[int]) -> float:
        """Energy of one ADC conversion, fJ: (slope x b + offset) uW x conversion time ns (uW x ns = fJ)."""
        bits = self.charged_adc_bits(adc_bits)
        return (self.adc_power_uw_per_bit * bits + self.adc_power_uw_offset) * self.adc_time_ns(adc_bits)

    def cell_read_fj(self, adc_bits: Optional[int]) -> float:
        """Energy of one active cell read, fJ: ``cell_read_uw`` x the conversion time of its column."""
        return self.cell_read_uw * self.adc_time_ns(adc_bits)

    def wordline_fj(self, cols: int) -> float:
        """Energy of one wordline activation of an array ``cols`` cells wide, fJ."""
        return self.input_driver_fj + self.wordline_fj_per_cell * cols

    def for_device(self, device) -> "EnergyTable":
        """This table for the cells of ``device`` (a `cimq_pl.quant.DeviceSpec`, or None): ``cell_read_uw`` times
        the device's mean conductance (g_on + g_off) / 2 over `REFERENCE_CELL_MEAN_US` (P = V^2 G at the same
        read voltage). The table itself when ``device`` is None or has the reference conductances."""
        if device is None:
            return self
        factor = (device.g_on + device.g_off) / 2 / REFERENCE_CELL_MEAN_US
        if factor == 1.0:
            return self
        return dataclasses.replace(self, cell_read_uw=self.cell_read_uw * factor,
                                   name=f"{self.name} (cells {device.g_off:.3g}..{device.g_on:.4g} uS)")

    # ------------------------------------------------------------------ (de)serialisation
    def as_dict(self) -> dict:
        """Fields as a plain dict (YAML-ready)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "energy table") -> "EnergyTable":
        """Build a table from a mapping; missing keys keep their defaults.

        Args:
            values: field name -> value.
            source: where the values come from, for error messages (e.g. a file path).

        Raises:
            ConfigError: on an unknown key (the message lists the allowed keys) or a bad value.
        """
        if not isinstance(values, Mapping):
            raise ConfigError(f"{source}: expected a mapping of energy constants, got {type(values).__name__}")
        allowed = [item.name for item in fields(cls)]
        unknown = sorted(str(key) for key in values if key not in allowed)
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {unknown}: expected some of {allowed}")
        try:
            return cls(**dict(values))
        except ConfigError as error:
            raise ConfigError(f"{source}: {error}") from None

    @classmethod
    def from_yaml(cls, path: Union[str, os.PathLike]) -> "EnergyTable":
        """Read a table from a YAML file holding a flat mapping ``field: value`` (comments allowed).

        Raises:
            ConfigError: when the file is missing or not YAML, or on an unknown key or a bad value.
        """
        import yaml

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"energy table {str(path)!r} does not exist: expected a YAML file")
        try:
            values = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            raise ConfigError(f"energy table {str(path)!r} is not valid YAML: {error}".splitlines()[0]) from None
        return cls.from_dict(values or {}, source=f"energy table {str(path)!r}")

    def to_yaml(self, path: Union[str, os.PathLike]) -> None:
        """Write the table as a flat YAML mapping (the format `from_yaml` reads)."""
        import yaml

        Path(path).write_text(yaml.safe_dump(self.as_dict(), sort_keys=False))

    def describe(self) -> str:
        """One line: the table name and the charged energies at 4 and 8 ADC bits."""
        return (
            f"{self.name}: ADC {self.adc_fj(4):.1f}/{self.adc_fj(8):.1f} fJ (4/8 b), "
            f"cell read {self.cell_read_fj(4):.1f}/{self.cell_read_fj(8):.1f} fJ, "
            f"wordline {self.input_driver_fj:g} + {self.wordline_fj_per_cell:g} x cols fJ, "
            f"shift-add {self.shift_add_fj:g} fJ, scale {self.scale_multiply_fj:g} fJ"
        )
