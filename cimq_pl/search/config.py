"""`SearchConfig`: what ``python -m cimq_pl search`` searches, under which budget, measured how.

A plain dataclass (jsonargparse builds it from a ``search:`` YAML section or ``--search.<field>`` flags),
validated when built: every bad value is one `ConfigError` line naming the field, the value and what is allowed.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Literal, Optional, Sequence, Union

from cimq_pl.errors import ConfigError
from cimq_pl.quant.overrides import OVERRIDE_BIT_FIELDS, fields_by_glob
from cimq_pl.quant.spec import MAX_BITS, MIN_BITS

__all__ = ["METRICS", "SearchConfig", "parse_setting", "setting_label"]

#: How the loss a setting adds is measured (`cimq_pl.search.sensitivity`).
METRICS = ("fisher", "kl", "mse")


def _default_candidates() -> dict:
    return {"adc_bits": [3, 4, 5, 6]}


def combinations(candidates: dict) -> list[dict]:
    """The settings of a candidates mapping: ``{"adc_bits": [3, 4], "input_bits": [4, 8]}`` -> four dicts, in order."""
    names = list(candidates)
    return [dict(zip(names, values)) for values in itertools.product(*candidates.values())]


def _checked_candidates(candidates, where: str) -> dict:
    """``candidates`` (a mapping of `OVERRIDE_BIT_FIELDS` to lists of distinct bit-widths or null) as plain lists.

    Raises:
        ConfigError: a value that is not such a mapping, an unknown field or bits out of range (``where`` names the
            option).
    """
    if not isinstance(candidates, dict) or not candidates:
        raise ConfigError(f"{where}={candidates!r} is invalid: expected a mapping of fields to lists of values, e.g. "
                          "{adc_bits: [3, 4, 5, 6]}")
    checked = {}
    for name, values in candidates.items():
        if name not in OVERRIDE_BIT_FIELDS:
            raise ConfigError(f"{where}: unknown field {name!r}; allowed: {', '.join(OVERRIDE_BIT_FIELDS)}")
        values = list(values) if isinstance(values, (list, tuple)) else [values]
        for value in values:
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not MIN_BITS <= value <= MAX_BITS):
                raise ConfigError(f"{where}.{name}: {value!r} is invalid: expected integers in [{MIN_BITS}, {MAX_BITS}] "
                                  "or null")
        if not values or len(set(values)) != len(values):
            raise ConfigError(f"{where}.{name}={values!r} is invalid: expected distinct values, at least one")
        checked[name] = values
    return checked


def setting_label(setting: dict) -> str:
    """``{"adc_bits": 4}`` -> ``"adc_bits=4"`` (fields joined with commas; None written as ``null``)."""
    return ",".join(f"{name}={'null' if value is None else value}" for name, value in setting.items())


def split_fraction(text: str, where: str) -> tuple[float, str]:
    """``"0.8*adc_bits=5"`` -> ``(0.8, "adc_bits=5")``; a plain setting -> ``(1.0, text)``: a budget given as a
    fraction of a uniform setting's (e.g. 20% less energy than uniform ADC 5).

    Raises:
        ConfigError: a fraction that is not a number > 0.
    """
    head, star, rest = text.partition("*")
    if not star:
        return 1.0, text
    try:
        fraction = float(head)
    except ValueError:
        fraction = float("nan")
    if not fraction > 0:
        raise ConfigError(f"{where}={text!r} is invalid: the factor before '*' must be a number > 0, as in "
                          f"'0.8*adc_bits=5' (80% of uniform ADC 5's)")
    return fraction, rest.strip()


def parse_setting(text: str, where: str) -> dict:
    """``"adc_bits=4"`` or ``"adc_bits=4,input_bits=8"`` -> ``{"adc_bits": 4, ...}`` (``null``/``none`` = None).

    Raises:
        ConfigError: a malformed string or a field that is not a bit-width of `OVERRIDE_BIT_FIELDS`.
    """
    setting = {}
    for part in text.split(","):
        name, equals, value = (piece.strip() for piece in part.partition("="))
        if not equals or name not in OVERRIDE_BIT_FIELDS:
            raise ConfigError(f"{where}={text!r} is invalid: expected a number, or a uniform setting of the candidates "
                              f"such as 'adc_bits=4' (fields among {', '.join(OVERRIDE_BIT_FIELDS)})")
        if value.lower() in ("null", "none"):
            setting[name] = None
        elif value.lstrip("-").isdigit():
            setting[name] = int(value)
        else:
            raise ConfigError(f"{where}={text!r} is invalid: {name} takes an integer or null, got {value!r}")
    return setting


@dataclass
class SearchConfig:
    """A per-layer precision search (``python -m cimq_pl search``).

    Attributes:
        candidates: the settings each searched layer may take, as lists per field; a layer's candidates are
            their combinations (``{"adc_bits": [3, 4, 5, 6]}``: four; ``{"adc_bits": [3, 4], "input_bits": [4, 8]}``:
            four). Fields among ``weight_bits``, ``cell_bits``, ``input_bits``, ``dac_bits``, ``adc_bits``
            (``null`` = float / ideal ADC).
        layers: module names or globs of the layers to search (None: every layer the macro maps in ``cim`` mode;
            layers left ``int8``/``digital`` by ``first_layer``/``last_layer`` keep their mapping). An ``int8`` edge
            layer named here (``[conv1, 'layer*']``: the first conv's ideal ADC, charged as 8 bits, may take a real
            one) may also stay as configured, and uniform settings (budgets, verified points) leave it so, as
            ``model.cim.adc_bits`` does; searched alone, a uniform setting is its own.
        layer_candidates: candidates of their own for some searched layers: layer names or globs (of
            ``layers``; a later pattern wins) mapped to candidates as above, e.g. ``{conv1: {input_bits: [6, 7, 8],
            adc_bits: [6, 7, null]}}`` (the first conv's 8-bit inputs and ideal ADC searched without giving every
            other layer those candidates). Such a layer takes one of its own settings or stays as configured, and
            uniform settings of ``candidates`` (budgets, verified points) leave it as configured, as they do an
            ``int8`` edge layer. None: every searched layer takes ``candidates``.
        energy_budget: the most energy the chosen assignment may spend, uJ per image, or a uniform setting of the
            candidates (``"adc_bits=4"``: the predicted energy of every searched layer at 4 bits, edge layers as
            configured), or a fraction of one (``"0.8*adc_bits=5"``: 20% less than uniform ADC 5). The search
            returns the assignment of least predicted loss within it. None (and no ``loss_budget``): the energy of
            the configured model (``model.cim`` and its overrides).
        loss_budget: instead of an energy budget, the most predicted loss (the ``metric``'s objective) the
            assignment may have, or a uniform setting (``"adc_bits=5"``: its predicted loss, the usual way to give
            it; a fraction of one as for ``energy_budget``); the search returns the assignment of least predicted
            energy within it.
        metric: how a setting's loss is measured: ``fisher`` (the layer alone: its output error weighted by the
            float network's diagonal Fisher, the second-order estimate of the loss it adds; fast and smooth),
            ``kl`` or ``mse`` (the whole network's logits with that layer changed, against the layer exact: KL
            divergence of the softmax, nats per image, or mean squared logit error; slower, exact, noisier). Whole
            networks (``verify``) are measured by their KL divergence from the float network (MSE with ``mse``).
        images: calibration images (the first of the datamodule's calibration subset, train split) that every
            setting is calibrated and measured on.
        batch_size: images per forward pass.
        verify: also calibrate and measure, as whole networks, the chosen assignment and every uniform setting of
            the candidates (the points of the plot; the sensitivities alone predict them additively).
        test_images: test images (the start of the test split) whose top-1 accuracy the verified points report;
            0 = none (the loss on the calibration images only).
        energy_table: YAML of per-event energies; None = the config's `HardwareReport` table, else NeuroSim 22 nm.
        output_dir: folder of ``cim_overrides.yaml`` (the chosen assignment, a config ``fit`` takes as is),
            ``sensitivity.csv``, ``front.csv``, ``points.csv`` and ``search.png``.
        replay: cache every CIM layer's activations on the search images (memory: a few activations per layer
            and image, about 0.8 GB for ResNet-20 on 256 images) and replay them instead of recomputing: needed by
            ``fisher`` and ``init_from``; with ``kl``/``mse`` the same numbers in about half the time.
        init_from: a PTQ (or QAT) checkpoint of this configuration to search from: every setting is measured on
            the reconstructed network (its AdaRound decisions baked into the weights, its learned input steps and
            ADC clips) instead of the calibrated one, so that what reconstruction repairs is seen. A trial of
            another ADC resolution keeps the layer's learned clip range (alpha0 x exp(theta)) at the new resolution
            (an asymmetric ADC's range is calibrated again: its offsets are in steps of the old resolution);
            a quantizer whose bits change is calibrated as without it. None: calibration only.
    """

    candidates: dict[str, list[Optional[int]]] = field(default_factory=_default_candidates)
    layers: Optional[list[str]] = None
    layer_candidates: Optional[dict[str, dict[str, list[Optional[int]]]]] = None
    energy_budget: Union[float, str, None] = None
    loss_budget: Union[float, str, None] = None
    metric: Literal["fisher", "kl", "mse"] = "fisher"
    images: int = 256
    batch_size: int = 128
    verify: bool = True
    test_images: int = 0
    energy_table: Optional[str] = None
    output_dir: str = "search"
    replay: bool = True
    init_from: Optional[str] = None

    def __post_init__(self) -> None:
        self.candidates = _checked_candidates(self.candidates, "search.candidates")
        if self.layer_candidates is not None:
            if not isinstance(self.layer_candidates, dict) or not self.layer_candidates:
                raise ConfigError(f"search.layer_candidates={self.layer_candidates!r} is invalid: expected a mapping of "
                                  "layer names or globs to candidates, e.g. {conv1: {input_bits: [6, 7, 8]}}, or null")
            self.layer_candidates = {
                pattern: _checked_candidates(candidates, f"search.layer_candidates[{pattern!r}]")
                for pattern, candidates in self.layer_candidates.items()}
        for name in ("images", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"search.{name}={value!r} is invalid: expected an integer >= 1")
        if isinstance(self.test_images, bool) or not isinstance(self.test_images, int) or self.test_images < 0:
            raise ConfigError(f"search.test_images={self.test_images!r} is invalid: expected an integer >= 0")
        if self.metric not in METRICS:
            raise ConfigError(f"search.metric={self.metric!r} is invalid: expected one of {list(METRICS)}")
        if self.metric == "fisher" and not self.replay:
            raise ConfigError("search.metric='fisher' needs search.replay=true (it reads the cached activations); "
                              "use metric kl or mse without replay")
        if self.init_from is not None and not self.replay:
            raise ConfigError(f"search.init_from={self.init_from!r} needs search.replay=true (trials on the "
                              "reconstructed network read the cached calibration inputs)")
        if self.energy_budget is not None and self.loss_budget is not None:
            raise ConfigError("search.energy_budget and search.loss_budget are both set: give one (the other is "
                              "what the search minimises)")
        for name in ("energy_budget", "loss_budget"):
            value = getattr(self, name)
            if isinstance(value, str):
                setting = parse_setting(split_fraction(value, f"search.{name}")[1], f"search.{name}")
                if setting not in self.settings():
                    raise ConfigError(f"search.{name}={value!r} is not a uniform setting of the candidates: expected "
                                      f"one of {', '.join(repr(setting_label(s)) for s in self.settings())}")
            elif value is not None and (isinstance(value, bool) or not value >= 0):
                raise ConfigError(f"search.{name}={value!r} is invalid: expected a number >= 0 or a setting such as "
                                  "'adc_bits=4'")
        if self.layers is not None and (not isinstance(self.layers, list) or not self.layers
                                        or not all(isinstance(p, str) and p for p in self.layers)):
            raise ConfigError(f"search.layers={self.layers!r} is invalid: expected a non-empty list of layer names or "
                              "globs, or null (every layer on the arrays)")

    def settings(self) -> list[dict]:
        """Every candidate setting: the combinations of the ``candidates`` lists, in order."""
        return combinations(self.candidates)

    def own_settings(self, layers: Sequence[str]) -> dict[str, list[dict]]:
        """The candidate settings of each of ``layers`` (searched layer names) that ``layer_candidates`` gives
        candidates of its own (the last pattern matching it); the other layers take ``candidates``.

        Raises:
            ConfigError: a ``layer_candidates`` pattern matching none of ``layers`` (the message lists them).
        """
        own = fields_by_glob(layers, {pattern: {"candidates": candidates} for pattern, candidates
                                      in (self.layer_candidates or {}).items()}, "search.layer_candidates",
                             items="searched layers")
        return {name: combinations(fields["candidates"]) for name, fields in own.items()}

    def budget(self) -> tuple:
        """``(kind, value, fraction)``: kind ``"energy"`` or ``"loss"``; value a number, a setting dict, or None (the
        configured model's energy); fraction the factor a setting's budget is taken at (1.0 unless given)."""
        kind = "loss" if self.loss_budget is not None else "energy"
        value, fraction = (self.loss_budget if kind == "loss" else self.energy_budget), 1.0
        if isinstance(value, str):
            fraction, text = split_fraction(value, f"search.{kind}_budget")
            value = parse_setting(text, f"search.{kind}_budget")
        return kind, (float(value) if isinstance(value, (int, float)) else value), fraction
