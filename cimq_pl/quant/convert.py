"""`convert_to_cim`: every eligible layer swapped for its CIM version, in place (torchao ``quantize_`` style).

The other model verbs live in `fold.py` (`fold_batchnorm_`) and `calibrate.py` (`calibrate_` and the switches);
they and the walks `cim_layers` / `iter_quantizers` (`layers.py`) are re-exported here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

from torch import nn

from cimq_pl.quant.calibrate import calibrate_, set_collect_stats, set_quantizers_enabled
from cimq_pl.quant.device import DeviceSpec
from cimq_pl.quant.device_model import attach_device_
from cimq_pl.quant.fold import _set_submodule, fold_batchnorm_
from cimq_pl.quant.layers import cim_layers, iter_quantizers
from cimq_pl.quant.options import QuantizerOptions
from cimq_pl.quant.overrides import plan_layers
from cimq_pl.quant.registry import CIM_LAYER_TYPES, cim_layer_type_for
from cimq_pl.quant.spec import CIMSpec
from cimq_pl.quant.tiling import TileGeometry


@dataclass
class ConvertedLayer:
    """One converted layer: its name, float type, mapping mode (``"cim"`` or ``"int8"``), geometry and the
    per-layer override fields that applied to it (``{}`` when it runs on the macro's spec)."""

    name: str
    float_type: str
    mode: str
    geometry: TileGeometry
    overrides: dict = field(default_factory=dict)


@dataclass
class ConversionReport:
    """What `convert_to_cim` did.

    Attributes:
        converted: `ConvertedLayer` entries in model order.
        skipped: ``(name, reason)`` of eligible-type layers left as they were.
    """

    converted: list = field(default_factory=list)
    skipped: list = field(default_factory=list)

    @property
    def converted_names(self) -> list:
        """Names of the converted layers."""
        return [layer.name for layer in self.converted]

    @property
    def arrays_used(self) -> int:
        """Arrays of all converted layers."""
        return sum(layer.geometry.arrays_used for layer in self.converted)

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)} layer(s), {self.arrays_used} arrays:"]
        width = max([len(layer.name) for layer in self.converted] + [4])
        for layer in self.converted:
            changed = ", ".join(f"{k}={v}" for k, v in layer.overrides.items() if k != "mode")
            changed = f"  [override: {changed}]" if changed else ""
            lines.append(f"  {layer.name:<{width}}  {layer.float_type:<7} {layer.mode:<4}  {layer.geometry.describe()}{changed}")
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} layer(s):")
            lines.extend(f"  {name:<{width}}  {reason}" for name, reason in self.skipped)
        return "\n".join(lines)


