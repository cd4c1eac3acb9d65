"""Registry of CIM layer types keyed by the float module type they replace (timm-style registry)."""

from __future__ import annotations

from typing import Callable, Optional, Type

from torch import nn

CIM_LAYER_TYPES: dict = {}


def register_cim_layer(float_type: Type[nn.Module]) -> Callable:
    """Class decorator registering a CIM layer as the replacement of ``float_type``.

    The class must provide ``from_float(module, spec, options)``.
    """

    def decorate(cim_type):
        CIM_LAYER_TYPES[float_type] = cim_type
        return cim_type

    return decorate


def cim_layer_type_for(module: nn.Module) -> Optional[type]:
    """The CIM layer class registered for ``module``'s exact type, or None (subclasses are not matched)."""
    return CIM_LAYER_TYPES.get(type(module))


def list_cim_layers() -> list:
    """Names of the float module types that have a CIM replacement."""
    return sorted(t.__name__ for t in CIM_LAYER_TYPES)
