"""CIM layers: `CIMConv2d` and `CIMLinear` compute what a crossbar macro computes (SPEC section 3).

For output channel o at position l, with input codes a (scale s_a) and weight codes q (scale s_w[tile])::

    a = sum_j w_j * a_j                        input cycles j of dac_bits (sign cycle weighted -2^(b_a-1))
    q = sum_s 2^(s*b_c) * q_s                  weight slices s (offset slicing: minus the reference column)
    p[r, j, s, o, l] = sum_{i in rows(r)} a_j[i, l] * q_s[i, o]
    y[o, l] = s_a * sum_r s_w[r, col(o)] * sum_j w_j * sum_s 2^(s*b_c) * ADC(p[r, j, s, o, l]) + bias[o]

Vectorised: the input cycles are stacked in the batch dimension and the row blocks (arrays along the rows,
times conv groups) are the groups of one grouped convolution whose output channels are all slices and columns
of all arrays; a ragged last row block, if any, is a second convolution. The ADC and the cycle shift-add are
one fused pass (`PsumQuantizer.convert_and_sum`), and the per-tile scales and the shift-add across slices and
row blocks act on the cycle-summed tensor. No Python loop runs over arrays, positions or cycles. Faster
paths (channels-last convolutions where nothing needs a gradient; ``simulation="compiled"``: compiled kernels
around the convolutions) are in `fused.py`.

The digits come from `digits.py` (shared with the export) and the event counts from `stats.py`; this file
holds the layers and the two walks over a model's CIM layers, `cim_layers` and `iter_quantizers`.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from cimq_pl.quant import fused
from cimq_pl.quant.activation import ActivationQuantizer
from cimq_pl.quant.device_model import active_device
from cimq_pl.quant.digits import _DigitSplit, split_input_cycles, split_weight_slices  # noqa: F401 - re-exported
from cimq_pl.quant.options import QuantizerOptions
from cimq_pl.quant.psum import PsumQuantizer, cycle_sum
from cimq_pl.quant.registry import register_cim_layer
from cimq_pl.quant.spec import CIMSpec
from cimq_pl.quant.stats import CIMStats, forward_counts
from cimq_pl.quant.tiling import TileGeometry
from cimq_pl.quant.ste import constant_tensor
from cimq_pl.quant.weight import WeightQuantizer

#: The roles of a CIM layer's quantizers, in the order `_CIMLayerBase.quantizers` lists them.
QUANTIZER_ROLES = ("input", "weight", "psum")


class _CIMLayerBase(nn.Module):
    """Shared simulation of a conv-shaped layer on crossbar arrays (4-D inputs).

    Attributes:
        spec: the `CIMSpec` the layer was built for.
        geometry: its `TileGeometry`.
        input_quantizer: `ActivationQuantizer` of the wordline inputs, None when ``spec.input_bits`` is None.
        weight_quantizer: `WeightQuantizer`, None when ``spec.weight_bits`` is None.
        psum_quantizer: `PsumQuantizer` (ADC), None when ``spec.adc_bits`` is None.
        collect_stats: when True every forward pass adds to ``stats`` (off by default: training is not slowed).
        stats: `CIMStats` event counters; ``reset_stats()`` zeroes them.
        simulation: ``"eager"``, ``"compiled"`` or None (the process default); see `fused.py`. Not part of the
            state_dict: a speed choice, not a model property.
        device_model: the chip's cells and ADCs (`device_model.DeviceModel`), None for ideal ones; set by
            `attach_device_`, not part of the state_dict.
    """

    def _setup(
        self,
        weight: nn.Parameter,
        bias: Optional[nn.Parameter],
        spec: CIMSpec,
        stride,
        padding,
        dilation,
        groups: int,
        options: Optional[QuantizerOptions],
    ) -> None:
        options = options or QuantizerOptions()
        self.weight = weight
        self.bias = bias
        self.spec = spec
        self.options = options
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.out_channels = weight.shape[0]
        self.in_channels = weight.shape[1] * groups
        self.kernel_size = tuple(weight.shape[2:]) or (1, 1)
        geo = TileGeometry.from_layer(spec, self.in_channels, self.out_channels, self.kernel_size, groups)
        self.geometry = geo
        self.input_quantizer, self.weight_quantizer, self.psum_quantizer = self._build_quantizers(options)
        self.collect_stats = False
        self.stats = CIMStats(geo.arrays_used)
        self.parts = geo.row_block_parts()
        self._part_inputs = []
        for index, part in enumerate(self.parts):
            local = part.channel_index_tensor()
            global_channels = (
                torch.arange(groups).view(-1, 1, 1) * geo.in_channels_per_group + local.clamp_min(0).unsqueeze(0)
            ).reshape(-1)
            self.register_buffer(f"_part{index}_channels", global_channels, persistent=False)
            self.register_buffer(f"_part{index}_local", local.clamp_min(0), persistent=False)
            self.register_buffer(f"_part{index}_mask", part.row_mask_tensor(), persistent=False)
            self.register_buffer(f"_part{index}_blocks", torch.tensor(part.row_blocks), persistent=False)
            channels = global_channels.tolist()
            if channels == list(range(self.in_channels)):
                self._part_inputs.append(("all",))
            elif channels == list(range(channels[0], channels[0] + len(channels))):
                self._part_inputs.append(("narrow", channels[0], len(channels)))
            else:
                self._part_inputs.append(("index",))
        self.register_buffer("_col_block_of_column", geo.col_block_of_column(), persistent=False)
        self._meta_cache: dict = {}
        self.device_model = None  # real-device non-idealities (device_model.py), attached by attach_device_
        self.mapping = "cim"  # "cim" (the macro's arrays) or "int8" (an 8-bit edge layer), set by convert_to_cim
        self.simulation: Optional[str] = None  # "eager", "compiled" or None (the process default), see fused.py
        self.output_offset: Optional[nn.Parameter] = None  # learned digital offset after the ADC (add_output_offset_)

    def _array_convs(self) -> list:
        """Per part: (`fused.ConvParams` of its grouped convolution, extra input padding for F.pad or None)."""
        params = self.__dict__.get("_array_conv_params")
        if params is None:
            params = self.__dict__["_array_conv_params"] = [self._conv_params(len(p.row_blocks)) for p in self.parts]
        return params

    def _conv_params(self, n_blocks: int) -> tuple:
        """(`fused.ConvParams` of a grouped convolution over ``n_blocks`` row blocks, extra padding or None)."""
        pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # noqa: E731
        stride, dilation, padding, extra = pair(self.stride), pair(self.dilation), self.padding, None
        if isinstance(padding, str):  # "valid" or "same" (stride 1); odd totals pad one more on the high side
            totals = [0, 0] if padding == "valid" else [d * (k - 1) for d, k in zip(dilation, self.kernel_size)]
            padding = tuple(t // 2 for t in totals)
            if any(t % 2 for t in totals):
                extra = (0, totals[1] % 2, 0, totals[0] % 2)
        return fused.ConvParams(stride, pair(padding), dilation, self.geometry.groups * n_blocks), extra

    def _build_quantizers(self, options: QuantizerOptions) -> tuple:
        """Fresh (input, weight, psum) quantizers for ``options``; None where the spec leaves a quantity float."""
        spec, geo = self.spec, self.geometry
        input_quantizer = weight_quantizer = psum_quantizer = None
        if spec.input_bits is not None:
            max_ones = options.input_max_ones
            max_ones = None if max_ones is None or max_ones >= spec.input_bits else max_ones
            input_quantizer = ActivationQuantizer(
                spec.input_bits,
                options.input_signed,
                max_ones,
                options.input_observer,
                sparsity_weight=options.input_sparsity_weight,
                keep_prob=options.input_keep_prob,
                step_scale=options.input_step_scale,
                percentile=options.percentile,
            )
        if spec.weight_bits is not None:
            weight_quantizer = WeightQuantizer(
                geo,
                spec.weight_bits,
                options.weight_granularity,
                options.weight_rounding,
                options.weight_observer,
                percentile=options.percentile,
            )
        if spec.adc_bits is not None:
            psum_quantizer = PsumQuantizer(
                spec.adc_bits,
                n_kinds=geo.n_weight_slices + geo.reference_columns_per_array,
                n_row_arrays=geo.groups * geo.n_row_blocks,
                n_col_blocks=geo.n_col_blocks,
                granularity=options.psum_granularity,
                n_columns=geo.out_channels_per_group,
                observer=options.psum_observer,
                learn_clip=options.psum_learn_clip,
                asymmetric=options.psum_asymmetric,
                keep_prob=options.psum_keep_prob,
                percentile=options.percentile,
            )
        return input_quantizer, weight_quantizer, psum_quantizer

    def set_options(self, options: QuantizerOptions) -> None:
        """Apply ``options`` to the layer's quantizers, in place: the one way their settings change.

        A changed field listed in its quantizer's ``SETTINGS`` (``keep_prob``, ``sparsity_weight``,
        ``learn_clip``) is set on it. Any other change rebuilds that quantizer, which takes over the calibration
        of the one it replaces where the shapes still fit (a weight quantizer otherwise re-initialises from the
        weights; an input/ADC quantizer of another granularity needs calibration again). ``enabled`` carries over.
        """
        changed = {f for f in options.__dataclass_fields__ if getattr(options, f) != getattr(self.options, f)}
        fresh = None
        for role, old in self.quantizers().items():
            prefix = f"{role}_"
            fields = {f[len(prefix):] for f in changed if f.startswith(prefix)} | ({"percentile"} & changed)
            if not fields:
                continue
            if fields <= set(old.SETTINGS):
                for name in fields:
                    setattr(old, name, getattr(options, prefix + name))
                continue
            fresh = fresh or dict(zip(QUANTIZER_ROLES, self._build_quantizers(options)))
            new = fresh[role].to(device=self.weight.device, dtype=self.weight.dtype)
            new.enabled = old.enabled
            adopted = new.adopt_calibration_(old)
            if role == "weight" and old.initialized:
                if not adopted:
                    new.init_from_observer(self._weight4d())
                elif new.rounding_logits is not None and old.rounding_logits is None:
                    new.init_rounding(self._weight4d())
            setattr(self, f"{role}_quantizer", new)
        self.options = options

    def add_output_offset_(self) -> Optional[nn.Parameter]:
        """Give the layer a digital offset per output channel (zeros, in the output's units), added with the bias
        whenever its ADC is on: PTQ learns it to cancel the ADC's systematic error (its rounding and clipping do
        not average to zero over the partial sums a column sees). The macro adds the bias digitally anyway, so the
        offset costs nothing more. Kept as its own Parameter so the float network (ADC off) keeps its bias. None
        (and nothing added) for a layer without an ADC quantizer; an existing offset is returned as it is."""
        if self.psum_quantizer is None:
            return None
        if self.output_offset is None:
            self.output_offset = nn.Parameter(torch.zeros(self.out_channels, dtype=self.weight.dtype,
                                                          device=self.weight.device), requires_grad=False)
        return self.output_offset

    def output_bias(self, adc_active: bool) -> Optional[torch.Tensor]:
        """The per-channel term added to the output: the bias, plus the learned `output_offset` while the ADC
        is on (None when the layer has neither)."""
        if self.output_offset is None or not adc_active:
            return self.bias
        return self.output_offset if self.bias is None else self.bias + self.output_offset

    # ------------------------------------------------------------------ public helpers
    def quantizers(self) -> dict:
        """The existing quantizers by role: ``{"input": ..., "weight": ..., "psum": ...}`` (None omitted)."""
        found = {role: getattr(self, f"{role}_quantizer") for role in QUANTIZER_ROLES}
        return {role: q for role, q in found.items() if q is not None}

    def set_quantizers_enabled(self, enabled: bool) -> None:
        """Enable or disable every quantizer of the layer (disabled = float, exact original layer)."""
        for quantizer in self.quantizers().values():
            quantizer.enabled = enabled

    def adc_range_settings(self) -> int:
        """Distinct ADC ranges (alpha entries) the layer's bitlines read, count; 0 without an enabled ADC quantizer.

        Each is one programmable ADC reference set when the layer is loaded (a register per range: area, not
        energy per conversion): the weight slices and reference column kinds with ``"layer"``, times the arrays
        with ``"array"``, one per used bitline of every array with ``"column"``.
        """
        pq, geo = self.psum_quantizer, self.geometry
        if pq is None or not pq.enabled:
            return 0
        n_ref = geo.n_col_blocks * geo.reference_columns_per_array
        groups = [self._channel_meta(index, geo.n_weight_slices, n_ref, False, False)[0]
                  for index in range(len(self.parts))]
        return int(torch.cat(groups).unique().numel())

    def _weight4d(self) -> torch.Tensor:
        return self.weight.view(self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    def weight_cells(self, exact: Optional[bool] = None) -> tuple:
        """The quantized weight as the arrays store it (the weight quantizer initialised).

        Args:
            exact: integer codes and cell slices; None = as the layer runs now (soft AdaRound codes while they
                learn, integers otherwise).

        Returns:
            ``(step, codes, slices, slice_weights, reference_digit, exact)``: the expanded weight step, the codes
            (C_out, C_in/g, k_h, k_w), the cell slices (n_slices, C_out, C_in/g, k_h, k_w) with their shift-add
            weights, the reference-column digit (0: none), and whether the codes are integers.
        """
        wq = self.weight_quantizer
        if exact is None:
            exact = wq.rounding_logits is None or wq.hard or not wq.training
        step = wq.expanded_step()
        codes = wq.codes(self._weight4d(), step)
        slices, slice_weights, reference_digit = split_weight_slices(codes, self.geometry, wq.code_range, exact)
        return step, codes, slices, slice_weights, reference_digit, exact

    def reset_stats(self) -> None:
        """Zero the event counters."""
        self.stats.reset()

    # ------------------------------------------------------------------ simulation
    def _channel_meta(self, part_index: int, n_slices: int, n_ref: int, float_inputs: bool, float_weights: bool):
        """(alpha group, signed) per conv output channel of a part, cached per configuration, device and ADC
        granularity (`set_options` may rebuild the ADC quantizer with another one)."""
        pq = self.psum_quantizer
        adc = None if pq is None else (pq.granularity, pq.alpha0.shape)
        key = (part_index, n_slices, n_ref, float_inputs, float_weights, self.weight.device, adc)
        if key not in self._meta_cache:
            geo = self.geometry
            device = self.weight.device
            cout_g = geo.out_channels_per_group
            blocks = getattr(self, f"_part{part_index}_blocks")
            kind = torch.cat([torch.arange(n_slices, device=device).repeat_interleave(cout_g),
                              torch.full((n_ref,), n_slices, device=device, dtype=torch.long)])
            col = torch.cat([self._col_block_of_column.repeat(n_slices), torch.arange(n_ref, device=device)])
            # the column of a slice channel is its output column; a reference channel's, its column block
            column = torch.cat([torch.arange(cout_g, device=device).repeat(n_slices),
                                torch.arange(n_ref, device=device)])
            if float_weights or float_inputs:
                signed_kind = torch.ones(n_slices + 1, dtype=torch.bool, device=device)
            else:  # the reference column (last kind) reads unsigned digits
                signed_kind = torch.tensor(geo.slice_signed() + (False,), dtype=torch.bool, device=device)
            row_array = torch.arange(geo.groups, device=device).view(-1, 1) * geo.n_row_blocks + blocks.view(1, -1)
            n_arrays = row_array.numel()
            kind_all = kind.repeat(n_arrays)
            col_all = col.repeat(n_arrays)
            column_all = column.repeat(n_arrays)
            row_all = row_array.reshape(-1).repeat_interleave(kind.numel())
            group = pq.group_of(kind_all, row_all, col_all, column_all) if pq is not None else None
            self._meta_cache[key] = (group, signed_kind[kind_all])
        return self._meta_cache[key]

    def _part_input(self, digits: torch.Tensor, part_index: int) -> torch.Tensor:
        how = self._part_inputs[part_index]
        if how[0] == "all":
            return digits
        if how[0] == "narrow":
            return digits.narrow(1, how[1], how[2])
        return digits.index_select(1, getattr(self, f"_part{part_index}_channels"))

    def _part_weight(self, slices: torch.Tensor, part_index: int, ref_digit) -> torch.Tensor:
        """Grouped-conv weight of a part: (groups * blocks * K, slots, k_h, k_w), K = slices * C_out/g + refs.

        ``ref_digit``: the reference-column digit (0: none), or every reference cell's value, a tensor
        (G, n_col_blocks, C_in/g, k_h, k_w) (a real device's cells, `DeviceModel.program`)."""
        geo = self.geometry
        g, cout_g, cin_g = geo.groups, geo.out_channels_per_group, geo.in_channels_per_group
        n_slices = slices.shape[0]
        local = getattr(self, f"_part{part_index}_local")
        mask = getattr(self, f"_part{part_index}_mask").to(slices.dtype)
        n_blocks, slots = local.shape
        per_row = slices.reshape(n_slices, g, cout_g, cin_g, geo.kernel_area)[:, :, :, local]
        weight = (per_row * mask).permute(1, 3, 0, 2, 4, 5).reshape(g, n_blocks, n_slices * cout_g, slots, -1)
        if isinstance(ref_digit, torch.Tensor):
            per_row = ref_digit.reshape(g, geo.n_col_blocks, cin_g, geo.kernel_area)[:, :, local]
            weight = torch.cat([weight, (per_row * mask).transpose(1, 2).to(weight.dtype)], 2)
        elif ref_digit:
            reference = (ref_digit * mask).unsqueeze(1).expand(g, n_blocks, geo.n_col_blocks, slots, -1)
            weight = torch.cat([weight, reference.to(weight.dtype)], 2)
        return weight.reshape(-1, slots, *self.kernel_size)

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, groups: int) -> torch.Tensor:
        return F.conv2d(x, weight, None, self.stride, self.padding, self.dilation, groups)

    def simulate(self, x: torch.Tensor, trace: bool = False):
        """Run the macro on a 4-D input (N, C_in, H, W).

        Args:
            x: input activations.
            trace: also return a dict of intermediate integers (slow path, for tests and export):
                ``input_codes`` (N, C_in, H, W); ``input_digits`` (n_cycles, N, C_in, H, W);
                ``cycle_weights``; ``weight_codes`` (C_out, C_in/g, k_h, k_w); ``weight_slices``
                (n_slices, C_out, C_in/g, k_h, k_w); ``slice_weights``; ``reference_digit``;
                ``partial_sums`` and ``adc_codes`` (n_cycles, N, groups, n_row_blocks, K, H_out, W_out) where
                channel k < n_slices * C_out/g is slice k // (C_out/g) of column k % (C_out/g) and the last
                ``n_col_blocks`` channels (offset slicing) are the reference columns of each column block;
                ``adc_codes`` is None when the ADC is ideal or disabled.

        Returns:
            The output (N, C_out, H_out, W_out), or ``(output, trace_dict)`` when ``trace``.
        """
        geo = self.geometry
        n_images = x.shape[0]
        iq, wq, pq = self.input_quantizer, self.weight_quantizer, self.psum_quantizer
        if iq is not None and iq.enabled and iq.observe:
            iq.observer.update(x.detach().reshape(1, -1))
        input_active = iq is not None and iq.enabled and not iq.observe
        weight_active = wq is not None and wq.enabled
        adc_active = pq is not None and pq.enabled
        adc_ready = pq is None or not pq.enabled or (pq.initialized and not pq.observe)
        device = active_device(self) if weight_active else None  # a real chip's cells and ADCs, or None
        compiled = (not trace and not self.collect_stats and adc_ready and device is None
                    and self._simulation() == "compiled"
                    and fused.compiled_simulation_available())

        keep = quant = lut = None
        if input_active:
            if compiled:  # the compiled kernels quantize x themselves
                codes = None
                input_step, keep, quant, lut = fused.compiled_input(iq, x)
            else:
                codes, input_step = iq.codes(x)
            cycle_weights = geo.input_cycles(bool(iq.signed), iq.bits)[1]
            n_cycles = len(cycle_weights)
            digits = None  # cut into digits below, where the path needs them (or a trace shows them)
            if trace:
                digits, _ = split_input_cycles(codes, geo, iq.bits, bool(iq.signed), iq.code_range,
                                               exact=not iq.dropping)
        else:
            codes, input_step, digits, cycle_weights, n_cycles = None, None, None, (1,), 1

        if weight_active:
            wq.init_if_needed_(self._weight4d())
            weight_step, weight_codes, slices, slice_weights, ref_digit, weight_exact = self.weight_cells()
        else:
            weight_step, weight_codes, slices, slice_weights, ref_digit = None, None, self._weight4d().unsqueeze(0), (1,), 0
            weight_exact = False
        cells, ref_cells, device_gain = device.program(self, slices, ref_digit) if device else (slices, ref_digit, None)
        n_slices = slices.shape[0]
        n_ref = geo.n_col_blocks if ref_digit else 0
        cout_g = geo.out_channels_per_group
        columns = n_slices * cout_g + n_ref

        split = None
        if input_active:
            split = fused.InputSplit(geo.input_digit_shifts(bool(iq.signed), iq.bits),
                                     geo.input_cycles(bool(iq.signed), iq.bits)[0], tuple(cycle_weights),
                                     *iq.code_range, not iq.dropping)
        source = codes if input_active else x
        weights = [self._part_weight(cells, index, ref_cells) for index in range(len(self.parts))]
        metas = [self._channel_meta(index, n_slices, n_ref, not input_active, not weight_active)
                 for index in range(len(self.parts))]

        if compiled:
            keeps = self._part_codes(keep) if keep is not None else [None] * len(self.parts)
            pack = 0  # no gradient and exact integer partial sums: two cycles per convolution (fused.cycle_pack)
            if (not torch.is_grad_enabled() and weight_active and weight_exact and self._integer_psums(split, x.dtype)
                    and not (adc_active and pq.dropping)):
                pack = fused.cycle_pack(weights, split, x.dtype)
            return self._compiled_forward(split, quant, lut, self._part_codes(x), keeps, weights, metas, weight_step,
                                          slice_weights, n_ref, input_step, adc_active, pack)

        needs_grad = torch.is_grad_enabled() and (source.requires_grad or any(w.requires_grad for w in weights))
        fast = device is None and not needs_grad and weight_active and weight_exact and self._integer_psums(split, x.dtype)
        if fast:
            # no gradient and integer partial sums: channels-last convolutions give the same bits, faster
            psums = [fused.channels_last_psums(part, weight, split, conv)
                     for part, weight, (conv, _) in zip(self._part_codes(source), weights, self._array_convs())]
        else:  # the digits of all cycles stacked in the batch dimension, one grouped convolution per part
            if input_active and digits is None:
                digits, _ = split_input_cycles(codes, geo, iq.bits, bool(iq.signed), iq.code_range,
                                               exact=not iq.dropping)
            stacked = digits.reshape(n_cycles * n_images, *x.shape[1:]) if input_active else x
            psums = [self._conv(self._part_input(stacked, index), weight, geo.groups * len(part.row_blocks))
                     for index, (part, weight) in enumerate(zip(self.parts, weights))]

        if device is not None:  # read noise and ADC errors enter the analog partial sums
            psums = device.analog_psums(self, psums, stacked, metas)

        if adc_active and (pq.observe or not pq.initialized):  # the observer reads them in NCHW order
            pq.observe_psums([p.contiguous() for p in psums], [m[0] for m in metas], [m[1] for m in metas])

        output, clipped_total, adc_codes = 0, 0, []
        count_clipped = self.collect_stats and adc_active
        for index, (psum, (group, signed)) in enumerate(zip(psums, metas)):
            if adc_active:
                summed, clipped, part_adc_codes = pq.convert_and_sum(
                    psum, group, signed, cycle_weights, count_clipped, return_codes=trace,
                    overwrite=fast and not trace,
                )
                adc_codes.append(part_adc_codes)
                if clipped is not None:
                    clipped_total = clipped_total + clipped
            else:
                summed = cycle_sum(psum, cycle_weights)
            if fast:  # the shift-add reads NCHW, as on the plain path (its sums then round the same way)
                summed = summed.contiguous()
            output = output + self._shift_add(summed, index, weight_step, slice_weights, n_ref)

        height, width = output.shape[-2:]
        output = output.reshape(n_images, self.out_channels, height, width)
        if device_gain is not None:  # the digital drift-compensation gain
            output = output * device_gain
        if input_step is not None:
            output = output * input_step
        bias = self.output_bias(adc_active)
        if bias is not None:
            output = output + bias.view(1, -1, 1, 1)

        if self.collect_stats:
            self.stats.add(**forward_counts(
                self, x, codes, iq if input_active else None, psums, clipped_total, n_images, height * width
            ))
        if not trace:
            return output
        return output, self._trace(codes, digits, cycle_weights, weight_codes, slices, slice_weights, ref_digit,
                                   psums, adc_codes if adc_active else None, n_cycles, n_images, columns)

    def _shift_add_coefficients(self, part_index, weight_step, slice_weights, n_ref, dtype, device) -> tuple:
        """Digital factors of a part's shift-add: (coefficient (G, blocks * slices, C_out/g), reference-column
        coefficient (G, blocks, C_out/g) or None); (None, None) when the shift-add is a plain sum."""
        geo = self.geometry
        g, cout_g = geo.groups, geo.out_channels_per_group
        n_slices = len(slice_weights)
        blocks = getattr(self, f"_part{part_index}_blocks")
        n_blocks = blocks.numel()
        tile_step = weight_step.index_select(1, blocks) if weight_step is not None else None  # (G, blocks, C_out/g)
        if n_slices == 1 and tile_step is None and not n_ref:
            return None, None
        coefficient = constant_tensor(tuple(slice_weights), dtype, device).view(1, 1, -1, 1)
        if tile_step is not None:
            coefficient = coefficient * tile_step.unsqueeze(2)
        coefficient = coefficient.expand(g, n_blocks, n_slices, cout_g).reshape(g, n_blocks * n_slices, cout_g)
        ref_coefficient = None
        if n_ref:
            top_weight = float(slice_weights[-1])
            ones = torch.ones(g, n_blocks, cout_g, dtype=dtype, device=device) if tile_step is None else None
            ref_coefficient = -top_weight * (tile_step if tile_step is not None else ones)
        return coefficient, ref_coefficient

    def _shift_add(self, summed, part_index, weight_step, slice_weights, n_ref):
        """Per-tile scales and shift-add over slices and row blocks: (N, blocks*K, H, W) -> (N, G, C_out/g, H, W)."""
        geo = self.geometry
        g, cout_g = geo.groups, geo.out_channels_per_group
        n_slices = len(slice_weights)
        n_blocks = len(self.parts[part_index].row_blocks)
        n_images, _, height, width = summed.shape
        per_block = summed.view(n_images, g, n_blocks, n_slices * cout_g + n_ref, height, width)
        coefficient, ref_coefficient = self._shift_add_coefficients(
            part_index, weight_step, slice_weights, n_ref, summed.dtype, summed.device)
        if coefficient is None:
            return per_block.sum(2)
        columns = per_block[:, :, :, : n_slices * cout_g] if n_ref else per_block
        out = (columns.reshape(n_images, g, n_blocks * n_slices, cout_g, height, width)
               * coefficient.view(1, g, n_blocks * n_slices, cout_g, 1, 1)).sum(2)
        if n_ref:
            reference = per_block[:, :, :, n_slices * cout_g:].index_select(3, self._col_block_of_column)
            out = out + (reference * ref_coefficient.view(1, g, n_blocks, cout_g, 1, 1)).sum(2)
        return out

    def _simulation(self) -> str:
        """This layer's simulation path: its ``simulation`` attribute, else the process default (fused.py)."""
        return getattr(self, "simulation", None) or fused.default_simulation()

    def _part_codes(self, source: torch.Tensor) -> list:
        """The (N, C_p, H, W) input codes (or inputs, masks) of each row-block part, padded where "same" needs it."""
        parts = []
        for index, (_, extra) in enumerate(self._array_convs()):
            part = self._part_input(source, index)
            parts.append(part if extra is None else F.pad(part, extra))
        return parts

    def _integer_psums(self, split, dtype: torch.dtype) -> bool:
        """Whether partial sums of exact integer digits are exact integers in ``dtype`` (any summation order)."""
        if split is None or not split.exact or self.spec.effective_cell_bits is None:
            return False
        mantissa = {torch.float32: 24, torch.float64: 53}.get(dtype)
        bound = self.spec.rows * (2 ** max(split.widths) - 1) * 2 ** self.spec.effective_cell_bits
        return mantissa is not None and bound < 2**mantissa

    def _ref_onehot(self, dtype, device) -> torch.Tensor:
        """(C_out/g, n_col_blocks) one-hot matrix of each output column's column block."""
        key = ("onehot", dtype, device)
        if key not in self._meta_cache:
            index = self._col_block_of_column.to(device)
            self._meta_cache[key] = F.one_hot(index, self.geometry.n_col_blocks).to(dtype)
        return self._meta_cache[key]

    def _compiled_forward(self, split, quant, lut, part_inputs, keeps, weights, metas, weight_step, slice_weights,
                          n_ref, input_step, adc_active, pack: int = 0):
        """The layer output on the compiled path (`fused.compiled_layer`): float inputs of each part (quantized
        by the kernels with ``quant``, ``lut``, ``input_step`` and the QDrop ``keeps``), the array weights and the
        ADC and shift-add factors; ``pack`` > 0 convolves two cycles at once (`fused.cycle_pack`)."""
        geo, pq = self.geometry, self.psum_quantizer
        dtype, device = weights[0].dtype, weights[0].device
        steps, qmins, qmaxs, offsets, coefs, ref_coefs = [], [], [], [], [], []
        for index, (group, signed) in enumerate(metas):
            step, qmin, qmax = pq.channel_params(group, signed) if adc_active else (None, None, None)
            offset = pq.channel_offset(group) if adc_active else None
            coefficient, ref_coefficient = self._shift_add_coefficients(index, weight_step, slice_weights, n_ref,
                                                                        dtype, device)
            for store, value in zip((steps, qmins, qmaxs, offsets, coefs, ref_coefs),
                                    (step, qmin, qmax, offset, coefficient, ref_coefficient)):
                store.append(value)
        bias = self.output_bias(adc_active)
        config = fused.PostConfig(
            cycle_weights=tuple(split.cycle_weights) if split is not None else (1,),
            part_blocks=tuple(len(part.row_blocks) for part in self.parts), groups=geo.groups,
            cout_g=geo.out_channels_per_group, n_slices=len(slice_weights), n_ref=n_ref, adc=adc_active,
            scaled=coefs[0] is not None, input_scale=input_step is not None, bias=bias is not None, pack=pack,
            psum_keep_prob=pq.keep_prob if adc_active and pq.dropping else None)
        ref_index = self._col_block_of_column if n_ref else None
        ref_onehot = self._ref_onehot(dtype, device) if n_ref else None
        convs = [conv for conv, _ in self._array_convs()]
        return fused.compiled_layer(config, split, quant, convs, ref_index, ref_onehot, part_inputs, weights, steps,
                                    qmins, qmaxs, offsets, coefs, ref_coefs, keeps, input_step, bias, lut)

    def _trace(self, codes, digits, cycle_weights, weight_codes, slices, slice_weights, ref_digit, psums, adc_codes,
               n_cycles, n_images, columns):
        geo = self.geometry

        def assemble(parts):
            if parts is None:
                return None
            full = None
            for index, tensor in enumerate(parts):
                blocks = self.parts[index].row_blocks
                shaped = tensor.reshape(n_cycles, n_images, geo.groups, len(blocks), columns, *tensor.shape[-2:])
                if full is None:
                    full = tensor.new_zeros(n_cycles, n_images, geo.groups, geo.n_row_blocks, columns, *tensor.shape[-2:])
                full[:, :, :, list(blocks)] = shaped.detach()
            return full

        return {
            "input_codes": None if codes is None else codes.detach(),
            "input_digits": None if digits is None else digits.detach(),
            "cycle_weights": cycle_weights,
            "weight_codes": None if weight_codes is None else weight_codes.detach(),
            "weight_slices": slices.detach(),
            "slice_weights": slice_weights,
            "reference_digit": ref_digit,
            "partial_sums": assemble(psums),
            "adc_codes": assemble(adc_codes),
        }

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, {self.geometry.describe()}"


