"""The input Hessian of a CIM layer, ``H = X X^T / n``, from calibration data: GPTQ's statistic.

``X`` holds the layer's unrolled inputs (im2col, `torch.nn.functional.unfold`), one column per output position
of every image, per conv group: ``H`` has shape (groups, rows, rows) with rows = C_in/g x k_h x k_w ordered as
the weight's flattened (C_in/g, k_h, k_w) input dimension (the crossbar's unrolled rows, `TileGeometry`). The
inputs are the ones the layer's wordlines get: quantized by its input quantizer when that is enabled and
calibrated, else the float inputs.

`HessianAccumulator` is torchmetrics-shaped (state, ``update``, ``compute``); `collecting_hessians` fills one
per layer from forward pre-hooks while the caller runs the network. Memory: ``groups x rows^2`` float64 per layer
(ResNet-20's largest: 576^2 x 8 B = 2.6 MB); the products are taken in the input dtype on chunks of at most
``chunk_elements`` unrolled values and summed in float64.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["HessianAccumulator", "collecting_hessians", "unrolled_inputs"]


def unrolled_inputs(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The unrolled inputs of CIM ``layer`` for its input ``x``: (groups, rows, N x positions).

    Args:
        layer: a `CIMConv2d` or `CIMLinear` (its stride, padding and dilation are the layer's own).
        x: what the layer receives: (N, C_in, H, W), or (..., in_features) for a linear layer.
    """
    geo = layer.geometry
    if hasattr(layer, "in_features"):  # CIMLinear: (..., in_features) is N x 1 x 1 images
        x = x.reshape(-1, layer.in_channels, 1, 1)
    conv, extra = layer._conv_params(1)
    if extra is not None:
        x = F.pad(x, extra)
    columns = F.unfold(x, layer.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    n, _, positions = columns.shape
    columns = columns.view(n, geo.groups, geo.unrolled_rows, positions)
    return columns.permute(1, 2, 0, 3).reshape(geo.groups, geo.unrolled_rows, n * positions)


class HessianAccumulator:
    """Running ``sum x x^T`` and count of one CIM layer's unrolled (quantized) inputs.

    Args:
        layer: the CIM layer.
        chunk_elements: most unrolled input values materialised at once (memory bound of ``update``).

    Attributes:
        total: (groups, rows, rows) float64 sum of ``x x^T`` over the positions seen.
        count: positions seen (images x output positions).
    """

    def __init__(self, layer: nn.Module, chunk_elements: int = 2**24) -> None:
        geo = layer.geometry
        self.layer = layer
        self.chunk_elements = chunk_elements
        self.total = torch.zeros(geo.groups, geo.unrolled_rows, geo.unrolled_rows, dtype=torch.float64,
                                 device=layer.weight.device)
        self.count = 0

    def reset(self) -> None:
        self.total.zero_()
        self.count = 0

    def wordline_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as the layer's arrays see it: through its input quantizer when enabled and calibrated."""
        quantizer = self.layer.input_quantizer
        if quantizer is not None and quantizer.enabled and quantizer.initialized and not quantizer.observe:
            return quantizer(x)
        return x

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Add the layer input ``x`` (what its forward receives, float) to the sums."""
        x = self.wordline_inputs(x.detach())
        if hasattr(self.layer, "in_features"):
            x = x.reshape(-1, self.layer.in_channels, 1, 1)
        per_image = max(1, x[0].numel() * self.layer.geometry.kernel_area)
        for chunk in x.split(max(1, self.chunk_elements // per_image)):
            columns = unrolled_inputs(self.layer, chunk)
            self.total += torch.bmm(columns, columns.transpose(1, 2)).to(torch.float64)
            self.count += columns.shape[-1]

    def compute(self) -> torch.Tensor:
        """``H = X X^T / n``, (groups, rows, rows) float64.

        Raises:
            RuntimeError: when the layer saw no input.
        """
        if self.count == 0:
            raise RuntimeError(f"no input reached {type(self.layer).__name__} {self.layer.geometry.describe()}: "
                               "it did not run in the forward passes")
        return self.total / self.count


@contextlib.contextmanager
def collecting_hessians(layers: Mapping[str, nn.Module]) -> Iterator[dict[str, HessianAccumulator]]:
    """Accumulate the input Hessian of every layer in ``layers`` (name -> CIM layer) over the forward passes
    run inside the block; yields ``{name: HessianAccumulator}``. The hooks are removed on exit."""
    accumulators = {name: HessianAccumulator(layer) for name, layer in layers.items()}
    handles = [
        layer.register_forward_pre_hook(lambda _module, args, acc=accumulators[name]: acc.update(args[0]))
        for name, layer in layers.items()
    ]
    try:
        yield accumulators
    finally:
        for handle in handles:
            handle.remove()
