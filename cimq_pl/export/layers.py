"""What one layer contributes to an export: its manifest entry and its tensors.

A CIM layer is read from its calibrated quantizers in eval mode, through the same methods its forward pass
calls, so the exported steps are bit-for-bit the ones the fake-quant simulation multiplies by:

* ``cells``: each array's cell values (the weight slices' digits, and the reference column), as programmed;
* ``weight_scale``: the weight step of every (group, row block, output column), applied digitally to that
  array's ADC output (one value per tile with arraywise weights);
* ``input_scale`` and ``input_codes``: the input step s_a and the allowed input codes (the bit-sparse set);
* ``adc_setting`` / ``adc_thresholds`` / ``adc_code_min`` / ``adc_scale``: the ADC setting of every bitline,
  and per setting the integer comparator thresholds (in partial-sum units: code = code_min + number of
  thresholds <= p), the lowest code and the digital scale (clip alpha / levels) of one code step;
* ``bias``: the layer's bias, plus its learned output offset after the ADC where it has one (PTQ's ``lr_offset``),
  plus, with asymmetric ADC ranges, what the ADC offsets add: a bitline's value is ``scale x (code + z)``, so its
  cycle sum carries ``scale x z x sum_j w_j``, a constant the shift-add takes to each output channel like the
  bias (`_adc_offset_bias`); the exported ADC itself is then an ordinary one (thresholds, code_min, scale).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from cimq_pl.export.executor import add_tile_bitlines
from cimq_pl.export.format import ExportError, adc_threshold_count, layer_layout, pair, smallest_int_dtype
from cimq_pl.quant.layers import CIMLinear, _CIMLayerBase
from cimq_pl.quant.psum import PsumQuantizer

# partial sums are exact integers in the float32 simulation only below 2^24
EXACT_FLOAT32_INTEGERS = 2**24


def _padding(layer: nn.Module) -> list:
    padding = layer.padding
    if padding == "valid":
        return [0, 0]
    if padding == "same":
        totals = [d * (k - 1) for d, k in zip(pair(layer.dilation), layer.kernel_size)]
        if any(total % 2 for total in totals):
            raise ExportError("padding='same' with an even kernel pads unevenly; export needs symmetric padding")
        return [total // 2 for total in totals]
    return pair(padding)


def _shape_fields(layer: nn.Module, linear: bool, bias: torch.Tensor | None) -> dict:
    kernel = list(layer.kernel_size) if not linear else [1, 1]
    return {
        "in_channels": layer.in_features if linear else layer.in_channels,
        "out_channels": layer.out_features if linear else layer.out_channels,
        "kernel_size": kernel,
        "stride": [1, 1] if linear else pair(layer.stride),
        "padding": [0, 0] if linear else _padding(layer),
        "dilation": [1, 1] if linear else pair(layer.dilation),
        "groups": 1 if linear else layer.groups,
        "bias": bias is not None,
    }


def digital_layer_record(name: str, layer: nn.Module, op: str) -> tuple[dict, dict]:
    """Entry and tensors of a float layer left digital (``first_layer``/``last_layer`` ``"digital"``)."""
    entry = {"op": op, **_shape_fields(layer, op == "linear", layer.bias),
             "weight_shape": list(layer.weight.shape)}
    tensors = {f"{name}.weight": layer.weight.detach().float()}
    if layer.bias is not None:
        tensors[f"{name}.bias"] = layer.bias.detach().float()
    return entry, tensors


def check_exportable(name: str, layer: _CIMLayerBase) -> None:
    """Raise `ExportError` unless the layer has calibrated, enabled input and weight quantizers."""
    for role in ("input", "weight"):
        quantizer = getattr(layer, f"{role}_quantizer")
        if quantizer is None or not quantizer.enabled:
            raise ExportError(f"layer {name!r} has float {role}s (quantizer missing or disabled): an integer export "
                              f"needs quantized weights and inputs (CIMSpec.weight_bits/input_bits not None)")
    if layer.psum_quantizer is not None and not layer.psum_quantizer.enabled:
        raise ExportError(f"layer {name!r} has its ADC quantizer disabled but its spec has adc_bits="
                          f"{layer.spec.adc_bits}: enable it, or export for a spec with adc_bits null (ideal ADC)")
    for role, quantizer in layer.quantizers().items():
        if quantizer.enabled and not quantizer.initialized:
            raise ExportError(f"layer {name!r}: the {role} quantizer is not calibrated; export a model after PTQ "
                              "or QAT (pass the checkpoint it wrote as --ckpt_path)")


def _cells(geometry, layout: dict, slices: torch.Tensor, reference_digit: int) -> torch.Tensor:
    """(tiles, rows, cols) cell values; wordline i / bitline o * n_slices + s as `layer_layout` documents."""
    geo = geometry
    n_slices = slices.shape[0]
    unrolled = slices.reshape(n_slices, geo.groups, geo.out_channels_per_group, geo.unrolled_rows)
    mapping = layout["mapping"]
    cells = torch.zeros(len(mapping["tiles"]), geo.rows, geo.cols, dtype=torch.int64)
    for index, tile in enumerate(mapping["tiles"]):
        row_start, n_rows = mapping["row_blocks"][tile["row_block"]]
        col_start, n_cols = mapping["col_blocks"][tile["col_block"]]
        block = unrolled[:, tile["group"], col_start:col_start + n_cols, row_start:row_start + n_rows]
        cells[index, :n_rows, :n_cols * n_slices] = block.permute(2, 1, 0).reshape(n_rows, n_cols * n_slices)
        if reference_digit:
            cells[index, :n_rows, n_cols * n_slices] = reference_digit
    return cells


@torch.no_grad()
def _adc_tensors(name: str, pq: PsumQuantizer, geometry, layout: dict, bound: int) -> tuple[dict, dict]:
    """ADC settings of the layer: one per entry of the quantizer's alpha (kind x row array x column block, or
    x output column with ``"column"`` granularity; entries no bitline reads are exported too, unused)."""
    geo = geometry
    n_settings = pq.alpha0.numel()
    per_kind = pq.alpha0.shape[1] * pq.alpha0.shape[2]
    kind_signed = geo.slice_signed() + (False,)  # the reference column reads unsigned digits
    signed = torch.tensor([kind_signed[index // per_kind] for index in range(n_settings)], device=pq.alpha0.device)
    every = torch.arange(n_settings, device=pq.alpha0.device)
    step, qmin, qmax = pq.channel_params(every, signed)
    thresholds = _adc_thresholds(pq, step, qmin, qmax, pq.channel_offset(every), bound)

    mapping = layout["mapping"]
    n_slices = geo.n_weight_slices
    setting = torch.full((len(mapping["tiles"]), geo.cols), -1, dtype=torch.int64)
    for index, tile in enumerate(mapping["tiles"]):
        col_start, n_cols = mapping["col_blocks"][tile["col_block"]]
        row_array = tile["group"] * geo.n_row_blocks + tile["row_block"]
        kinds = torch.arange(n_slices).repeat(n_cols)  # bitline o * n_slices + s reads slice s of column o
        columns = col_start + torch.arange(n_cols).repeat_interleave(n_slices)  # output column within the group
        if geo.reference_columns_per_array:  # a reference column's alpha column is its column block
            kinds = torch.cat([kinds, torch.tensor([n_slices])])
            columns = torch.cat([columns, torch.tensor([tile["col_block"]])])
        groups = pq.group_of(kinds, torch.full_like(kinds, row_array), torch.full_like(kinds, tile["col_block"]),
                             columns)
        setting[index, : kinds.numel()] = groups
    tensors = {
        f"{name}.adc_setting": setting.to(smallest_int_dtype(-1, n_settings)),
        f"{name}.adc_thresholds": thresholds.to(smallest_int_dtype(-bound, bound + 1)).cpu(),
        f"{name}.adc_code_min": qmin.round().long().to(smallest_int_dtype(int(qmin.min()), 0)).cpu(),
        f"{name}.adc_scale": step.float().cpu(),
    }
    entry = {"bits": pq.bits, "granularity": pq.granularity, "settings": n_settings}
    return entry, tensors


def _adc_offset_bias(name: str, pq: PsumQuantizer, geometry, layout: dict, adc_tensors: dict, weight_step,
                     input_step) -> torch.Tensor | None:
    """(C_out,) what the offsets z of an asymmetric ADC add to the layer output (None for a symmetric ADC): every
    bitline's ``scale x z x sum_j w_j`` (its settings' step and offset, the input cycles' shift-add weights) through
    the slices' shift-add and the tile scales, times the input step, as the executor combines bitline values."""
    if not pq.asymmetric:
        return None
    mapping = layout["mapping"]
    setting = adc_tensors[f"{name}.adc_setting"].long()
    every = torch.arange(pq.alpha0.numel(), device=pq.alpha0.device)
    per_setting = (adc_tensors[f"{name}.adc_scale"].double() * pq.channel_offset(every).detach().double().cpu()
                   * sum(cycle["weight"] for cycle in layout["cycles"]))
    scale = weight_step.detach().double().cpu()
    out = torch.zeros(geometry.groups * mapping["out_channels_per_group"], dtype=torch.float64)
    reference = out if geometry.reference_columns_per_array else None
    for index, tile in enumerate(mapping["tiles"]):
        add_tile_bitlines(out, reference, per_setting[setting[index, :tile["bitlines"]]], tile, mapping,
                          layout["slices"], scale)
    return (out * float(input_step)).to(weight_step.dtype).to(weight_step.device)


