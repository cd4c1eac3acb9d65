"""`calibrate_`: every quantizer initialised from data; and the model-wide switches of the CIM layers
(`set_quantizers_enabled`, `set_collect_stats`)."""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
from torch import nn

from cimq_pl.quant.device_model import device_mode
from cimq_pl.quant.gptq import DEFAULT_DAMP, GPTQReport, forward_batch, gptq_, uses_gptq
from cimq_pl.quant.layers import QUANTIZER_ROLES, cim_layers, iter_quantizers


@torch.no_grad()
def calibrate_(
    model: nn.Module,
    batches: Iterable,
    forward_fn: Optional[Callable[[nn.Module, object], object]] = None,
    gptq_damp: float = DEFAULT_DAMP,
) -> Optional[GPTQReport]:
    """Initialise every quantizer of every CIM layer from data, in place (two passes over ``batches``, three
    with GPTQ rounding).

    Pass 1: weight steps from the weights; input quantizers observe (values pass through unquantized, ADCs
    ideal). Then, when some layer's weight rounding is ``"gptq"``: one pass with inputs and weights quantized
    (ADCs ideal) collects those layers' input Hessians and GPTQ compensates their weights (`gptq_`). Pass 2:
    with inputs and weights quantized, the ADC quantizers observe the integer partial sums (passing them
    through) and set alpha0. Disabled quantizers are left alone. A real device attached to the layers
    (`attach_device_`) is off meanwhile: ranges are calibrated on ideal cells, as a compiler does before the
    chip is known.

    Args:
        model: a converted model (its train/eval mode is kept; use eval mode for BN statistics).
        batches: a re-iterable of batches (e.g. a list or a DataLoader).
        forward_fn: ``forward_fn(model, batch)``; default ``model(batch[0])`` for tuples/lists, else
            ``model(batch)``.
        gptq_damp: Hessian dampening of GPTQ rounding (fraction of the mean diagonal).

    Returns:
        The `GPTQReport` of the GPTQ pass (layers, seconds), None when no layer rounds with GPTQ.
    """
    forward_fn = forward_fn or forward_batch
    with device_mode(model, "ideal"):
        return _calibrate(model, batches, forward_fn, gptq_damp)


def _calibrate(model: nn.Module, batches: Iterable, forward_fn: Callable, gptq_damp: float) -> Optional[GPTQReport]:
    for _, layer in cim_layers(model):
        wq = layer.weight_quantizer
        if wq is not None and wq.enabled:
            wq.init_from_observer(layer._weight4d())
    inputs = [quantizer for *_, quantizer in iter_quantizers(model, ("input",))]
    psums = {quantizer: quantizer.enabled for *_, quantizer in iter_quantizers(model, ("psum",))}
    for quantizer in inputs:
        if quantizer.enabled:
            quantizer.start_observing()
    for pq in psums:
        pq.enabled = False
    for batch in batches:
        forward_fn(model, batch)
    for quantizer in inputs:
        quantizer.finish_observing()
    report = None
    if any(uses_gptq(layer) for _, layer in cim_layers(model)):  # inputs and weights quantized, ADCs ideal
        report = gptq_(model, batches, forward_fn, damp=gptq_damp)
    for pq, enabled in psums.items():
        pq.enabled = enabled
        if enabled:
            pq.start_observing()
    for batch in batches:
        forward_fn(model, batch)
    for pq in psums:
        pq.finish_observing()
    return report


def set_collect_stats(model: nn.Module, collect: bool = True, reset: bool = True) -> None:
    """Turn event counting on or off in every CIM layer, optionally zeroing the counters."""
    for _, layer in cim_layers(model):
        layer.collect_stats = collect
        if reset:
            layer.reset_stats()


def set_quantizers_enabled(model: nn.Module, enabled: bool, roles: Iterable[str] = QUANTIZER_ROLES) -> None:
    """Enable or disable the quantizers with the given roles in every CIM layer.

    Raises:
        ValueError: a role that is not one of ``"input"``, ``"weight"``, ``"psum"``.
    """
    for *_, quantizer in iter_quantizers(model, roles):
        quantizer.enabled = enabled


__all__ = ["calibrate_", "set_collect_stats", "set_quantizers_enabled"]