@register_cim_layer(nn.Conv2d)
class CIMConv2d(_CIMLayerBase):
    """`nn.Conv2d` simulated on CIM arrays (any stride, padding, dilation and groups; zero padding only).

    Build it with `CIMConv2d.from_conv`, which shares the conv's ``weight`` and ``bias`` Parameters.

    Args:
        weight: (C_out, C_in/groups, k_h, k_w) Parameter.
        bias: (C_out,) Parameter or None.
        spec: the macro.
        stride: conv stride.
        padding: conv padding (ints or ``"same"``/``"valid"``).
        dilation: conv dilation.
        groups: conv groups.
        options: quantizer choices (`QuantizerOptions`), defaults when None.

    Raises:
        ValueError: when the layer cannot be mapped (see `TileGeometry.from_layer`).
    """

    def __init__(self, weight, bias, spec, stride=1, padding=0, dilation=1, groups=1, options=None) -> None:
        super().__init__()
        self._setup(weight, bias, spec, stride, padding, dilation, groups, options)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, spec: CIMSpec, options: Optional[QuantizerOptions] = None) -> "CIMConv2d":
        """CIM version of ``conv`` sharing its Parameters.

        Raises:
            ValueError: when ``conv.padding_mode`` is not ``"zeros"``.
        """
        if conv.padding_mode != "zeros":
            raise ValueError(f"padding_mode={conv.padding_mode!r} is not supported: expected 'zeros'")
        return cls(conv.weight, conv.bias, spec, conv.stride, conv.padding, conv.dilation, conv.groups, options)

    from_float = from_conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.simulate(x)


