"""The technique registry, ``quantize_`` and ``reconfigure_`` (the one way to change quantizer options)."""

from __future__ import annotations

import dataclasses
from typing import Callable

from torch import nn

from cimq_pl.quant.convert import cim_layers
from cimq_pl.quant.options import CONVENTIONAL_OPTIONS  # re-exported: the techniques start from it

__all__ = ["CONVENTIONAL_OPTIONS", "TECHNIQUES", "applied_technique", "list_techniques", "quantize_", "reconfigure_",
           "register_technique"]

_APPLIED = "_cimq_techniques"

#: config type -> (technique name, transform)
TECHNIQUES: dict[type, tuple[str, Callable]] = {}


def register_technique(name: str):
    """Class decorator pairing a config dataclass with its transform ``config.apply_(model)``."""

    def wrap(config_type: type) -> type:
        TECHNIQUES[config_type] = (name, config_type.apply_)
        return config_type

    return wrap


def list_techniques() -> list[str]:
    """Names of the registered techniques."""
    return sorted(name for name, _ in TECHNIQUES.values())


def quantize_(model: nn.Module, config) -> nn.Module:
    """Apply the technique described by ``config`` to every CIM layer of ``model``, in place.

    Raises:
        TypeError: when no technique is registered for ``type(config)``.
    """
    if type(config) not in TECHNIQUES:
        known = ", ".join(t.__name__ for t in TECHNIQUES)
        raise TypeError(f"no CIMQ technique is registered for {type(config).__name__}: expected one of {known}")
    TECHNIQUES[type(config)][1](config, model)
    model.__dict__.setdefault(_APPLIED, {})[type(config)] = config
    return model


def applied_technique(model: nn.Module, config_type: type):
    """The config of type ``config_type`` last applied to ``model`` with `quantize_`, or None."""
    return model.__dict__.get(_APPLIED, {}).get(config_type)


def reconfigure_(model: nn.Module, mappings: tuple = ("cim", "int8"), **changes) -> int:
    """Change quantizer options of the CIM layers of ``model`` mapped as one of ``mappings`` (``"cim"``: the
    macro's arrays, ``"int8"``: 8-bit edge layers) in place; returns the layers changed.

    Only the quantizers whose options change are rebuilt (uncalibrated, on the layer's device); the others
    keep their state. A change given as a callable is that layer's value of it (``callable(layer)``).
    """
    changed = 0
    for _, layer in cim_layers(model):
        if layer.mapping not in mappings:
            continue
        options = dataclasses.replace(layer.options, **{field: value(layer) if callable(value) else value
                                                        for field, value in changes.items()})
        if options != layer.options:
            layer.set_options(options)
            changed += 1
    return changed
