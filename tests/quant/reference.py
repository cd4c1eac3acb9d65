"""Slow, obviously-correct float64 reference of a CIM conv layer (SPEC section 3).

Loops over conv groups, row blocks, column blocks, input cycles and weight slices; every bit is extracted
with integer shifts. It recomputes the tiling from the spec on its own (it does not use `TileGeometry`), and
takes from the layer only the learned numbers: input step and sign, per-(group, row block, column) weight
steps and the ADC clip values (per layer, array or column).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _row_blocks(spec, cin_g: int, kernel_area: int) -> list:
    """List of unrolled-row index lists, one per row block."""
    rows = cin_g * kernel_area
    if spec.row_split == "kernel" and kernel_area <= spec.rows:
        per = spec.rows // kernel_area
        return [
            list(range(c0 * kernel_area, min(c0 + per, cin_g) * kernel_area)) for c0 in range(0, cin_g, per)
        ]
    return [list(range(r0, min(r0 + spec.rows, rows))) for r0 in range(0, rows, spec.rows)]


def _input_cycles(codes: torch.Tensor, bits: int, dac_bits: int, signed: bool) -> list:
    """[(weight, digit tensor)] least significant first, from the two's-complement bit pattern."""
    pattern = torch.remainder(codes.to(torch.int64), 2**bits)
    bit = [(pattern >> k) & 1 for k in range(bits)]
    magnitude_bits = bits - 1 if signed else bits
    cycles = []
    for start in range(0, magnitude_bits, dac_bits):
        digit = sum(bit[k] * 2 ** (k - start) for k in range(start, min(start + dac_bits, magnitude_bits)))
        cycles.append((2**start, digit.double()))
    if signed:
        cycles.append((-(2 ** (bits - 1)), bit[bits - 1].double()))
    return cycles


def _weight_slices(q: torch.Tensor, bits: int, cell_bits: int, slicing: str) -> tuple:
    """([(shift weight, digit tensor)], reference digit)."""
    n = math.ceil(bits / cell_bits)
    q = q.to(torch.int64)
    if slicing == "offset":
        u = q + 2 ** (bits - 1)
        slices = [(2 ** (s * cell_bits), ((u >> (s * cell_bits)) & (2**cell_bits - 1)).double()) for s in range(n)]
        return slices, 2 ** (bits - 1 - (n - 1) * cell_bits)
    u = torch.remainder(q, 2**bits)
    slices, lower = [], torch.zeros_like(q)
    for s in range(n - 1):
        digit = (u >> (s * cell_bits)) & (2**cell_bits - 1)
        lower = lower + digit * 2 ** (s * cell_bits)
        slices.append((2 ** (s * cell_bits), digit.double()))
    top_shift = (n - 1) * cell_bits
    top = (q - lower) // 2**top_shift
    assert torch.equal(top * 2**top_shift + lower, q)
    slices.append((2**top_shift, top.double()))
    return slices, 0


def _adc(p: torch.Tensor, clip: tuple, bits: int, signed: bool) -> tuple:
    """(code, value) of partial sums ``p`` at an ADC of clip ``(alpha, offset z in steps)``: the code of p / step - z,
    the value step (code + z)."""
    alpha, offset = clip
    if signed:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    else:
        qmin, qmax = 0, 2**bits - 1
    levels = qmax if qmax > 0 else -qmin
    step = alpha / levels
    code = torch.clamp(torch.round(p / step - offset), qmin, qmax)
    return code, (code + offset) * step


