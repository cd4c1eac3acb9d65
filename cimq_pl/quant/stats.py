"""`CIMStats`: accumulating hardware event counters of one CIM layer (inputs of the cost model, SPEC 5).

Counters only accumulate (``update``-style sums, torchmetrics habit); ratios are computed on read. Counters
that depend on data are 0-dim int64 tensors on the layer's device (no host sync in the forward pass); those
known from shapes are Python ints. `forward_counts` is what one forward pass of a CIM layer adds.
"""

from __future__ import annotations

from typing import Union

import torch

from cimq_pl.quant.ste import popcount

Counter = Union[int, torch.Tensor]

COUNTER_NAMES = (
    "images",
    "output_positions",
    "macs",
    "input_bits_fed",
    "input_ones_fed",
    "wordline_activations",
    "adc_conversions",
    "psum_clipped",
)


class CIMStats:
    """Event counters of one CIM layer, accumulated over forward passes while ``layer.collect_stats`` is True.

    Attributes:
        images: images (samples along the batch dimension) processed, count.
        output_positions: output positions processed (images x H_out x W_out; images x leading positions for
            linear layers), count.
        macs: multiply-accumulates of the original layer (positions x C_out x C_in/groups x k_h x k_w), count;
            independent of cycles and slices.
        input_bits_fed: input bits applied to wordlines, bits: unrolled rows (all groups, zero-padding rows
            included) x output positions x b_a. 0 while inputs are float.
        input_ones_fed: 1 bits among ``input_bits_fed``, bits: each 1 bit of an input code counted once per
            unrolled row it sits on, per output position (a pixel under k x k kernel offsets counts up to
            k^2 times), over all cycles; the sign bit of a signed code counts as a bit.
        wordline_activations: wordline drives by a 1 bit, events: ``input_ones_fed`` x n_col_blocks (a row's
            input is broadcast to every column-block array of its row block). Weight slices sit in adjacent
            columns of the same arrays, so they add no wordline activations.
        adc_conversions: ADC conversions, events: output positions x (groups x n_row_blocks) x (columns read
            per row block: C_out/groups x n_weight_slices + reference columns) x n_cycles. Counted with an
            ideal or disabled ADC too (the hardware still converts).
        psum_clipped: partial sums outside the ADC range (|p / step| beyond the extreme codes), count. Only
            counted while the ADC quantizer is enabled and initialised.
        arrays_used: crossbar arrays the layer occupies (geometry, not accumulated).
    """

    def __init__(self, arrays_used: int = 0) -> None:
        self.arrays_used = arrays_used
        self.reset()

    def reset(self) -> None:
        """Zero every counter."""
        for name in COUNTER_NAMES:
            setattr(self, name, 0)

    def add(self, **counts: Counter) -> None:
        """Accumulate counts given by counter name."""
        for name, value in counts.items():
            if name not in COUNTER_NAMES:
                raise KeyError(f"unknown counter {name!r}: expected one of {list(COUNTER_NAMES)}")
            setattr(self, name, getattr(self, name) + value)

    @property
    def input_bit_density(self) -> float:
        """input_ones_fed / input_bits_fed (0 when no bits were fed)."""
        bits = int(self.input_bits_fed)
        return float(self.input_ones_fed) / bits if bits else 0.0

    @property
    def psum_clip_rate(self) -> float:
        """psum_clipped / adc_conversions (0 when nothing was converted)."""
        conversions = int(self.adc_conversions)
        return float(self.psum_clipped) / conversions if conversions else 0.0

    def as_dict(self) -> dict:
        """Counters as Python numbers, plus ``arrays_used``, ``input_bit_density`` and ``psum_clip_rate``."""
        out = {name: int(getattr(self, name)) for name in COUNTER_NAMES}
        out.update(
            arrays_used=self.arrays_used,
            input_bit_density=self.input_bit_density,
            psum_clip_rate=self.psum_clip_rate,
        )
        return out

    def __repr__(self) -> str:
        return f"CIMStats({self.as_dict()})"


@torch.no_grad()
def forward_counts(layer, x, codes, input_quantizer, psums, clipped, n_images: int, positions_per_image: int) -> dict:
    """The counts one forward pass of a CIM layer adds to its `CIMStats` (keywords of `CIMStats.add`).

    Args:
        layer: the `CIMConv2d`/`CIMLinear` that ran (its geometry, output channels, kernel and ``_conv``).
        x: the layer's 4-D input (for dtype and device).
        codes: the input codes, or None while inputs are float.
        input_quantizer: the input quantizer when inputs were quantized, else None (no input-bit counts).
        psums: the partial-sum tensors of the forward pass (one per row-block part).
        clipped: partial sums beyond the ADC range (a tensor, or 0 when not counted).
        n_images: images in the batch.
        positions_per_image: output positions per image (H_out x W_out).
    """
    geo = layer.geometry
    positions = n_images * positions_per_image
    counts = dict(
        images=n_images,
        output_positions=positions,
        macs=positions * layer.out_channels * geo.unrolled_rows,
        adc_conversions=sum(p.numel() for p in psums),
        psum_clipped=clipped,
    )
    if input_quantizer is not None:
        qmin, qmax = input_quantizer.code_range
        integer = torch.clamp(torch.floor(codes), qmin, qmax)
        ones_map = popcount(integer, input_quantizer.bits).sum(1, keepdim=True).to(x.dtype)
        kernel = torch.ones(1, 1, *layer.kernel_size, dtype=x.dtype, device=x.device)
        ones = layer._conv(ones_map, kernel, 1).sum().round().to(torch.long)
        counts.update(
            input_bits_fed=geo.groups * geo.unrolled_rows * positions * input_quantizer.bits,
            input_ones_fed=ones,
            wordline_activations=ones * geo.n_col_blocks,
        )
    return counts
