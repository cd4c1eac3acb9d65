"""`convert_to_cim`: every eligible layer swapped for its CIM version, in place (torchao ``quantize_`` style).

The other model verbs live in `fold.py` (`fold_batchnorm_`) and `calibrate.py` (`calibrate_` and the switches);
they and the walks `cim_layers` / `iter_quantizers` (`layers.py`) are re-exported here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from torch import nn

from cimq_pl.quant.calibrate import calibrate_, set_collect_stats, set_quantizers_enabled
from cimq_pl.quant.device import DeviceSpec
from cimq_pl.quant.device_model import attach_device_
from cimq_pl.quant.fold import _set_submodule, fold_batchnorm_
from cimq_pl.quant.layers import cim_layers, iter_quantizers
from cimq_pl.quant.options import QuantizerOptions
from cimq_pl.quant.registry import CIM_LAYER_TYPES, cim_layer_type_for
from cimq_pl.quant.spec import CIMSpec
from cimq_pl.quant.tiling import TileGeometry


@dataclass
class ConvertedLayer:
    """One converted layer: its name, float type, mapping mode (``"cim"`` or ``"int8"``) and geometry."""

    name: str
    float_type: str
    mode: str
    geometry: TileGeometry


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
            lines.append(f"  {layer.name:<{width}}  {layer.float_type:<7} {layer.mode:<4}  {layer.geometry.describe()}")
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
) -> ConversionReport:
    """Swap every eligible layer of ``model`` for its CIM version, in place.

    Eligible layers are modules whose exact type is in the CIM layer registry (``nn.Conv2d``, ``nn.Linear``)
    and that ``filter_fn(module, name)`` accepts. The first and the last eligible layers in registration
    order (``named_modules``) follow ``spec.first_layer`` / ``spec.last_layer``: ``"cim"`` maps them like any
    other layer, ``"int8"`` with `CIMSpec.int8`, ``"digital"`` leaves them as float layers. The CIM layers
    share the original Parameters and are moved to their device and dtype.

    Args:
        model: any model (timm, torchvision, a CIFAR ResNet); modified in place.
        spec: the macro.
        filter_fn: optional predicate ``(module, fully qualified name) -> bool``.
        options: quantizer choices for every converted layer.
        device: the chip's cells and ADCs (`DeviceSpec`), attached to every CIM layer of ``model`` as chip
            ``device.seed`` read at ``device.read_time`` (`attach_device_`); None = ideal cells and ADCs.

    Returns:
        A `ConversionReport` (converted layers with their geometry, skipped ones with a reason).
    """
    report = ConversionReport()
    eligible = [(name, module) for name, module in model.named_modules() if cim_layer_type_for(module) is not None]
    accepted = []
    for name, module in eligible:
        if filter_fn is not None and not filter_fn(module, name):
            report.skipped.append((name, "rejected by filter_fn"))
        else:
            accepted.append((name, module))
    for index, (name, module) in enumerate(accepted):
        modes = []
        if index == 0:
            modes.append(("first_layer", spec.first_layer))
        if index == len(accepted) - 1:
            modes.append(("last_layer", spec.last_layer))
        mode, layer_spec = "cim", spec
        for field_name, value in modes:
            if value == "digital":
                mode = "digital"
                report.skipped.append((name, f"{field_name}='digital': kept as the float layer"))
                break
            if value == "int8":
                mode, layer_spec = "int8", spec.int8()
        if mode == "digital":
            continue
        cim_type = cim_layer_type_for(module)
        try:
            cim_layer = cim_type.from_float(module, layer_spec, options)
        except ValueError as error:
            report.skipped.append((name, str(error)))
            continue
        cim_layer.to(device=module.weight.device, dtype=module.weight.dtype)
        cim_layer.train(module.training)
        _set_submodule(model, name, cim_layer)
        report.converted.append(ConvertedLayer(name, type(module).__name__, mode, cim_layer.geometry))
    if device is not None:
        attach_device_(model, device)
    return report


__all__ = [
    "CIM_LAYER_TYPES",
    "ConversionReport",
    "ConvertedLayer",
    "calibrate_",
    "cim_layers",
    "convert_to_cim",
    "fold_batchnorm_",
    "iter_quantizers",
    "set_collect_stats",
    "set_quantizers_enabled",
]
