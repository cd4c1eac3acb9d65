"""Sensitivity of each layer to each candidate setting: what lowering (or raising) that layer alone costs in loss
and saves in energy, measured with `SearchBench.try_layer` (calibration only, no reconstruction).

What a setting costs in loss is the layer's **quantization noise** on that setting (`SearchConfig.metric`):

* ``fisher`` (default): ``1/2 sum_i F_i (y_i - r_i)^2``, the difference between the layer's output on the setting
  and on the setting made exact in the searched quantities (`exact_for`: an ideal ADC for an ADC search; the
  layer's weight and input quantizers as configured), on the float network's input to it, weighted by the
  diagonal empirical Fisher of the float network at that output (`SearchBench.fisher_trial`): the second-order
  estimate of the task loss the setting adds (HAWQ's and BRECQ's weighting). Local: a trial runs that layer alone
  (about a second for a ResNet-20 layer on 256 images on one CPU core), and it is the setting's own noise: an
  ADC's error shrinks with its bits, without the cross-term with the layer's weight and input rounding (which
  does not depend on the ADC and made a total-error measure non-monotone). The objective the search minimises
  is the searched layers' summed noise.
* ``kl`` / ``mse``: measured at the network output, the divergence between the logits with the layer on the
  setting and on its exact reference setting (`exact_for`), every other layer as configured (`SearchBench.try_layer`);
  an assignment's predicted loss is the configured network's loss (against the float network) plus, per
  searched layer, the noise of its setting minus the configured one's. Exact for the network as it is, but
  each trial runs the layers after the changed one, and below 8-bit activations the rounding flips a small change
  triggers downstream put a floor under every divergence (a layer on an 8-bit ADC measures about as noisy as on a
  4-bit one), which blurs the ranking. The floor cancels in a setting's change (its noise minus the configured
  one's) except where the layer is configured exact (an ``int8`` edge layer's ideal ADC in an ADC search): its
  configured noise is 0, with no floor, so its trials are measured against the float network instead, the change
  being the whole network's loss on the setting minus the configured network's (for the ResNet-20 first conv at a
  7-bit ADC, from the ADC-4 PTQ network: a change of -0.02 where the noise against the ideal ADC measured 2.84).

(Measuring each setting's loss against the float network directly, in a network whose other layers are already
noisy, does not add up: each layer is credited with much of the whole network's error, and the sum over
layers overshoots by many times.) Energy and latency add across layers (nearly exactly: a layer's change only
moves the bit density of the layers after it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

from cimq_pl.errors import ConfigError
from cimq_pl.quant.layers import cim_layers
from cimq_pl.quant.overrides import layer_overrides
from cimq_pl.search.bench import SearchBench
from cimq_pl.search.config import setting_label

__all__ = ["SENSITIVITY_COLUMNS", "SensitivityTable", "exact_for", "measure_sensitivity", "searched_layers"]

SENSITIVITY_COLUMNS = ("layer", "setting", "current", "noise", "delta_loss", "delta_energy_uj", "delta_latency_us", "loss",
                       "energy_uj", "latency_us", "seconds", "note")


@dataclass
class SensitivityTable:
    """Loss, energy and latency changes of every (searched layer, candidate setting), against the configured network.

    Attributes:
        layers: searched layer names, in model order.
        settings: candidate settings (dicts of spec fields), in `SearchConfig.settings` order.
        current: per layer, the index of the setting it is configured with (None when that is no candidate).
        loss: ``loss[l][s]``: the noise of layer l on setting s minus its noise as configured (NaN where the setting
            is invalid for the layer, e.g. ``dac_bits`` > its ``input_bits``).
        noise: ``noise[l][s]``: the noise itself (see the module docstring).
        energy_uj: energy change per image, uJ, likewise.
        latency_us: latency change per image, us, likewise.
        seconds: wall time of each trial, s (0 for the configured setting, which needs none).
        notes: why a setting is invalid for a layer ('' otherwise).
        reference_loss: the objective of the configured network: the searched layers' summed noise (``fisher``), or
            its loss against the float network (``kl``, ``mse``).
        reference_energy_uj: its energy per image, uJ.
        reference_latency_us: its latency per image, us.
        metric: ``fisher``, ``kl`` or ``mse``.
        images: images every number was measured on.
        edge: per layer, whether it is mapped as an edge layer (``int8``) as configured: a uniform setting leaves
            such a layer as configured (``model.cim.adc_bits`` does not reach it either), so that "uniform ADC 5"
            means the same network with ``search.layers`` naming ``conv1`` as without; a layer with candidates of
            its own (``search.layer_candidates``) is kept likewise; empty, or when every searched layer is one: none.
        candidates: per layer, the indices of ``settings`` it may take (its own candidates); empty: every one.
    """

    layers: list
    settings: list
    current: list
    loss: list
    noise: list
    energy_uj: list
    latency_us: list
    seconds: list
    notes: list
    reference_loss: float
    reference_energy_uj: float
    reference_latency_us: float
    metric: str
    images: int
    extra: dict = field(default_factory=dict)
    edge: list = field(default_factory=list)
    candidates: list = field(default_factory=list)

    def valid(self, layer: int, setting: int) -> bool:
        """Whether ``setting`` could be tried on ``layer``."""
        return math.isfinite(self.loss[layer][setting])

    def predict(self, choice: Sequence[Optional[int]]) -> tuple[float, float, float]:
        """Predicted (energy uJ, loss, latency us) per image of the assignment ``choice`` (a setting index per layer;
        None: the layer as configured)."""
        chosen = [(l, s) for l, s in enumerate(choice) if s is not None]
        energy = self.reference_energy_uj + sum(self.energy_uj[l][s] for l, s in chosen)
        loss = self.reference_loss + sum(self.loss[l][s] for l, s in chosen)
        latency = self.reference_latency_us + sum(self.latency_us[l][s] for l, s in chosen)
        return energy, loss, latency

    def is_edge(self, layer: int) -> bool:
        """Whether a uniform setting leaves ``layer`` as configured (an ``int8`` edge layer)."""
        return bool(self.edge) and self.edge[layer]

    def uniform(self, setting: int) -> Optional[tuple]:
        """The assignment putting every searched layer but the edge ones (`is_edge`, left as configured: None) on
        ``setting`` (None when it is invalid for one of them)."""
        layers = range(len(self.layers))
        if not all(self.valid(layer, setting) for layer in layers if not self.is_edge(layer)):
            return None
        return tuple(None if self.is_edge(layer) else setting for layer in layers)

    def assignment(self, choice: Sequence[Optional[int]]) -> dict:
        """``{layer: setting dict}`` of ``choice`` (layers left as configured, None, are not in it)."""
        return {name: dict(self.settings[s]) for name, s in zip(self.layers, choice) if s is not None}

    def rows(self) -> list[dict]:
        """One row per (layer, setting) with `SENSITIVITY_COLUMNS`."""
        rows = []
        for l, name in enumerate(self.layers):
            for s, setting in enumerate(self.settings):
                if self.candidates and s not in self.candidates[l]:
                    continue
                valid = self.valid(l, s)
                rows.append({
                    "layer": name, "setting": setting_label(setting), "current": s == self.current[l],
                    "noise": self.noise[l][s] if valid else None,
                    "delta_loss": self.loss[l][s] if valid else None,
                    "delta_energy_uj": self.energy_uj[l][s] if valid else None,
                    "delta_latency_us": self.latency_us[l][s] if valid else None,
                    "loss": self.reference_loss + self.loss[l][s] if valid else None,
                    "energy_uj": self.reference_energy_uj + self.energy_uj[l][s] if valid else None,
                    "latency_us": self.reference_latency_us + self.latency_us[l][s] if valid else None,
                    "seconds": round(self.seconds[l][s], 3), "note": self.notes[l][s],
                })
        return rows


def exact_for(spec, settings: Sequence[dict]):
    """``spec`` with the quantities the candidate ``settings`` change made exact: the reference their noise is
    measured against (``fisher``). An ADC, cell or DAC change is measured against an ideal ADC (cells and DAC
    matter only through it), an input change against float inputs, a weight change against float weights; the
    layer's other quantizers stay as configured."""
    fields = {field for setting in settings for field in setting}
    exact = {}
    if fields & {"adc_bits", "cell_bits", "dac_bits"}:
        exact["adc_bits"] = None
    if "input_bits" in fields:
        exact["input_bits"] = None
    if fields & {"weight_bits"}:
        exact.update(weight_bits=None, cell_bits=None)
    return spec.replace(**exact)