def reference_conv(layer, x: torch.Tensor) -> dict:
    """Run ``layer`` (a `CIMConv2d` with every present quantizer enabled and initialised) the slow way.

    Returns:
        dict with ``output`` (float64), ``partial_sums`` and ``adc_codes`` laid out as in
        `CIMConv2d.simulate`'s trace: (n_cycles, N, groups, n_row_blocks, K, H_out, W_out).
    """
    spec = layer.spec
    x = x.double()
    weight = layer.weight.detach().double()
    cout, cin_g, kh, kw = weight.shape
    groups = layer.groups
    cout_g = cout // groups
    area = kh * kw
    iq, wq, pq = layer.input_quantizer, layer.weight_quantizer, layer.psum_quantizer

    # inputs
    if iq is not None:
        step_a = float(iq.step.detach().abs()) + 1e-12
        signed = bool(iq.signed)
        qmin, qmax = (-(2 ** (iq.bits - 1)), 2 ** (iq.bits - 1) - 1) if signed else (0, 2**iq.bits - 1)
        codes = torch.clamp(torch.round(x / step_a), qmin, qmax)
        cycles = _input_cycles(codes, iq.bits, spec.dac_bits, signed)
    else:
        step_a, signed, cycles = 1.0, True, [(1, x)]

    blocks = _row_blocks(spec, cin_g, area)
    n_r = len(blocks)
    block_of_row = torch.empty(cin_g * area, dtype=torch.long)
    for r, rows in enumerate(blocks):
        block_of_row[rows] = r

    # weights
    if wq is not None:
        tile_step = wq.expanded_step().detach().double()  # (G, n_r, C_out/g), learned numbers
        unrolled = weight.reshape(groups, cout_g, cin_g * area)
        element_step = tile_step[:, block_of_row, :].permute(0, 2, 1)
        q = torch.clamp(torch.round(unrolled / element_step), -(2 ** (wq.bits - 1)), 2 ** (wq.bits - 1) - 1)
        cell_bits = spec.cell_bits or spec.weight_bits
        slices, ref_digit = _weight_slices(q, wq.bits, cell_bits, spec.weight_slicing)
    else:
        tile_step = torch.ones(groups, n_r, cout_g, dtype=torch.float64)
        slices, ref_digit = [(1, weight.reshape(groups, cout_g, cin_g * area))], 0
    n_s = len(slices)
    ref_cols = 1 if ref_digit else 0
    per_array = (spec.cols - ref_cols) // n_s
    n_c = math.ceil(cout_g / per_array)
    n_ref = n_c if ref_digit else 0
    columns = n_s * cout_g + n_ref

    height_out = width_out = None
    unfolded_cycles = []
    for _, digit in cycles:
        unfolded = F.unfold(digit, (kh, kw), layer.dilation, layer.padding, layer.stride)  # (N, Cin*area, L)
        unfolded_cycles.append(unfolded)
    n = x.shape[0]
    height_out = (x.shape[2] + 2 * layer.padding[0] - layer.dilation[0] * (kh - 1) - 1) // layer.stride[0] + 1
    width_out = (x.shape[3] + 2 * layer.padding[1] - layer.dilation[1] * (kw - 1) - 1) // layer.stride[1] + 1
    positions = height_out * width_out
    psums = torch.zeros(len(cycles), n, groups, n_r, columns, positions, dtype=torch.float64)
    codes_out = torch.zeros_like(psums)
    output = torch.zeros(n, groups, cout_g, positions, dtype=torch.float64)
    float_inputs, float_weights = iq is None, wq is None
    for j, (cycle_weight, _) in enumerate(cycles):
        for g in range(groups):
            a = unfolded_cycles[j][:, g * cin_g * area:(g + 1) * cin_g * area, :]  # (N, rows, L)
            for r, rows in enumerate(blocks):
                for s, (slice_weight, digits) in enumerate(slices):
                    for o in range(cout_g):
                        c = o // per_array
                        p = (a[:, rows, :] * digits[g, o, rows].view(1, -1, 1)).sum(1)
                        kind_signed = float_inputs or float_weights or (
                            spec.weight_slicing == "twos_complement" and s == n_s - 1
                        )
                        value = p
                        if pq is not None:
                            code, value = _adc(p, _clip(pq, s, g * n_r + r, c, o), pq.bits, kind_signed)
                            codes_out[j, :, g, r, s * cout_g + o] = code
                        psums[j, :, g, r, s * cout_g + o] = p
                        output[:, g, o] += cycle_weight * slice_weight * tile_step[g, r, o] * value
                for c in range(n_ref):
                    p = a[:, rows, :].sum(1) * ref_digit
                    value = p
                    if pq is not None:
                        code, value = _adc(p, _clip(pq, n_s, g * n_r + r, c, c), pq.bits, float_inputs)
                        codes_out[j, :, g, r, n_s * cout_g + c] = code
                    psums[j, :, g, r, n_s * cout_g + c] = p
                    top_weight = slices[-1][0]
                    for o in range(c * per_array, min((c + 1) * per_array, cout_g)):
                        output[:, g, o] -= cycle_weight * top_weight * tile_step[g, r, o] * value
    output = output.reshape(n, cout, height_out, width_out) * step_a
    if layer.bias is not None:
        output = output + layer.bias.detach().double().view(1, -1, 1, 1)
    shape = (len(cycles), n, groups, n_r, columns, height_out, width_out)
    return {
        "output": output,
        "partial_sums": psums.reshape(shape),
        "adc_codes": codes_out.reshape(shape) if pq is not None else None,
    }


def _clip(pq, kind: int, row_array: int, col_block: int, column: int) -> tuple:
    """(alpha, offset in steps) of one bitline's ADC; ``column``: the output column of a slice, the column block of
    a reference column."""
    index = (kind, 0, 0) if pq.granularity == "layer" else (
        (kind, row_array, column) if pq.granularity == "column" else (kind, row_array, col_block))
    offset = 0.0 if pq.offset is None else float(pq.offset.detach().double()[index])
    return float(pq.alpha().detach().double()[index]), offset