def _adc_thresholds(pq: PsumQuantizer, step, qmin, qmax, offset, bound: int) -> torch.Tensor:
    """(settings, 2^b - 1) int64: the least partial sum p in [-bound, bound] whose ADC code reaches each code
    above the lowest, found by bisection over the quantizer's own ``quantize_codes`` (monotonic in p; ``offset``
    the settings' z, None for a symmetric ADC); ``bound + 1`` where a code is never reached."""
    n_settings, count = step.numel(), adc_threshold_count(pq.bits)
    target = qmin.view(-1, 1) + torch.arange(1, count + 1, device=step.device, dtype=qmin.dtype)
    low = torch.full((n_settings, count), -bound, dtype=torch.int64, device=step.device)
    high = torch.full_like(low, bound + 1)
    flat = (step.repeat_interleave(count), qmin.repeat_interleave(count), qmax.repeat_interleave(count),
            None if offset is None else offset.repeat_interleave(count))
    while bool((low < high).any()):
        middle = torch.div(low + high, 2, rounding_mode="floor")
        codes = pq.quantize_codes(middle.to(step.dtype).reshape(1, -1, 1, 1), *flat).reshape(n_settings, count)
        reached = codes >= target
        high = torch.where(reached, middle, high)
        low = torch.where(reached, low, middle + 1)
    return low


