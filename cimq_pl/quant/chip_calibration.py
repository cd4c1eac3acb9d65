"""Chip calibration: a digital gain and offset per output channel of every CIM layer, fitted on one chip after it
is programmed.

A programmed chip's cells are off their targets (programming error, stuck cells, drift), and every output
channel of a layer collects that error as a shift of its mean and a change of its spread. A chip can be
measured once after programming: a few calibration images are read on it and on the ideal network, and each
channel's output is mapped back, ``y' = gain_c * y + offset_c``, so that its mean and standard deviation over
those images match the ideal network's (the batch-norm statistics recalibration of noisy analog networks, e.g.
Zhou et al., "Noisy Machines", 2020; aihwkit's global drift compensation is the one-gain-per-layer case). On the
macro this is the per-column digital multiply that already applies the weight scales, plus an add: nothing
analog changes. Layers are fitted in network order, each on the outputs of the already corrected layers before
it, so a correction sees the inputs it will get.

Pure PyTorch. Verbs: `output_statistics` (per-channel mean and std of every CIM layer), `fit_chip_calibration`
(the corrections of one chip), `channel_affine` (a context manager that applies them).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, NamedTuple, Optional, Sequence

import torch
from torch import nn

from cimq_pl.quant.layers import cim_layers

__all__ = ["ChannelAffine", "ChannelStatistics", "channel_affine", "fit_chip_calibration", "output_statistics"]

_STD_FLOOR = 1e-12  # a channel whose chip output does not vary keeps gain 1 (nothing to scale)


class ChannelStatistics(NamedTuple):
    """Mean and standard deviation (population) of one layer's output per channel, over images and positions."""

    mean: torch.Tensor
    std: torch.Tensor


class ChannelAffine(NamedTuple):
    """The digital correction of one layer on one chip: ``output * gain + offset`` per output channel."""

    gain: torch.Tensor
    offset: torch.Tensor


def _view(values: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """Per-channel ``values`` shaped to broadcast over ``output`` (channels on dim 1: (1, C, 1, 1) or (1, C))."""
    return values.reshape(1, -1, *([1] * (output.dim() - 2)))


class _Stop(Exception):
    """Raised after the layer being measured ran: the rest of the network is not needed."""


@torch.no_grad()
def output_statistics(model: nn.Module, batches: Sequence[torch.Tensor],
                      layers: Optional[Sequence[str]] = None) -> dict[str, ChannelStatistics]:
    """Per-channel mean and std of the outputs of ``model``'s CIM layers (those named in ``layers``, default all)
    over ``batches``; the forward passes stop after the last layer asked for."""
    wanted = [(name, layer) for name, layer in cim_layers(model) if layers is None or name in layers]
    if not wanted:
        raise ValueError(f"output_statistics: no CIM layer of the model is named in {layers!r}")
    sums: dict[str, list] = {name: [0.0, 0.0, 0] for name, _ in wanted}
    last = wanted[-1][1]

    def hook_for(name):
        def hook(module, _inputs, output):
            values = output.detach().double().transpose(0, 1).reshape(output.shape[1], -1)
            entry = sums[name]
            entry[0] = entry[0] + values.sum(1)
            entry[1] = entry[1] + (values * values).sum(1)
            entry[2] += values.shape[1]
            if module is last:
                raise _Stop
        return hook

    handles = [layer.register_forward_hook(hook_for(name)) for name, layer in wanted]
    try:
        for images in batches:
            try:
                model(images)
            except _Stop:
                pass
    finally:
        for handle in handles:
            handle.remove()
    out = {}
    for name, (total, squares, count) in sums.items():
        mean = total / count
        variance = (squares / count - mean * mean).clamp_min(0)
        out[name] = ChannelStatistics(mean.float(), variance.sqrt().float())
    return out


@contextlib.contextmanager
def channel_affine(model: nn.Module, corrections: dict[str, ChannelAffine]) -> Iterator[None]:
    """Apply ``corrections`` (layer name -> `ChannelAffine`) to the outputs of ``model``'s CIM layers while open."""
    layers = dict(cim_layers(model))
    unknown = sorted(set(corrections) - set(layers))
    if unknown:
        raise ValueError(f"channel_affine: {unknown} are not CIM layers of the model")

    def hook_for(correction: ChannelAffine):
        def hook(_module, _inputs, output):
            return output * _view(correction.gain, output) + _view(correction.offset, output)
        return hook

    handles = [layers[name].register_forward_hook(hook_for(correction)) for name, correction in corrections.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def fit_chip_calibration(model: nn.Module, batches: Sequence[torch.Tensor],
                         target: dict[str, ChannelStatistics]) -> dict[str, ChannelAffine]:
    """The per-channel corrections that map ``model``'s outputs (the chip: its device mode set by the caller) to the
    statistics ``target`` (`output_statistics` of the ideal network on the same ``batches``).

    Layers are fitted one after another in network order, each measured with the corrections of the layers
    before it applied (one forward pass over ``batches`` per layer, stopped after that layer). A channel gets
    ``gain = std_ideal / std_chip`` (1 where the chip's output does not vary) and ``offset = mean_ideal - gain *
    mean_chip``; on ideal cells the chip is the ideal network and every correction is exactly the identity.
    """
    corrections: dict[str, ChannelAffine] = {}
    for name, _ in cim_layers(model):
        if name not in target:
            raise ValueError(f"fit_chip_calibration: no target statistics for layer {name!r}")
        with channel_affine(model, corrections):
            chip = output_statistics(model, batches, [name])[name]
        ideal = target[name]
        varies = chip.std > _STD_FLOOR
        ones = torch.ones_like(chip.std)
        gain = torch.where(varies, ideal.std / torch.where(varies, chip.std, ones), ones)  # x / x is exactly 1
        offset = ideal.mean - gain * chip.mean
        corrections[name] = ChannelAffine(gain, offset)
    return corrections
