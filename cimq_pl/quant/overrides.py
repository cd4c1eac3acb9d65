"""Per-layer overrides of the macro: one layer (or a glob of layers) on other bit-widths than `CIMSpec`'s.

`CIMSpec` stays the macro's default; an *override mapping* gives some layers other values of a few of its
fields, by module name or `fnmatch` glob::

    {"layer1.*.conv2": {"adc_bits": 3}, "fc": {"adc_bits": 6, "input_bits": 8}, "conv1": {"mode": "int8"}}

Allowed fields (`OVERRIDE_FIELDS`): ``weight_bits``, ``cell_bits``, ``input_bits``, ``dac_bits``, ``adc_bits``
(None = float / ideal, as in `CIMSpec`) and ``mode`` (``cim``, ``int8``, ``digital``: the mapping
`CIMSpec.first_layer` / ``last_layer`` give the edge layers, here for any layer). The array geometry (rows,
cols, row split, slicing) is the macro's and cannot differ per layer.

Resolution of one layer: its mode is the override's ``mode``, else the edge-layer mode of the macro (first or
last eligible layer), else ``cim``; an ``int8`` layer starts from `CIMSpec.int8`, a ``cim`` layer from the
macro; the override's bit fields are then applied on top (``{"mode": "int8", "adc_bits": 8}`` is an int8 layer
with an 8-bit ADC). Entries apply in mapping order, a later entry overriding an earlier one field by field, so
a glob first and exact names after reads naturally. Every pattern must match at least one eligible layer, and
every resolved spec is validated by `CIMSpec` itself.
"""

from __future__ import annotations

import difflib
import fnmatch
from typing import Any, Mapping, Optional, Sequence

from cimq_pl.errors import ConfigError
from cimq_pl.quant.spec import EDGE_LAYER_MODES, CIMSpec

__all__ = ["OVERRIDE_FIELDS", "OVERRIDE_BIT_FIELDS", "LayerPlan", "check_overrides", "fields_by_glob",
           "layer_overrides", "normalize_overrides", "plan_layers"]

#: Bit-width fields of `CIMSpec` an override may set per layer.
OVERRIDE_BIT_FIELDS = ("weight_bits", "cell_bits", "input_bits", "dac_bits", "adc_bits")
#: Every field an override may set: the bit-widths and the layer's mapping ``mode``.
OVERRIDE_FIELDS = (*OVERRIDE_BIT_FIELDS, "mode")

WHERE = "model.cim_overrides"


class LayerPlan:
    """How one eligible layer is mapped: ``mode`` (``cim``, ``int8`` or ``digital``) and its resolved ``spec``
    (None for a digital layer), plus the override fields that applied to it (``fields``)."""

    __slots__ = ("name", "mode", "spec", "fields")

    def __init__(self, name: str, mode: str, spec: Optional[CIMSpec], fields: dict) -> None:
        self.name, self.mode, self.spec, self.fields = name, mode, spec, fields

    def __repr__(self) -> str:
        return f"LayerPlan({self.name!r}, mode={self.mode!r}, fields={self.fields})"


def normalize_overrides(overrides: Optional[Mapping[str, Any]]) -> dict[str, dict]:
    """``overrides`` as a plain ``{pattern: {field: value}}`` dict, its fields checked (unknown fields, values
    of the wrong type, modes); None or ``{}`` gives ``{}``.

    Raises:
        ConfigError: one line naming the pattern, the field, the value and what is allowed.
    """
    if overrides is None:
        return {}
    if not isinstance(overrides, Mapping):
        raise ConfigError(f"{WHERE}={overrides!r} is invalid: expected a mapping of layer name or glob to fields, "
                          "e.g. {'layer1.*.conv2': {'adc_bits': 3}}")
    plain = {}
    for pattern, fields in overrides.items():
        if not isinstance(pattern, str) or not pattern:
            raise ConfigError(f"{WHERE}: key {pattern!r} is invalid: expected a layer name or glob (e.g. 'layer1.*.conv2')")
        fields = dict(fields.items()) if hasattr(fields, "items") else fields
        if not isinstance(fields, dict) or not fields:
            raise ConfigError(f"{WHERE}[{pattern!r}]={fields!r} is invalid: expected a non-empty mapping of "
                              f"fields among {', '.join(OVERRIDE_FIELDS)}")
        for field, value in fields.items():
            if field not in OVERRIDE_FIELDS:
                close = difflib.get_close_matches(str(field), OVERRIDE_FIELDS, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"{WHERE}[{pattern!r}]: unknown field {field!r}{hint}; allowed: "
                                  f"{', '.join(OVERRIDE_FIELDS)} (the array geometry is the macro's, model.cim)")
            if field == "mode" and value not in EDGE_LAYER_MODES:
                raise ConfigError(f"{WHERE}[{pattern!r}].mode={value!r} is invalid: expected one of {list(EDGE_LAYER_MODES)}")
        plain[pattern] = dict(fields)
    return plain