def convert_to_cim(
    model: nn.Module,
    spec: CIMSpec,
    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
    options: Optional[QuantizerOptions] = None,
    device: Optional[DeviceSpec] = None,
    overrides: Optional[Mapping[str, Any]] = None,
) -> ConversionReport:
    """Swap every eligible layer of ``model`` for its CIM version, in place.

    Eligible layers are modules whose exact type is in the CIM layer registry (``nn.Conv2d``, ``nn.Linear``)
    and that ``filter_fn(module, name)`` accepts. The first and the last eligible layers in registration
    order (``named_modules``) follow ``spec.first_layer`` / ``spec.last_layer``: ``"cim"`` maps them like any
    other layer, ``"int8"`` with `CIMSpec.int8`, ``"digital"`` leaves them as float layers. ``overrides`` gives
    some layers other bit-widths or another mode (`cimq_pl.quant.overrides`); each CIM layer keeps its resolved
    spec as ``layer.spec``, which everything downstream (simulation, cost model, baseline, export) reads. The CIM
    layers share the original Parameters and are moved to their device and dtype.

    Args:
        model: any model (timm, torchvision, a CIFAR ResNet); modified in place.
        spec: the macro.
        filter_fn: optional predicate ``(module, fully qualified name) -> bool``.
        options: quantizer choices for every converted layer.
        device: the chip's cells and ADCs (`DeviceSpec`), attached to every CIM layer of ``model`` as chip
            ``device.seed`` read at ``device.read_time`` (`attach_device_`); None = ideal cells and ADCs.
        overrides: per-layer macro fields by module name or glob, e.g. ``{"layer1.*.conv2": {"adc_bits": 3}}``
            (`cimq_pl.quant.overrides`); None = every layer on ``spec``.

    Returns:
        A `ConversionReport` (converted layers with their geometry, skipped ones with a reason).

    Raises:
        ConfigError: an override naming no eligible layer (the message lists them), an unknown override field,
            or bit-widths `CIMSpec` refuses; raised before any layer is converted.
    """
    report = ConversionReport()
    eligible = [(name, module) for name, module in model.named_modules() if cim_layer_type_for(module) is not None]
    accepted = []
    for name, module in eligible:
        if filter_fn is not None and not filter_fn(module, name):
            report.skipped.append((name, "rejected by filter_fn"))
        else:
            accepted.append((name, module))
    plans = plan_layers([name for name, _ in accepted], spec, overrides)
    for index, ((name, module), plan) in enumerate(zip(accepted, plans)):
        mode, layer_spec = plan.mode, plan.spec
        if mode == "digital":
            field_name = ("mode" if "mode" in plan.fields else
                          "first_layer" if index == 0 and spec.first_layer == "digital" else "last_layer")
            report.skipped.append((name, f"{field_name}='digital': kept as the float layer"))
            continue
        cim_type = cim_layer_type_for(module)
        try:
            cim_layer = cim_type.from_float(module, layer_spec, options)
        except ValueError as error:
            report.skipped.append((name, str(error)))
            continue
        cim_layer.mapping = mode
        cim_layer.to(device=module.weight.device, dtype=module.weight.dtype)
        cim_layer.train(module.training)
        _set_submodule(model, name, cim_layer)
        report.converted.append(ConvertedLayer(name, type(module).__name__, mode, cim_layer.geometry, dict(plan.fields)))
    if device is not None:
        attach_device_(model, device)
    return report


def rebuild_cim_layer(layer: nn.Module, spec: CIMSpec, options: Optional[QuantizerOptions] = None) -> nn.Module:
    """A new CIM layer of ``layer``'s type on its Parameters (shared) and shape, for another ``spec`` and
    ``options`` (default: the layer's own), on its device and dtype, with fresh (uncalibrated) quantizers. A learned
    `output_offset` (shared too) goes with it where the new spec has an ADC, which is where the offset applies.

    Raises:
        TypeError: ``layer`` is not a `CIMConv2d` or `CIMLinear`.
    """
    from cimq_pl.quant.layers import CIMConv2d, CIMLinear

    options = layer.options if options is None else options
    if isinstance(layer, CIMConv2d):
        new = CIMConv2d(layer.weight, layer.bias, spec, layer.stride, layer.padding, layer.dilation, layer.groups, options)
    elif isinstance(layer, CIMLinear):
        new = CIMLinear(layer.weight, layer.bias, spec, options)
    else:
        raise TypeError(f"cannot rebuild {type(layer).__name__}: expected CIMConv2d or CIMLinear")
    new.train(layer.training)
    new.mapping = layer.mapping
    if layer.output_offset is not None and new.psum_quantizer is not None:
        new.output_offset = layer.output_offset
    return new.to(device=layer.weight.device, dtype=layer.weight.dtype)


__all__ = [
    "CIM_LAYER_TYPES",
    "ConversionReport",
    "ConvertedLayer",
    "calibrate_",
    "cim_layers",
    "convert_to_cim",
    "fold_batchnorm_",
    "iter_quantizers",
    "rebuild_cim_layer",
    "set_collect_stats",
    "set_quantizers_enabled",
]
