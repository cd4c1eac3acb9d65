"""Where a NaN/inf comes from: the quantizer or CIM layer to name when a loss stops being finite.

`explain_nonfinite` is what the PTQ and QAT objectives put in their error when the loss turns NaN/inf, so a
run stops with "block layer2.1, quantizer layer2.1.conv1.psum.theta holds NaN" instead of a silent NaN model.
"""

from __future__ import annotations

import torch
from torch import nn

from cimq_pl.quant.layers import cim_layers, iter_quantizers

__all__ = ["check_finite", "explain_nonfinite", "first_nonfinite_layer", "nonfinite_quantizer_tensors"]


def _qualified(*parts: str) -> str:
    return ".".join(part for part in parts if part)


def _quantizer_tensors(module: nn.Module):
    for layer_name, role, quantizer in iter_quantizers(module):
        for name, tensor in [*quantizer.named_parameters(), *quantizer.named_buffers()]:
            if tensor.is_floating_point():
                yield layer_name, role, name, tensor


def nonfinite_quantizer_tensors(module: nn.Module, prefix: str = "") -> list[str]:
    """Names (``<prefix>.<layer>.<role>_quantizer.<tensor>``) of quantizer parameters/buffers holding NaN/inf."""
    return [
        _qualified(prefix, layer_name, f"{role}_quantizer", name)
        for layer_name, role, name, tensor in _quantizer_tensors(module)
        if not torch.isfinite(tensor).all()
    ]


@torch.no_grad()
def first_nonfinite_layer(module: nn.Module, *inputs, prefix: str = "") -> str | None:
    """Run ``module(*inputs)`` and name the first CIM layer whose output holds NaN/inf (None if none does).

    The name says whether that layer's input was already non-finite (the fault is upstream of the arrays).
    """
    first: list[str] = []
    handles = []
    for name, layer in cim_layers(module):
        def hook(_layer, args, output, name=name):
            if first or not torch.is_tensor(output) or torch.isfinite(output).all():
                return
            source = "its input was already" if not torch.isfinite(args[0]).all() else "its input was finite"
            first.append(f"{_qualified(prefix, name)} ({source})")
        handles.append(layer.register_forward_hook(hook))
    try:
        module(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return first[0] if first else None


def explain_nonfinite(module: nn.Module, *inputs, prefix: str = "") -> str:
    """One sentence naming the quantizer tensors holding NaN/inf, else the first CIM layer producing them.

    ``prefix`` is ``module``'s name in the network (names are then network-wide).
    """
    tensors = nonfinite_quantizer_tensors(module, prefix)
    if tensors:
        more = f" and {len(tensors) - 3} more" if len(tensors) > 3 else ""
        return f"quantizer {', '.join(tensors[:3])}{more} hold NaN/inf (a learning rate too high for them?)"
    layer = first_nonfinite_layer(module, *inputs, prefix=prefix)
    if layer is not None:
        return f"the first non-finite output is CIM layer {layer}; every quantizer parameter is finite"
    return "every quantizer parameter and CIM layer output is finite: the target or the penalty is not"


def check_finite(loss: torch.Tensor, module: nn.Module, *inputs, where: str, prefix: str = "") -> None:
    """Raise `FloatingPointError` when ``loss`` or a quantizer tensor of ``module`` is NaN/inf.

    The learning quantizer tensors (those that require a gradient: only they change in a step) are checked too
    because some faults never reach the loss (a NaN ADC clip turns every code into the same finite value: a
    silently wrong model). One device sync when all is well.

    Args:
        loss: the step's loss.
        module: the part of the network that learns (a PTQ block, the QAT model).
        inputs: what ``module`` ran on (to trace a non-finite output to its first CIM layer).
        where: the start of the message, e.g. ``"PTQ block 'layer2.1' at step 40"``.
        prefix: ``module``'s name in the network.
    """
    flags = [torch.isfinite(tensor).all() for *_, tensor in _quantizer_tensors(module) if tensor.requires_grad]
    flags.append(torch.isfinite(loss).all())
    if bool(torch.stack(flags).all()):
        return
    raise FloatingPointError(f"{where}: the loss is {loss.item():.4g}; {explain_nonfinite(module, *inputs, prefix=prefix)}")
