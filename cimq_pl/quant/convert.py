"""Model-level verbs: `convert_to_cim` (in place, torchao ``quantize_`` style), `fold_batchnorm_`, `calibrate_`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from cimq_pl.quant.layers import _CIMLayerBase
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


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def convert_to_cim(
    model: nn.Module,
    spec: CIMSpec,
    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
    options: Optional[QuantizerOptions] = None,
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
    return report


def cim_layers(model: nn.Module) -> list:
    """``(name, layer)`` of every CIM layer of ``model``."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _CIMLayerBase)]


def set_collect_stats(model: nn.Module, collect: bool = True, reset: bool = True) -> None:
    """Turn event counting on or off in every CIM layer, optionally zeroing the counters."""
    for _, layer in cim_layers(model):
        layer.collect_stats = collect
        if reset:
            layer.reset_stats()


def set_quantizers_enabled(model: nn.Module, enabled: bool, roles: Iterable[str] = ("input", "weight", "psum")) -> None:
    """Enable or disable the quantizers with the given roles in every CIM layer."""
    for _, layer in cim_layers(model):
        for role, quantizer in layer.quantizers().items():
            if role in roles:
                quantizer.enabled = enabled


@torch.no_grad()
def calibrate_(
    model: nn.Module,
    batches: Iterable,
    forward_fn: Optional[Callable[[nn.Module, object], object]] = None,
) -> None:
    """Initialise every quantizer of every CIM layer from data, in place (two passes over ``batches``).

    Pass 1: weight steps from the weights; input quantizers observe (values pass through unquantized, ADCs
    ideal). Pass 2: with inputs and weights quantized, the ADC quantizers observe the integer partial sums
    (passing them through) and set alpha0. Disabled quantizers are left alone.

    Args:
        model: a converted model (its train/eval mode is kept; use eval mode for BN statistics).
        batches: a re-iterable of batches (e.g. a list or a DataLoader).
        forward_fn: ``forward_fn(model, batch)``; default ``model(batch[0])`` for tuples/lists, else
            ``model(batch)``.
    """
    forward_fn = forward_fn or (lambda m, b: m(b[0] if isinstance(b, (tuple, list)) else b))
    layers = [layer for _, layer in cim_layers(model)]
    for layer in layers:
        wq = layer.weight_quantizer
        if wq is not None and wq.enabled:
            wq.init_from_observer(layer._weight4d())
    adc_states = {}
    for layer in layers:
        if layer.input_quantizer is not None and layer.input_quantizer.enabled:
            layer.input_quantizer.observer.reset()
            layer.input_quantizer.observe = True
        if layer.psum_quantizer is not None:
            adc_states[layer] = layer.psum_quantizer.enabled
            layer.psum_quantizer.enabled = False
    for batch in batches:
        forward_fn(model, batch)
    for layer in layers:
        iq = layer.input_quantizer
        if iq is not None and iq.observe:
            iq.observe = False
            if iq.observer.has_data:
                iq.init_from_observer()
    for layer, enabled in adc_states.items():
        layer.psum_quantizer.enabled = enabled
        if enabled:
            layer.psum_quantizer.observer.reset()
            layer.psum_quantizer.observe = True
    for batch in batches:
        forward_fn(model, batch)
    for layer in adc_states:
        pq = layer.psum_quantizer
        if pq.observe:
            pq.observe = False
            if pq.observer.has_data:
                pq.init_from_observer()


def _trace_conv_bn_pairs(model: nn.Module) -> Optional[list]:
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 - any tracing failure falls back to module order
        return None
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        source = node.args[0] if node.args else None
        if (
            isinstance(source, torch.fx.Node)
            and source.op == "call_module"
            and type(modules.get(source.target)) is nn.Conv2d
            and len(source.users) == 1
        ):
            pairs.append((source.target, node.target))
    return pairs


def _ordered_conv_bn_pairs(model: nn.Module) -> list:
    named = [(n, m) for n, m in model.named_modules() if type(m) is nn.Conv2d or isinstance(m, nn.BatchNorm2d)]
    pairs = []
    for (conv_name, conv), (bn_name, bn) in zip(named, named[1:]):
        if type(conv) is nn.Conv2d and isinstance(bn, nn.BatchNorm2d) and bn.num_features == conv.out_channels:
            pairs.append((conv_name, bn_name))
    return pairs


def _bn_replacement(bn: nn.BatchNorm2d) -> Optional[nn.Module]:
    if type(bn) is nn.BatchNorm2d:
        return nn.Identity()
    if hasattr(bn, "act") and hasattr(bn, "drop"):  # timm BatchNormAct2d: bn -> drop -> act
        return nn.Sequential(bn.drop, bn.act)
    return None


@torch.no_grad()
def fold_batchnorm_(model: nn.Module) -> list:
    """Fold every BatchNorm2d into the Conv2d that feeds it, in place; the BN becomes ``nn.Identity``.

    Pairs are found by tracing the model with ``torch.fx`` (a conv whose only user is a BN); when the model is
    not traceable, by module registration order (a Conv2d immediately followed by a BatchNorm2d with matching
    channels, which holds for Sequential models and for timm/torchvision blocks registering conv1/bn1,
    conv2/bn2, downsample.0/downsample.1 in that order). ``W' = W * gamma / sqrt(var + eps)``,
    ``b' = (b - mean) * gamma / sqrt(var + eps) + beta`` with the running statistics (eval-mode BN).

    Limitations: the registration-order fallback trusts the order; BN subclasses are folded only when they
    are timm's ``BatchNormAct2d`` (replaced by its drop + act); a BN fed by anything else than a conv, or a
    conv feeding several users (traced case), is left alone.

    Args:
        model: modified in place.

    Returns:
        ``(conv_name, bn_name)`` of every folded pair.
    """
    pairs = _trace_conv_bn_pairs(model)
    if pairs is None:
        pairs = _ordered_conv_bn_pairs(model)
    folded = []
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        replacement = _bn_replacement(bn)
        if replacement is None or not bn.track_running_stats or bn.running_var is None:
            continue
        factor = torch.rsqrt(bn.running_var + bn.eps)
        if bn.affine:
            factor = factor * bn.weight
        shift = -bn.running_mean * factor + (bn.bias if bn.affine else 0)
        conv.weight.mul_(factor.view(-1, 1, 1, 1).to(conv.weight.dtype))
        if conv.bias is None:
            conv.bias = nn.Parameter(shift.to(conv.weight.dtype).clone())
        else:
            conv.bias.mul_(factor).add_(shift)
        _set_submodule(model, bn_name, replacement)
        folded.append((conv_name, bn_name))
    return folded


__all__ = [
    "CIM_LAYER_TYPES",
    "ConversionReport",
    "ConvertedLayer",
    "calibrate_",
    "cim_layers",
    "convert_to_cim",
    "fold_batchnorm_",
    "set_collect_stats",
    "set_quantizers_enabled",
]
