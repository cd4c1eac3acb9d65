"""`CIMSpec`: the one description of a computing-in-memory macro (SPEC section 2).

Every geometry or bit-width question in the package is answered from a `CIMSpec` (and, for a given layer,
from the `TileGeometry` computed from it in `tiling.py`). Field types are plain so jsonargparse can build a
spec from YAML or the command line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Optional

from cimq_pl.errors import ConfigError

MIN_BITS = 1
MAX_BITS = 16

RowSplit = Literal["kernel", "dense"]
WeightSlicing = Literal["twos_complement", "offset"]
EdgeLayerMode = Literal["cim", "int8", "digital"]

ROW_SPLITS = ("kernel", "dense")
WEIGHT_SLICINGS = ("twos_complement", "offset")
EDGE_LAYER_MODES = ("cim", "int8", "digital")


@dataclass(frozen=True)
class CIMSpec:
    """Crossbar macro and bit-widths of a CIM accelerator.

    A bit-width of ``None`` leaves that quantity unquantized: float weights (``weight_bits``), float inputs fed
    in a single cycle (``input_bits``) or an ideal ADC (``adc_bits``). ``CIMSpec(weight_bits=None,
    input_bits=None, adc_bits=None)`` is therefore a pure tiling of the original layer.

    Attributes:
        rows: wordlines per crossbar array (rows of the unrolled weight matrix one array holds).
        cols: bitlines per crossbar array (cell columns).
        weight_bits: signed weight code bits b_w, or None for float weights.
        cell_bits: bits stored per cell b_c; a weight spans ceil(b_w / b_c) cell columns (weight slices), each
            read by its own ADC and shift-added. None means ``cell_bits = weight_bits`` (one slice).
        input_bits: activation code bits b_a fed to the wordlines, or None for float inputs.
        dac_bits: input bits applied per cycle b_d; 1 is bit-serial. Unsigned inputs take
            ceil(b_a / b_d) cycles; signed inputs feed their two's-complement sign bit in a cycle of its own
            (weighted -2^(b_a-1)) and the b_a - 1 magnitude bits in ceil((b_a - 1) / b_d) cycles.
        adc_bits: ADC resolution b_p for every partial sum, or None for an ideal ADC.
        row_split: how unrolled rows are split into row blocks. ``"kernel"``: each array holds
            floor(rows / k^2) whole input channels (all k x k kernel rows of a channel in one array,
            NeuroSim practice); falls back to ``"dense"`` when k^2 > rows. ``"dense"``: contiguous blocks of
            ``rows`` unrolled rows, a channel's kernel may straddle two arrays.
        weight_slicing: how signed weight codes are stored when they span several cell slices.
            ``"twos_complement"``: the b_w-bit two's-complement code is cut into b_c-bit digits; the lower
            slices hold unsigned digits, the top slice holds the remaining bits as a signed digit (its top bit
            weighted negatively), so q = sum_s 2^(s*b_c) d_s exactly. ``"offset"``: offset binary
            u = q + 2^(b_w-1) is cut into unsigned digits, and one reference column per array stores the
            offset's digit in the top slice; its ADC reading is subtracted digitally.
        first_layer: mapping of the first eligible layer of a model: ``"cim"`` (like any other layer),
            ``"int8"`` (on the arrays at 8-bit weights and 8-bit inputs, one cell slice, ideal ADC, as QDrop
            and BRECQ keep the first and last layers at 8 bits) or ``"digital"`` (left as the float layer).
        last_layer: same as ``first_layer`` for the last eligible layer (the classifier).

    Raises:
        ConfigError (a ValueError): when a field is out of range; the message names the field, the bad value and the
            allowed range.
    """

    rows: int = 128
    cols: int = 128
    weight_bits: Optional[int] = 4
    cell_bits: Optional[int] = None
    input_bits: Optional[int] = 4
    dac_bits: int = 1
    adc_bits: Optional[int] = 4
    row_split: RowSplit = "kernel"
    weight_slicing: WeightSlicing = "twos_complement"
    first_layer: EdgeLayerMode = "cim"
    last_layer: EdgeLayerMode = "cim"

    def __post_init__(self) -> None:
        for name in ("rows", "cols"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"CIMSpec.{name}={value!r} is invalid: expected an integer >= 1")
        for name in ("weight_bits", "cell_bits", "input_bits", "adc_bits"):
            _check_bits(name, getattr(self, name), optional=True)
        _check_bits("dac_bits", self.dac_bits, optional=False)
        if self.cell_bits is not None:
            if self.weight_bits is None:
                raise ConfigError(
                    f"CIMSpec.cell_bits={self.cell_bits!r} is invalid with weight_bits=None: expected None "
                    "(float weights are not sliced into cells)"
                )
            if self.cell_bits > self.weight_bits:
                raise ConfigError(
                    f"CIMSpec.cell_bits={self.cell_bits!r} is invalid: expected 1 <= cell_bits <= "
                    f"weight_bits={self.weight_bits}"
                )
        if self.input_bits is not None and self.dac_bits > self.input_bits:
            raise ConfigError(
                f"CIMSpec.dac_bits={self.dac_bits!r} is invalid: expected 1 <= dac_bits <= "
                f"input_bits={self.input_bits}"
            )
        _check_choice("row_split", self.row_split, ROW_SPLITS)
        _check_choice("weight_slicing", self.weight_slicing, WEIGHT_SLICINGS)
        _check_choice("first_layer", self.first_layer, EDGE_LAYER_MODES)
        _check_choice("last_layer", self.last_layer, EDGE_LAYER_MODES)

    @property
    def effective_cell_bits(self) -> Optional[int]:
        """Bits per cell after resolving ``cell_bits=None`` to ``weight_bits`` (None for float weights)."""
        return self.cell_bits if self.cell_bits is not None else self.weight_bits

    def replace(self, **changes) -> "CIMSpec":
        """Return a validated copy with ``changes`` applied (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    def int8(self) -> "CIMSpec":
        """The spec used for a layer mapped in ``"int8"`` mode: 8-bit weights in one slice, 8-bit inputs, ideal ADC.

        Array size, dac_bits, row split and slicing are kept.
        """
        return self.replace(weight_bits=8, cell_bits=None, input_bits=8, adc_bits=None)


def _check_bits(name: str, value, optional: bool) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_BITS <= value <= MAX_BITS:
        allowed = f"an integer in [{MIN_BITS}, {MAX_BITS}]" + (" or None (unquantized)" if optional else "")
        raise ConfigError(f"CIMSpec.{name}={value!r} is invalid: expected {allowed}")


def _check_choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"CIMSpec.{name}={value!r} is invalid: expected one of {list(allowed)}")
