"""Array mapping of one layer: all geometry maths of the package lives here.

A conv weight (C_out, C_in / groups, k_h, k_w) unrolls, per conv group, to a matrix of
``C_in/groups * k_h * k_w`` rows (wordlines) x ``C_out/groups`` columns (bitlines); unrolled row
``i = c * k_h * k_w + y * k_w + x`` holds input channel ``c`` (local to its group) at kernel offset ``(y, x)``,
which is PyTorch's ``weight.flatten(1)`` order. Linear layers are the k = 1 case. Each conv group is mapped on
arrays of its own (a depthwise conv therefore uses one column per array: a documented waste).

The matrix is tiled into row blocks r = 0..n_row_blocks-1 and column blocks c = 0..n_col_blocks-1; each tile
(g, r, c) is one R x C array. A weight spans ``n_weight_slices`` adjacent cell columns of the same array, and
with offset slicing every array also spends one column on the reference column, so an array holds
``weight_columns_per_array = floor((cols - reference_columns_per_array) / n_weight_slices)`` output columns.

Cost models and exporters must read geometry from `TileGeometry` only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from cimq_pl.quant.spec import CIMSpec


@dataclass(frozen=True)
class RowBlockPart:
    """Row blocks that hold the same number of input-channel slots, simulated by one grouped convolution.

    Attributes:
        row_blocks: indices r of the row blocks in this part.
        channel_slots: input channels (slots) each block reads, padding included.
        channel_index: per block, per slot, the group-local input channel, -1 for a padding slot;
            nested tuples of shape (len(row_blocks), channel_slots).
        row_mask: per block, per slot, per kernel offset, whether that unrolled row sits on this block;
            nested tuples of shape (len(row_blocks), channel_slots, k_h * k_w).
    """

    row_blocks: tuple
    channel_slots: int
    channel_index: tuple
    row_mask: tuple

    @property
    def needs_padding(self) -> bool:
        """Whether some slot is padding (a zero input channel)."""
        return any(c < 0 for block in self.channel_index for c in block)

    def channel_index_tensor(self) -> torch.Tensor:
        """(blocks, slots) int64 tensor of group-local channels, -1 for padding."""
        return torch.tensor(self.channel_index, dtype=torch.long)

    def row_mask_tensor(self) -> torch.Tensor:
        """(blocks, slots, k_h * k_w) bool tensor: whether the unrolled row belongs to the block."""
        return torch.tensor(self.row_mask, dtype=torch.bool)


@dataclass(frozen=True)
class TileGeometry:
    """How one layer maps onto crossbar arrays (SPEC section 2).

    Build it with `TileGeometry.from_layer`. Counts are per conv group unless the name says otherwise.

    Attributes:
        rows: wordlines per array.
        cols: bitlines (cell columns) per array.
        groups: conv groups; each group is mapped on arrays of its own.
        in_channels_per_group: input channels of one group.
        out_channels_per_group: output channels (logical columns) of one group.
        kernel_size: (k_h, k_w); (1, 1) for linear layers.
        unrolled_rows: rows of one group's unrolled weight matrix (in_channels_per_group * k_h * k_w).
        row_split: the row split actually used (``"kernel"`` falls back to ``"dense"`` when k_h*k_w > rows).
        channels_per_row_block: whole input channels per array with the kernel split, None with dense.
        row_block_sizes: unrolled rows held by each row block.
        n_row_blocks: row blocks (arrays stacked along the rows) per group.
        weight_bits: weight code bits, None for float weights.
        cell_bits: bits per cell (resolved), None for float weights.
        slice_bits: bits held by each weight slice, least significant first.
        n_weight_slices: cell columns per weight, ceil(weight_bits / cell_bits); 1 for float weights.
        weight_slicing: ``"twos_complement"`` or ``"offset"``.
        reference_columns_per_array: 1 with offset slicing of quantized weights, else 0.
        weight_columns_per_array: output columns one array holds.
        n_col_blocks: column blocks per group, ceil(out_channels_per_group / weight_columns_per_array).
        arrays_used: arrays of the whole layer, groups * n_row_blocks * n_col_blocks.
        input_bits: input code bits, None for float inputs.
        dac_bits: input bits per cycle.
    """

    rows: int
    cols: int
    groups: int
    in_channels_per_group: int
    out_channels_per_group: int
    kernel_size: tuple
    unrolled_rows: int
    row_split: str
    channels_per_row_block: Optional[int]
    row_block_sizes: tuple
    n_row_blocks: int
    weight_bits: Optional[int]
    cell_bits: Optional[int]
    slice_bits: tuple
    n_weight_slices: int
    weight_slicing: str
    reference_columns_per_array: int
    weight_columns_per_array: int
    n_col_blocks: int
    arrays_used: int
    input_bits: Optional[int]
    dac_bits: int

    @classmethod
    def from_layer(
        cls,
        spec: CIMSpec,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple = (1, 1),
        groups: int = 1,
    ) -> "TileGeometry":
        """Compute the mapping of a conv (or linear, ``kernel_size=(1, 1)``) layer on ``spec``'s arrays.

        Args:
            spec: the macro.
            in_channels: input channels (input features of a linear layer).
            out_channels: output channels (output features).
            kernel_size: (k_h, k_w).
            groups: conv groups.

        Raises:
            ValueError: when channels are not divisible by groups, or an array is too narrow to hold one
                weight's slices (and the reference column).
        """
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels={in_channels} and out_channels={out_channels} must be divisible by groups={groups}"
            )
        kernel_h, kernel_w = kernel_size
        kernel_area = kernel_h * kernel_w
        cin_g, cout_g = in_channels // groups, out_channels // groups
        unrolled_rows = cin_g * kernel_area

        row_split = spec.row_split if kernel_area <= spec.rows else "dense"
        if row_split == "kernel":
            channels_per_block = spec.rows // kernel_area
            n_row_blocks = math.ceil(cin_g / channels_per_block)
            block_channels = [
                min(channels_per_block, cin_g - r * channels_per_block) for r in range(n_row_blocks)
            ]
            row_block_sizes = tuple(c * kernel_area for c in block_channels)
        else:
            channels_per_block = None
            n_row_blocks = math.ceil(unrolled_rows / spec.rows)
            row_block_sizes = tuple(
                min(spec.rows, unrolled_rows - r * spec.rows) for r in range(n_row_blocks)
            )

        weight_bits = spec.weight_bits
        if weight_bits is None:
            cell_bits, slice_bits, reference_columns = None, (), 0
        else:
            cell_bits = spec.effective_cell_bits
            n_slices = math.ceil(weight_bits / cell_bits)
            slice_bits = tuple(
                min(cell_bits, weight_bits - s * cell_bits) for s in range(n_slices)
            )
            reference_columns = 1 if spec.weight_slicing == "offset" else 0
        n_weight_slices = max(len(slice_bits), 1)
        weight_columns_per_array = (spec.cols - reference_columns) // n_weight_slices
        if weight_columns_per_array < 1:
            raise ValueError(
                f"CIMSpec.cols={spec.cols} is too small: one weight needs {n_weight_slices} cell columns "
                f"plus {reference_columns} reference column(s)"
            )
        n_col_blocks = math.ceil(cout_g / weight_columns_per_array)
        return cls(
            rows=spec.rows,
            cols=spec.cols,
            groups=groups,
            in_channels_per_group=cin_g,
            out_channels_per_group=cout_g,
            kernel_size=(kernel_h, kernel_w),
            unrolled_rows=unrolled_rows,
            row_split=row_split,
            channels_per_row_block=channels_per_block,
            row_block_sizes=row_block_sizes,
            n_row_blocks=n_row_blocks,
            weight_bits=weight_bits,
            cell_bits=cell_bits,
            slice_bits=slice_bits,
            n_weight_slices=n_weight_slices,
            weight_slicing=spec.weight_slicing,
            reference_columns_per_array=reference_columns,
            weight_columns_per_array=weight_columns_per_array,
            n_col_blocks=n_col_blocks,
            arrays_used=groups * n_row_blocks * n_col_blocks,
            input_bits=spec.input_bits,
            dac_bits=spec.dac_bits,
        )

    # ---------------------------------------------------------------- derived sizes
    @property
    def kernel_area(self) -> int:
        """k_h * k_w (rows one input channel occupies)."""
        return self.kernel_size[0] * self.kernel_size[1]

    @property
    def row_block_starts(self) -> tuple:
        """First unrolled row of each row block."""
        starts, acc = [], 0
        for size in self.row_block_sizes:
            starts.append(acc)
            acc += size
        return tuple(starts)

    @property
    def col_block_sizes(self) -> tuple:
        """Output columns held by each column block."""
        per = self.weight_columns_per_array
        cout = self.out_channels_per_group
        return tuple(min(per, cout - c * per) for c in range(self.n_col_blocks))

    @property
    def reference_columns(self) -> int:
        """Reference columns of the whole layer (one per array with offset slicing)."""
        return self.arrays_used * self.reference_columns_per_array

    @property
    def cells_used(self) -> int:
        """Cells holding weights or reference values over the whole layer (weight cells + reference cells)."""
        weight_cells = self.groups * self.unrolled_rows * self.out_channels_per_group * self.n_weight_slices
        reference_cells = self.groups * self.n_col_blocks * self.unrolled_rows * self.reference_columns_per_array
        return weight_cells + reference_cells

    @property
    def cell_utilization(self) -> float:
        """Fraction of the cells of the used arrays that hold weights or reference values."""
        return self.cells_used / (self.arrays_used * self.rows * self.cols)

    def slice_weights(self) -> tuple:
        """Shift-add weight 2^(s * cell_bits) of each weight slice, least significant first ((1,) for float)."""
        if not self.slice_bits:
            return (1,)
        return tuple(2 ** (s * self.cell_bits) for s in range(self.n_weight_slices))

    def offset_reference_digit(self) -> int:
        """Digit stored in the top slice of the reference column (offset slicing): 2^(b_w-1) >> top shift."""
        if self.weight_bits is None:
            return 0
        return 2 ** (self.weight_bits - 1 - (self.n_weight_slices - 1) * self.cell_bits)

    def input_cycles(self, signed: bool, input_bits: Optional[int] = None) -> tuple:
        """Digit widths (bits) and shift-add weights of the input cycles, least significant first.

        Args:
            signed: whether input codes are two's-complement signed. The sign bit is then fed in a cycle of
                its own, last, with weight -2^(b_a - 1).
            input_bits: override of ``self.input_bits`` (None keeps it).

        Returns:
            ``(digit_bits, cycle_weights)``: two tuples of ints, one entry per cycle. Float inputs
            (input bits None) give ``((), (1,))``: one cycle feeding the float value.
        """
        bits = self.input_bits if input_bits is None else input_bits
        if bits is None:
            return (), (1,)
        magnitude_bits = bits - 1 if signed else bits
        digit_bits, weights, shift = [], [], 0
        while shift < magnitude_bits:
            width = min(self.dac_bits, magnitude_bits - shift)
            digit_bits.append(width)
            weights.append(2**shift)
            shift += width
        if signed:
            digit_bits.append(1)
            weights.append(-(2 ** (bits - 1)))
        return tuple(digit_bits), tuple(weights)

    def input_digit_shifts(self, signed: bool, input_bits: Optional[int] = None) -> tuple:
        """Lowest code bit read by each input cycle (same order as `input_cycles`); the sign cycle reads bit b_a - 1.

        Cycle j feeds the digit ``(code >> shift_j) & (2^digit_bits_j - 1)`` of the two's-complement code.
        """
        bits = self.input_bits if input_bits is None else input_bits
        digit_bits, _ = self.input_cycles(signed, bits)
        shifts, shift = [], 0
        for width in digit_bits[: len(digit_bits) - int(signed)]:
            shifts.append(shift)
            shift += width
        if signed:
            shifts.append(bits - 1)
        return tuple(shifts)

    def slice_shifts(self) -> tuple:
        """Lowest code bit held by each weight slice, least significant first ((0,) for float weights)."""
        return tuple(s * (self.cell_bits or 0) for s in range(self.n_weight_slices))

    def slice_signed(self) -> tuple:
        """Whether each weight slice holds a signed digit: the top slice of two's-complement slicing only."""
        top = self.n_weight_slices - 1
        return tuple(self.weight_slicing == "twos_complement" and s == top for s in range(self.n_weight_slices))

    def n_cycles(self, signed: bool = False) -> int:
        """Input cycles per inference: ceil(b_a/b_d) unsigned, 1 + ceil((b_a-1)/b_d) signed, 1 for float."""
        return len(self.input_cycles(signed)[1])

    # ---------------------------------------------------------------- index maps
    def row_block_of_row(self) -> torch.Tensor:
        """(unrolled_rows,) int64: the row block of each unrolled row of a group."""
        return torch.repeat_interleave(
            torch.arange(self.n_row_blocks), torch.tensor(self.row_block_sizes)
        )

    def col_block_of_column(self) -> torch.Tensor:
        """(out_channels_per_group,) int64: the column block of each output column of a group."""
        return torch.arange(self.out_channels_per_group) // self.weight_columns_per_array

    def row_block_parts(self) -> tuple:
        """Row blocks grouped into `RowBlockPart`s simulated by one grouped convolution each.

        Blocks holding ``rows`` unrolled rows (or ``channels_per_row_block`` channels) form one part, padded to
        the largest number of channels any of them touches; a ragged last block forms a second part, so at
        most two convolutions per layer are issued, whatever the number of arrays.
        """
        area = self.kernel_area
        starts = self.row_block_starts
        spans = []
        for r, (start, size) in enumerate(zip(starts, self.row_block_sizes)):
            first_channel, last_channel = start // area, (start + size - 1) // area
            spans.append((r, start, size, first_channel, last_channel))
        full = [s for s in spans if s[2] == self.row_block_sizes[0]]
        ragged = [s for s in spans if s[2] != self.row_block_sizes[0]]
        parts = []
        for members in (full, ragged):
            if not members:
                continue
            slots = max(last - first + 1 for _, _, _, first, last in members)
            channel_index, row_mask = [], []
            for _, start, size, first, last in members:
                channels = [first + s if first + s <= last else -1 for s in range(slots)]
                mask = []
                for channel in channels:
                    rows_of_channel = range(channel * area, channel * area + area) if channel >= 0 else ()
                    mask.append(
                        tuple(channel >= 0 and start <= row < start + size for row in rows_of_channel)
                        if channel >= 0
                        else (False,) * area
                    )
                channel_index.append(tuple(channels))
                row_mask.append(tuple(mask))
            parts.append(
                RowBlockPart(
                    row_blocks=tuple(m[0] for m in members),
                    channel_slots=slots,
                    channel_index=tuple(channel_index),
                    row_mask=tuple(row_mask),
                )
            )
        return tuple(parts)

    def describe(self) -> str:
        """One line: rows x cols of the unrolled matrix, blocks, slices and arrays."""
        return (
            f"{self.groups}x[{self.unrolled_rows}x{self.out_channels_per_group}] -> "
            f"{self.n_row_blocks}x{self.n_col_blocks} tiles ({self.row_split}), "
            f"{self.n_weight_slices} slice(s), {self.arrays_used} arrays of {self.rows}x{self.cols}"
        )
