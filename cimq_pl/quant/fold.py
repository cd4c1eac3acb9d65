"""`fold_batchnorm_`: every BatchNorm2d folded into the Conv2d feeding it, before conversion (SPEC 3)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


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


__all__ = ["fold_batchnorm_"]
