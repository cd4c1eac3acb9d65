"""The export format, version 1: what a directory holds and what each layer's mapping says.

An export is a directory of two files:

* ``manifest.json``: format name and version, the macro (`CIMSpec`), the graph in execution order, and per
  layer its mapping onto arrays (which unrolled rows and output columns each tile holds), its input cycles,
  weight slices and ADC settings (README, "Export for deployment", documents every field);
* ``model.safetensors``: the integers and scales, named ``<layer>.<field>`` (`expected_tensors`).

The descriptive parts of a layer entry (mapping, cycles, slices) are a function of the layer's `CIMSpec` and
shape: the writer and the reader both call `layer_layout`, so a manifest that disagrees with its own spec is
rejected instead of executed.
"""

from __future__ import annotations

import torch

from cimq_pl.errors import ConfigError
from cimq_pl.quant.tiling import TileGeometry

FORMAT_NAME = "cimq-pl-export"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
TENSORS_FILE = "model.safetensors"

CIM_LAYER_OPS = ("cim_conv2d", "cim_linear")
DIGITAL_LAYER_OPS = ("conv2d", "linear")
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64)


class ExportError(ConfigError):
    """A malformed or mismatched export; the message names the directory, the field or tensor and what is expected."""


def pair(value) -> list:
    """``[h, w]`` from an int or a pair (kernel sizes, strides, paddings), as JSON-ready list."""
    return list(value) if isinstance(value, (tuple, list)) else [value, value]


def smallest_int_dtype(low: int, high: int) -> torch.dtype:
    """The narrowest signed integer dtype holding every value in [low, high]."""
    for dtype in INT_DTYPES:
        info = torch.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return dtype
    raise ExportError(f"integer range [{low}, {high}] does not fit in int64")


def layer_layout(geometry: TileGeometry, input_signed: bool) -> dict:
    """The array mapping, input cycles and weight slices of one CIM layer, as JSON-ready plain types.

    * ``mapping.tiles``: tile t = (group, row_block, col_block) in that order (row block before column block);
      its wordline ``i`` holds unrolled row ``row_blocks[r][0] + i`` of the group's weight matrix (unrolled row
      = c * k_h * k_w + y * k_w + x, PyTorch's ``weight.flatten(1)`` order) and its bitline
      ``o * n_slices + s`` holds slice s of output column ``group * out_channels_per_group + col_blocks[c][0] + o``;
      with offset slicing the bitline after the weights is the reference column.
    * ``cycles``: input cycle j feeds the digit ``(code >> shift) & (2^bits - 1)``, shift-added with ``weight``.
    * ``slices``: a weight code is ``sum_s weight_s * cell_s`` (offset slicing: minus the reference column's
      ``reference_digit * weight`` of the top slice, i.e. the code + 2^(b_w-1) offset).
    """
    geo = geometry
    row_blocks = [[start, size] for start, size in zip(geo.row_block_starts, geo.row_block_sizes)]
    col_blocks, start = [], 0
    for size in geo.col_block_sizes:
        col_blocks.append([start, size])
        start += size
    tiles = []
    for group in range(geo.groups):
        for row_block in range(geo.n_row_blocks):
            for col_block in range(geo.n_col_blocks):
                bitlines = col_blocks[col_block][1] * geo.n_weight_slices + geo.reference_columns_per_array
                tiles.append({"group": group, "row_block": row_block, "col_block": col_block,
                              "wordlines": row_blocks[row_block][1], "bitlines": bitlines})
    digit_bits, cycle_weights = geo.input_cycles(input_signed)
    cycles = [{"shift": shift, "bits": bits, "weight": weight}
              for shift, bits, weight in zip(geo.input_digit_shifts(input_signed), digit_bits, cycle_weights)]
    slices = [{"shift": shift, "bits": bits, "weight": weight, "signed": signed}
              for shift, bits, weight, signed in zip(geo.slice_shifts(), geo.slice_bits, geo.slice_weights(),
                                                     geo.slice_signed())]
    return {
        "mapping": {
            "rows_per_array": geo.rows,
            "cols_per_array": geo.cols,
            "groups": geo.groups,
            "out_channels_per_group": geo.out_channels_per_group,
            "unrolled_rows": geo.unrolled_rows,
            "row_split": geo.row_split,
            "row_blocks": row_blocks,
            "col_blocks": col_blocks,
            "tiles": tiles,
        },
        "cycles": cycles,
        "slices": slices,
        "reference_digit": geo.offset_reference_digit() if geo.reference_columns_per_array else 0,
    }


def adc_threshold_count(adc_bits: int) -> int:
    """Comparator thresholds of a b-bit ADC: 2^b codes need 2^b - 1 of them."""
    return 2**adc_bits - 1


def expected_tensors(name: str, entry: dict) -> dict:
    """``{tensor name: (shape, "int" | "float")}`` that ``model.safetensors`` must hold for layer ``name``.

    A shape entry of -1 is free (the length of the input code set).
    """
    if entry["op"] in DIGITAL_LAYER_OPS:
        shapes = {"weight": (tuple(entry["weight_shape"]), "float")}
    else:
        mapping = entry["mapping"]
        n_tiles = len(mapping["tiles"])
        n_row_blocks = len(mapping["row_blocks"])
        shapes = {
            "cells": ((n_tiles, mapping["rows_per_array"], mapping["cols_per_array"]), "int"),
            "weight_scale": ((mapping["groups"], n_row_blocks, mapping["out_channels_per_group"]), "float"),
            "input_scale": ((1,), "float"),
            "input_codes": ((-1,), "int"),
        }
        adc = entry["adc"]
        if adc is not None:
            settings = adc["settings"]
            shapes.update({
                "adc_setting": ((n_tiles, mapping["cols_per_array"]), "int"),
                "adc_thresholds": ((settings, adc_threshold_count(adc["bits"])), "int"),
                "adc_code_min": ((settings,), "int"),
                "adc_scale": ((settings,), "float"),
            })
    if entry["bias"]:
        shapes["bias"] = ((entry["out_channels"],), "float")
    return {f"{name}.{field}": spec for field, spec in shapes.items()}


__all__ = [
    "CIM_LAYER_OPS",
    "DIGITAL_LAYER_OPS",
    "ExportError",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "TENSORS_FILE",
    "adc_threshold_count",
    "expected_tensors",
    "layer_layout",
    "pair",
    "smallest_int_dtype",
]