@torch.no_grad()
def cim_layer_record(name: str, layer: _CIMLayerBase, input_shape: tuple) -> tuple[dict, dict]:
    """Entry and tensors of a CIM layer.

    Args:
        name: the layer's module name (tensor names are ``<name>.<field>``).
        layer: a calibrated `CIMConv2d`/`CIMLinear` in eval mode.
        input_shape: the shape of one input it receives (for the LSQ step exactly as the forward pass forms it).

    Raises:
        ExportError: float weights or inputs, an uncalibrated quantizer, or partial sums beyond 2^24.
    """
    check_exportable(name, layer)
    geo, spec = layer.geometry, layer.spec
    iq, wq, pq = layer.input_quantizer, layer.weight_quantizer, layer.psum_quantizer
    linear = isinstance(layer, CIMLinear)
    bias = layer.output_bias(pq is not None and pq.enabled)  # the bias, plus the learned offset after the ADC
    signed = bool(iq.signed)
    layout = layer_layout(geo, signed)

    sample = torch.zeros(1, *input_shape, dtype=layer.weight.dtype, device=layer.weight.device)
    _, input_step = iq.codes(sample)
    allowed, _ = iq.allowed_codes()
    weight_step, codes, slices, _, reference_digit, _ = layer.weight_cells(exact=True)
    cells = _cells(geo, layout, slices.round().long().cpu(), reference_digit)

    cell_low, cell_high = int(cells.min()), int(cells.max())
    max_digit = max(2 ** cycle["bits"] - 1 for cycle in layout["cycles"])
    bound = geo.rows * max_digit * max(abs(cell_low), abs(cell_high), 1)
    if bound >= EXACT_FLOAT32_INTEGERS:
        raise ExportError(f"layer {name!r}: partial sums reach {bound} >= 2^24, beyond float32's exact integers "
                          "(the fake-quant simulation itself is then inexact); use fewer rows or bits")
    adc_entry = adc_tensors = None
    if pq is not None and pq.enabled:
        adc_entry, adc_tensors = _adc_tensors(name, pq, geo, layout, bound)
        offset_bias = _adc_offset_bias(name, pq, geo, layout, adc_tensors, weight_step, input_step)
        if offset_bias is not None:
            bias = offset_bias if bias is None else bias + offset_bias

    entry = {
        "op": "cim_linear" if linear else "cim_conv2d",
        "spec": dataclasses.asdict(spec),
        **_shape_fields(layer, linear, bias),
        "input_shape": list(input_shape),
        "input": {"bits": iq.bits, "signed": signed, "max_ones": iq.max_ones if iq.sparse_codes else None,
                  "rounding": "nearest_code_ties_down" if iq.sparse_codes else "half_even"},
        "weights": {"bits": wq.bits, "granularity": wq.granularity},
        "adc": adc_entry,
        **layout,
    }
    tensors = {
        f"{name}.cells": cells.to(smallest_int_dtype(cell_low, cell_high)),
        f"{name}.weight_scale": weight_step.detach().float().cpu().contiguous(),
        f"{name}.input_scale": input_step.detach().float().reshape(1).cpu(),
        f"{name}.input_codes": allowed.round().long().to(smallest_int_dtype(int(allowed.min()), int(allowed.max()))).cpu(),
    }
    if adc_tensors is not None:
        tensors.update(adc_tensors)
    if bias is not None:
        tensors[f"{name}.bias"] = bias.detach().float().cpu()
    return entry, tensors


__all__ = ["check_exportable", "cim_layer_record", "digital_layer_record"]