def mapped_int8(layer) -> bool:
    """Whether a CIM layer is mapped in ``int8`` mode (an edge layer): its spec is the one `CIMSpec.int8` gives."""
    return layer.spec == layer.spec.int8()


def searched_layers(model, patterns: Optional[Sequence[str]] = None) -> list[str]:
    """Names of the CIM layers of ``model`` a search changes: those ``patterns`` (names or globs) match, or by
    default every layer mapped in ``cim`` mode (layers an ``int8`` first/last-layer mode or override put on
    8 bits keep it).

    Raises:
        ConfigError: a pattern matching no CIM layer (the message lists them), or no layer to search.
    """
    layers = cim_layers(model)
    names = [name for name, _ in layers]
    if patterns is None:
        chosen = [name for name, layer in layers if not mapped_int8(layer)]
    else:
        try:
            chosen = list(layer_overrides(names, {pattern: {"adc_bits": None} for pattern in patterns}))
        except ConfigError as error:
            raise ConfigError(str(error).replace("model.cim_overrides", "search.layers", 1)) from None
    if not chosen:
        raise ConfigError("search: no CIM layer to search (every layer is int8 or digital): list some in search.layers")
    return chosen


def measure_sensitivity(bench: SearchBench, layers: Sequence[str], settings: Sequence[dict],
                        progress: Optional[Callable[[str], None]] = None,
                        own_settings: Optional[Mapping[str, Sequence[dict]]] = None) -> SensitivityTable:
    """Try every candidate setting on every layer of ``layers`` alone (`SearchBench.try_layer`).

    Args:
        bench: the calibrated network on the search images.
        layers: names of the layers to search.
        settings: candidate settings (dicts of `CIMSpec` bit fields) of every layer without its own.
        progress: called with a short description after every trial (a progress bar's update).
        own_settings: layers with candidate settings of their own (``search.layer_candidates``), tried on those
            only and kept as configured by the uniform settings, as an ``int8`` edge layer is. The table's
            settings are ``settings`` followed by the others these add.

    Returns:
        The `SensitivityTable`.
    """
    own_settings = dict(own_settings or {})
    columns = [dict(setting) for setting in settings]
    columns += [dict(setting) for own in own_settings.values() for setting in own if setting not in columns]
    reference = bench.reference
    local = bench.metric == "fisher"
    table = SensitivityTable(
        layers=list(layers), settings=columns, current=[], loss=[], noise=[], energy_uj=[],
        latency_us=[],
        seconds=[], notes=[], reference_loss=0.0 if local else reference.loss, reference_energy_uj=reference.energy_uj,
        reference_latency_us=reference.latency_us, metric=bench.metric, images=bench.images,
    )
    own = [list(own_settings.get(name, settings)) for name in layers]
    table.candidates = [{columns.index(setting) for setting in chosen} for chosen in own] if own_settings else []
    for name, candidates in zip(layers, own):
        layer = bench.model.get_submodule(name)
        if local:
            reference = bench.layer_outputs(name, exact_for(layer.spec, candidates))
            configured = bench.fisher_trial(name, reference=reference)
            configured_noise, base_energy, base_latency = configured.loss, configured.energy_uj, configured.latency_us
        else:
            base_energy, base_latency = bench.layer_energy(name)
            exact_spec = exact_for(layer.spec, candidates)
            # a layer configured exact (the int8 first conv's ideal ADC) has no downstream floor of its own: its
            # trials are measured against the float network, as the configured network's loss is
            exact = bench.teacher if exact_spec == layer.spec else bench.try_layer(name, exact_spec).logits
            configured_noise = bench.layer_noise(exact)
        current = None
        rows = {key: [] for key in ("loss", "noise", "energy_uj", "latency_us", "seconds", "notes")}
        for index, setting in enumerate(columns):
            tried = setting in candidates
            if not tried:
                values = (math.nan, math.nan, math.nan, math.nan, 0.0, "not among this layer's candidates")
            elif all(getattr(layer.spec, field) == value for field, value in setting.items()):
                current = index
                values = (0.0, configured_noise, 0.0, 0.0, 0.0, "")
            else:
                try:
                    spec = layer.spec.replace(**setting)
                except ConfigError as error:
                    values = (math.nan, math.nan, math.nan, math.nan, 0.0, str(error))
                else:
                    trial = bench.fisher_trial(name, spec, reference) if local else bench.try_layer(name, spec)
                    noise = trial.loss if local else bench.layer_noise(exact, trial.logits)
                    values = (noise - configured_noise, noise, trial.energy_uj - base_energy,
                              trial.latency_us - base_latency, trial.seconds, "")
            for key, value in zip(rows, values):
                rows[key].append(value)
            if progress is not None and tried:
                progress(f"{name} {setting_label(setting)}")
        if local:  # the objective is the searched layers' summed noise, the configured one's to start from
            table.reference_loss += configured_noise
        table.current.append(current)
        table.edge.append(mapped_int8(layer) or name in own_settings)
        for key, values in rows.items():
            getattr(table, key).append(values)
    if all(table.edge):  # only edge layers searched: a uniform setting is theirs
        table.edge = [False] * len(table.layers)
    return table