@register_cim_layer(nn.Linear)
class CIMLinear(_CIMLayerBase):
    """`nn.Linear` simulated on CIM arrays (the k = 1 case; inputs (..., in_features)).

    Args:
        weight: (out_features, in_features) Parameter.
        bias: (out_features,) Parameter or None.
        spec: the macro.
        options: quantizer choices.
    """

    def __init__(self, weight, bias, spec, options=None) -> None:
        super().__init__()
        self._setup(weight, bias, spec, 1, 0, 1, 1, options)
        self.in_features, self.out_features = self.in_channels, self.out_channels
        self.kernel_size = (1, 1)

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: CIMSpec, options: Optional[QuantizerOptions] = None) -> "CIMLinear":
        """CIM version of ``linear`` sharing its Parameters."""
        return cls(linear.weight, linear.bias, spec, options)

    from_float = from_linear

    def _conv(self, x, weight, groups):
        return F.conv2d(x, weight.reshape(*weight.shape[:2], 1, 1), None, 1, 0, 1, groups)

    def simulate(self, x: torch.Tensor, trace: bool = False):
        """As `CIMConv2d.simulate`, on (..., in_features) inputs; 4-D trace tensors have H = W = 1."""
        leading = x.shape[:-1]
        result = super().simulate(x.reshape(-1, self.in_features, 1, 1), trace)
        output = result[0] if trace else result
        output = output.reshape(*leading, self.out_features)
        if trace:
            return output, result[1]
        return output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.simulate(x)


def cim_layers(model: nn.Module) -> list:
    """``(name, layer)`` of every CIM layer of ``model``."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _CIMLayerBase)]


def iter_quantizers(model: nn.Module, roles: Optional[Iterable[str]] = None) -> Iterator[tuple]:
    """``(layer_name, role, quantizer)`` of every existing quantizer of every CIM layer of ``model``.

    Layers come in model order (``named_modules``), and within a layer the roles in `QUANTIZER_ROLES` order
    (input, weight, psum); roles a layer leaves float (None) are skipped.

    Args:
        model: any module holding CIM layers (a network, a block).
        roles: only these roles, among ``"input"``, ``"weight"``, ``"psum"``; None = all.

    Raises:
        ValueError: a role that is not one of `QUANTIZER_ROLES`.
    """
    if roles is not None:
        roles = tuple(roles)
        unknown = [role for role in roles if role not in QUANTIZER_ROLES]
        if unknown:
            raise ValueError(f"unknown quantizer role(s) {unknown}: expected some of {list(QUANTIZER_ROLES)}")
    return (
        (name, role, quantizer)
        for name, layer in cim_layers(model)
        for role, quantizer in layer.quantizers().items()
        if roles is None or role in roles
    )
