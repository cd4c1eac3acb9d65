"""`DeviceSpec`: the non-idealities of the memory cells and ADCs of a real CIM macro, beside `CIMSpec`.

`CIMSpec` says what the macro computes with ideal integers; `DeviceSpec` says how far a fabricated chip is
from that: each cell holds a conductance (finite on/off ratio, programming error, stuck-at faults, drift,
read noise) and each ADC adds noise, an offset and a gain error. `device_model.py` applies it inside the CIM
layers. Every non-ideality is 0 (off) by default, and then a layer computes exactly what it computes without a
device (bit for bit, tested).

Defaults and typical values, with their sources:

* **Conductances** (``g_on``, ``g_off``): DNN+NeuroSim V1.3's default 1T1R RRAM cell, R_on = 6 kOhm and
  R_off = 900 kOhm (on/off ratio 150; Peng et al., IEDM 2019, ``Param.cpp``), the same cell the energy table
  (`cimq_pl.cost.EnergyTable`) is derived from, so energy and noise describe one device. DNN+NeuroSim's own
  inference simulator assumes an on/off ratio of 10 (``--onoffratio``); IBM aihwkit's PCM model maps weights
  onto 0..25 uS (``g_max``).
* **Programming variation** (``programming_sigma``): DNN+NeuroSim's ``--vari`` is this relative standard
  deviation (its example: 0.1). In aihwkit's PCM model (``PCMLikeNoiseModel``, Nandakumar et al., ICECS
  2019) the programming error is about 1 uS at g_max = 25 uS, i.e. about 4% of the largest conductance.
* **Stuck-at faults** (``stuck_off_prob``, ``stuck_on_prob``): reported fractions of faulty cells in RRAM test
  chips range from well under 1% to about 10% (e.g. Xia et al., "Fault-tolerant training with on-line fault
  detection for RRAM-based neural computing systems", DAC 2017).
* **Drift** (``drift_nu_mean``, ``drift_nu_std``, ``t0``): aihwkit's PCM model, G(t) = G(t0) ((t0 + t)/t0)^-nu
  with t0 = 20 s and nu per device from a fit to measured PCM: nu = 0.049 +- 0.008 at g_max and
  0.060 +- 0.023 at 0.1 g_max. RRAM drifts much less. ``read_time`` is aihwkit's ``t_inference``: seconds
  since programming.
* **Global drift compensation** (``drift_compensation``): aihwkit's ``GlobalDriftCompensation``, one digital
  gain per layer from a read of every cell.
* **ADC** (``adc_noise_lsb``, ``adc_offset_lsb``, ``adc_gain_sigma``): input-referred noise per conversion,
  and an offset and gain error per ADC, drawn once per chip; in LSB of the ADC reading the column (and a
  fraction for the gain). No published default: SAR ADC designs quote about 0.5 LSB of noise and offsets of a
  few LSB before calibration.

Field types are plain so jsonargparse builds a spec from YAML or from the command line
(``--model.device.programming_sigma 0.05``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

from cimq_pl.errors import ConfigError

__all__ = ["DeviceSpec", "PROGRAMMING_DISTRIBUTIONS"]

ProgrammingDistribution = Literal["normal", "lognormal"]
PROGRAMMING_DISTRIBUTIONS = ("normal", "lognormal")

_NEUROSIM_G_ON_US = 1e6 / 6e3  # 1 / 6 kOhm in uS
_NEUROSIM_G_OFF_US = 1e6 / 900e3  # 1 / 900 kOhm in uS


@dataclass(frozen=True)
class DeviceSpec:
    """The cells and ADCs of a fabricated chip (units in brackets; every non-ideality 0 = off by default).

    Cell model (`device_model.py`). A cell of ``cell_bits`` b_c holding digit d in [0, L], L = 2^b_c - 1, is
    programmed to ``G = g_off + d * dG`` with ``dG = (g_on - g_off) / L``, so a zero digit still conducts
    ``g_off``. A signed weight digit (the top slice of two's-complement slicing) is a differential pair of two
    such cells holding its positive and negative parts. Each cell is programmed with a relative error, may be
    stuck at ``g_off`` or ``g_on``, and drifts; the array adds the currents of the driven cells of a column.

    Attributes:
        g_on: conductance of the highest level, a cell's ON state [uS]. Default 166.67 uS (1 / 6 kOhm).
        g_off: conductance of the lowest level, a cell's OFF state [uS]; 0 <= g_off < g_on. Default
            1.111 uS (1 / 900 kOhm): on/off ratio 150.
        programming_sigma: relative standard deviation of a cell's programmed conductance [fraction of its
            target]; drawn once per cell per chip.
        programming_distribution: ``"normal"``: G = G_target (1 + sigma z), clipped at 0; ``"lognormal"``:
            G = G_target exp(sigma z - sigma^2 / 2) (same mean), z ~ N(0, 1).
        stuck_off_prob: probability that a cell is stuck at ``g_off`` whatever it is programmed to [0..1].
        stuck_on_prob: probability that a cell is stuck at ``g_on`` [0..1]; stuck_off_prob + stuck_on_prob <= 1.
        stuck_compensation: program around the chip's stuck cells: the fault map is read after programming
            (write-verify finds every cell that does not reach its level) and the partner of a pair cell stuck
            at ``g_on`` is programmed to absorb it, so the pair still reads its digit d, or 0 when d has the
            other sign: an error of 0 or |d| instead of L - d or L (L = 2^b_c - 1). Differential pairs only
            (unsigned slices have no partner); a cell stuck at ``g_off`` needs nothing. Off by default.
        read_sigma: relative standard deviation of a cell's conductance at each read (each ADC conversion)
            [fraction]; the column's noise is then Gaussian with variance sum_i a_i^2 (read_sigma G_i)^2.
        drift_nu_mean: mean drift exponent nu [dimensionless]; G(t) = G(t0) ((t0 + t)/t0)^-nu.
        drift_nu_std: standard deviation of nu across cells [dimensionless]; nu = max(0, N(mean, std)).
        t0: time of the first read after programming, where drift starts [s] (aihwkit: 20 s).
        read_time: time since programming at which the chip is read [s]; 0 = no drift. Monte Carlo evaluation
            (`cimq_pl.callbacks.MonteCarloDevices`) evaluates a list of such times.
        drift_compensation: one digital gain per layer, read_out(0) / read_out(t), where read_out is the mean
            absolute column reading of every cell driven alone (aihwkit's global drift compensation).
        adc_noise_lsb: standard deviation of the ADC's input-referred noise, drawn per conversion [LSB].
        adc_offset_lsb: standard deviation of each ADC's offset, drawn once per chip [LSB].
        adc_gain_sigma: standard deviation of each ADC's relative gain error, drawn once per chip [fraction].
        seed: the chip: cells and ADCs drawn from the same seed are the same chip (Monte Carlo sample i uses
            seed + i).

    Raises:
        ConfigError (a ValueError): when a field is out of range; the message names the field, the bad value
            and what is allowed.
    """

    g_on: float = _NEUROSIM_G_ON_US
    g_off: float = _NEUROSIM_G_OFF_US
    programming_sigma: float = 0.0
    programming_distribution: ProgrammingDistribution = "normal"
    stuck_off_prob: float = 0.0
    stuck_on_prob: float = 0.0
    stuck_compensation: bool = False
    read_sigma: float = 0.0
    drift_nu_mean: float = 0.0
    drift_nu_std: float = 0.0
    t0: float = 20.0
    read_time: float = 0.0
    drift_compensation: bool = False
    adc_noise_lsb: float = 0.0
    adc_offset_lsb: float = 0.0
    adc_gain_sigma: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if item.name == "programming_distribution":
                if value not in PROGRAMMING_DISTRIBUTIONS:
                    _refuse(item.name, value, f"one of {list(PROGRAMMING_DISTRIBUTIONS)}")
            elif item.name in ("drift_compensation", "stuck_compensation"):
                if not isinstance(value, bool):
                    _refuse(item.name, value, "true or false")
            elif item.name == "seed":
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    _refuse(item.name, value, "an integer >= 0")
            else:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    _refuse(item.name, value, "a finite number")
                object.__setattr__(self, item.name, float(value))
        for name in ("g_off", "programming_sigma", "read_sigma", "drift_nu_mean", "drift_nu_std", "read_time",
                     "adc_noise_lsb", "adc_offset_lsb", "adc_gain_sigma"):
            if getattr(self, name) < 0:
                _refuse(name, getattr(self, name), "a number >= 0")
        if not self.g_on > self.g_off:
            _refuse("g_on", self.g_on, f"a conductance in uS above g_off={self.g_off!r}")
        if not self.t0 > 0:
            _refuse("t0", self.t0, "a time in seconds > 0")
        for name in ("stuck_off_prob", "stuck_on_prob"):
            if not 0 <= getattr(self, name) <= 1:
                _refuse(name, getattr(self, name), "a probability in [0, 1]")
        if self.stuck_off_prob + self.stuck_on_prob > 1:
            _refuse("stuck_on_prob", self.stuck_on_prob,
                    f"a probability <= 1 - stuck_off_prob = {1 - self.stuck_off_prob!r}")
        if self.adc_gain_sigma >= 1:
            _refuse("adc_gain_sigma", self.adc_gain_sigma, "a fraction in [0, 1)")

    # ------------------------------------------------------------------ derived quantities
    @property
    def on_off_ratio(self) -> float:
        """g_on / g_off (inf for g_off = 0)."""
        return self.g_on / self.g_off if self.g_off > 0 else math.inf

    def off_levels(self, cell_bits: int) -> float:
        """g_off in units of one level step dG = (g_on - g_off) / (2^b_c - 1): what a zero digit conducts."""
        return self.g_off * (2**cell_bits - 1) / (self.g_on - self.g_off)

    def drift_factor(self, nu: float, time: float) -> float:
        """((t0 + t) / t0)^-nu: the conductance a cell of drift exponent ``nu`` keeps at ``time`` s."""
        return ((self.t0 + time) / self.t0) ** (-nu)

    @property
    def stuck(self) -> bool:
        """Whether some cells are stuck at g_off or g_on."""
        return self.stuck_off_prob > 0 or self.stuck_on_prob > 0

    @property
    def drifts(self) -> bool:
        """Whether conductances drift (nu is not 0 everywhere)."""
        return self.drift_nu_mean > 0 or self.drift_nu_std > 0

    def cells_at(self, time: float) -> bool:
        """Whether the cells differ from ideal digits when read at ``time`` s."""
        return self.programming_sigma > 0 or self.stuck or (self.drifts and time > 0)

    @property
    def read_noise(self) -> bool:
        """Whether each read adds cell noise."""
        return self.read_sigma > 0

    @property
    def adc_errors(self) -> bool:
        """Whether the ADCs add noise, an offset or a gain error."""
        return self.adc_noise_lsb > 0 or self.adc_offset_lsb > 0 or self.adc_gain_sigma > 0

    def is_ideal_at(self, time: float) -> bool:
        """Whether nothing differs from the ideal macro at ``time`` s (then the layers skip the device)."""
        return not (self.cells_at(time) or self.read_noise or self.adc_errors)

    def replace(self, **changes) -> "DeviceSpec":
        """A validated copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        """Fields as plain values (YAML/JSON-ready)."""
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """One line: the non-idealities that are on."""
        parts = [f"G {self.g_off:.3g}..{self.g_on:.4g} uS (on/off {self.on_off_ratio:.3g})"]
        if self.programming_sigma:
            parts.append(f"programming {self.programming_distribution} sigma {self.programming_sigma:g}")
        if self.stuck:
            parts.append(f"stuck-at off/on {self.stuck_off_prob:g}/{self.stuck_on_prob:g}"
                         + (" compensated" if self.stuck_compensation else ""))
        if self.read_sigma:
            parts.append(f"read sigma {self.read_sigma:g}")
        if self.drifts:
            parts.append(f"drift nu {self.drift_nu_mean:g}+-{self.drift_nu_std:g} at t={self.read_time:g} s"
                         + (" compensated" if self.drift_compensation else ""))
        if self.adc_errors:
            parts.append(f"ADC noise/offset {self.adc_noise_lsb:g}/{self.adc_offset_lsb:g} LSB, gain "
                         f"{self.adc_gain_sigma:g}")
        return ", ".join(parts) + f", seed {self.seed}"


def _refuse(name: str, value, allowed: str) -> None:
    raise ConfigError(f"DeviceSpec.{name}={value!r} is invalid: expected {allowed}")