def layer_overrides(names: Sequence[str], overrides: Optional[Mapping[str, Any]]) -> dict[str, dict]:
    """The override fields of each layer of ``names`` that some pattern matches, merged in mapping order
    (later entries win field by field); layers no pattern matches are absent.

    Raises:
        ConfigError: a malformed mapping (`normalize_overrides`), or a pattern that matches none of ``names``
            (the message lists them).
    """
    return fields_by_glob(names, normalize_overrides(overrides), WHERE)


def fields_by_glob(names: Sequence[str], fields_by_pattern: Mapping[str, Mapping], where: str,
                   item: str = "layer", items: str = "layers") -> dict[str, dict]:
    """The fields of each of ``names`` that some pattern (a name or `fnmatch` glob) of ``fields_by_pattern``
    matches, merged in mapping order (later entries win field by field); names no pattern matches are absent.

    Raises:
        ConfigError: a pattern that matches none of ``names`` (``where`` names the option; the message lists the
            ``items``).
    """
    merged: dict[str, dict] = {}
    for pattern, fields in fields_by_pattern.items():
        matched = [name for name in names if name == pattern or fnmatch.fnmatchcase(name, pattern)]
        if not matched:
            close = difflib.get_close_matches(pattern, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: {pattern!r} matches no {item}{hint}; the {items} are: {', '.join(names)}")
        for name in matched:
            merged.setdefault(name, {}).update(fields)
    return {name: merged[name] for name in names if name in merged}


def plan_layers(names: Sequence[str], spec: CIMSpec, overrides: Optional[Mapping[str, Any]] = None) -> list[LayerPlan]:
    """The mapping mode and resolved spec of each eligible layer ``names`` (in model order) on macro ``spec``.

    Raises:
        ConfigError: a bad override (unknown field or layer, see `layer_overrides`), bit-widths `CIMSpec` refuses
            (its message, prefixed with the pattern's layer), or bit fields on a layer mapped ``digital``.
    """
    fields_of = layer_overrides(names, overrides)
    plans = []
    for index, name in enumerate(names):
        fields = dict(fields_of.get(name, {}))
        edge = [spec.first_layer] * (index == 0) + [spec.last_layer] * (index == len(names) - 1)
        mode = "digital" if "digital" in edge else "int8" if "int8" in edge else "cim"
        mode = fields.pop("mode", mode)
        if mode == "digital":
            if fields:
                raise ConfigError(f"{WHERE}: layer {name!r} is mapped 'digital' (kept as the float layer), so "
                                  f"{', '.join(sorted(fields))} cannot apply to it: drop them or set mode: cim / int8")
            plans.append(LayerPlan(name, mode, None, fields_of.get(name, {})))
            continue
        base = spec.int8() if mode == "int8" else spec
        try:
            layer_spec = base.replace(**fields) if fields else base
        except ConfigError as error:
            raise ConfigError(f"{WHERE}: layer {name!r}: {error}") from None
        plans.append(LayerPlan(name, mode, layer_spec, fields_of.get(name, {})))
    return plans


def check_overrides(names: Sequence[str], spec: CIMSpec, overrides: Optional[Mapping[str, Any]]) -> None:
    """Raise `ConfigError` when ``overrides`` cannot apply to layers ``names`` on ``spec`` (see `plan_layers`)."""
    plan_layers(names, spec, overrides)
