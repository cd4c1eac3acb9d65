"""TileGeometry: the array mapping numbers, worked out by hand."""

import pytest

from cimq_pl.quant import CIMSpec, TileGeometry


@pytest.mark.parametrize(
    ("cin", "cout", "row_blocks", "block_rows"),
    [
        (16, 16, 2, (126, 18)),  # 128 // 9 = 14 channels per array: 14 + 2 channels
        (32, 64, 3, (126, 126, 36)),  # 14 + 14 + 4 channels
        (64, 64, 5, (126, 126, 126, 126, 72)),  # 4 x 14 + 8 channels
    ],
)
def test_kernel_split_of_resnet20_shapes(cin, cout, row_blocks, block_rows):
    geo = TileGeometry.from_layer(CIMSpec(), cin, cout, (3, 3))
    assert geo.n_row_blocks == row_blocks
    assert geo.row_block_sizes == block_rows
    assert geo.channels_per_row_block == 14
    assert geo.n_col_blocks == 1
    assert geo.arrays_used == row_blocks
    assert geo.n_cycles(signed=False) == 4 and geo.n_cycles(signed=True) == 4


def test_dense_split_slices_and_reference_columns():
    spec = CIMSpec(rows=100, cols=10, weight_bits=8, cell_bits=3, weight_slicing="offset", row_split="dense",
                   input_bits=6, dac_bits=4)
    geo = TileGeometry.from_layer(spec, 32, 20, (3, 3), groups=2)
    assert geo.unrolled_rows == 16 * 9 == 144
    assert geo.row_block_sizes == (100, 44)
    assert geo.slice_bits == (3, 3, 2) and geo.n_weight_slices == 3
    assert geo.slice_weights() == (1, 8, 64)
    assert geo.reference_columns_per_array == 1
    assert geo.weight_columns_per_array == (10 - 1) // 3 == 3
    assert geo.n_col_blocks == 4  # 10 columns per group / 3
    assert geo.arrays_used == 2 * 2 * 4
    assert geo.offset_reference_digit() == 2 ** (8 - 1 - 6) == 2
    assert geo.input_cycles(signed=False) == ((4, 2), (1, 16))
    assert geo.input_cycles(signed=True) == ((4, 1, 1), (1, 16, -32))  # 5 magnitude bits + sign cycle
    parts = geo.row_block_parts()
    assert [p.row_blocks for p in parts] == [(0,), (1,)]
    # block 0 holds rows 0..99: channels 0..11 (channel 11 rows 99 only partly: kernel offset 0)
    assert parts[0].channel_index[0] == tuple(range(12))
    assert parts[0].row_mask[0][11] == (True,) + (False,) * 8
    assert parts[1].channel_index[0][0] == 11 and parts[1].row_mask[0][0] == (False,) + (True,) * 8


def test_kernel_split_falls_back_to_dense_when_kernel_exceeds_rows():
    geo = TileGeometry.from_layer(CIMSpec(rows=4), 2, 2, (3, 3))
    assert geo.row_split == "dense" and geo.row_block_sizes == (4, 4, 4, 4, 2)


def test_float_weights_and_too_narrow_arrays():
    geo = TileGeometry.from_layer(CIMSpec(weight_bits=None, cols=3), 4, 7)
    assert geo.n_weight_slices == 1 and geo.n_col_blocks == 3 and geo.reference_columns_per_array == 0
    with pytest.raises(ValueError, match="cols=3 is too small"):
        TileGeometry.from_layer(CIMSpec(cols=3, weight_bits=4, cell_bits=1), 4, 7)
    with pytest.raises(ValueError, match="divisible by groups"):
        TileGeometry.from_layer(CIMSpec(), 4, 6, groups=4)
