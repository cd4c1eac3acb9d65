"""A `DeviceSpec` applied inside the CIM layers: programmed cells, read noise, ADC errors, drift compensation.

Where the physics acts (`_CIMLayerBase.simulate` calls the three hooks of `DeviceModel`):

1. ``program``: the integer weight digits of every cell (and the reference column of offset slicing) become
   the conductances a chip holds, expressed back in *digit units* so that the partial sums stay in the units
   the ADC and the digital shift-add expect. A cell of digit d is programmed to G = g_off + d dG
   (dG = (g_on - g_off) / (2^b_c - 1)), with a relative error, or stuck at g_off / g_on, then drifts,
   G(t) = G ((t0 + t)/t0)^-nu. The column current sums G over the driven rows; the g_off term of every driven
   row is cancelled the way a macro cancels it before the ADC: **[choice]** a dummy column of g_off cells on
   the same rows, read in the same cycle and subtracted from every column (an analog offset subtraction). The
   dummy column is idealised: exactly g_off, drifting with the mean nu. A signed digit (top slice of
   two's-complement slicing) is a differential pair (G+ holds max(d, 0), G- holds max(-d, 0)) whose g_off
   terms cancel each other. So a cell reads ``d_eff = G(t)/dG - g0 k_mean`` (unsigned) or
   ``G+(t)/dG - G-(t)/dG`` (pair), with g0 = g_off/dG and k_mean = ((t0 + t)/t0)^-nu_mean; ideal cells give
   d_eff = d exactly.
2. ``analog_psums``: per conversion, the read noise of the driven cells (variance sum_i a_i^2 (read_sigma
   G_i/dG)^2, computed with one more grouped convolution of the squared input digits) and the ADC's
   input-referred errors: ``p (1 + gain_c) + step_c (offset_c + noise z)`` with gain and offset per ADC column
   c (drawn once per chip), noise per conversion, ``step_c`` the ADC's LSB in partial-sum units.
3. ``gain``: with drift compensation, the layer output times read_out(0) / read_out(t), read_out being the
   mean |d_eff| of all cells each read alone (aihwkit's ``GlobalDriftCompensation``: one-hot inputs, the mean
   absolute output); a digital multiply after the ADCs.

Modes (`DeviceModel.mode`): ``"chip"`` draws every per-cell and per-ADC quantity from a generator seeded by
(chip seed, layer name, quantity), so the same seed is the same chip on any device and in any order;
``"fresh"`` draws them anew from the global random generator at every forward pass (noise-aware PTQ/QAT: the
training step has seeded it, so a resumed run draws the same chips); ``"ideal"`` switches the device off.
Per-conversion noise (read noise, ADC noise) always comes from the global generator.

Model verbs: `attach_device_`, `set_device_mode_`, `device_mode` (context manager), `attached_device`.
With a device on, ``layer.simulate(x, trace=True)`` reports the analog partial sums (cells, read noise and ADC
errors included) under ``partial_sums``; the export writes the programmed digits, never a chip's draws.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from typing import Iterator, Optional

import torch
from torch import nn

from cimq_pl.quant.device import DeviceSpec
from cimq_pl.seeding import derive_seed

__all__ = ["DEVICE_MODES", "DeviceModel", "active_device", "attach_device_", "attached_device", "device_mode",
           "set_device_mode_"]

DEVICE_MODES = ("ideal", "chip", "fresh")

# one generator stream per drawn quantity: adding a quantity never changes the others of the same chip
_STREAMS = {name: index for index, name in enumerate(
    ("program+", "program-", "stuck+", "stuck-", "nu+", "nu-", "ref_program", "ref_stuck", "ref_nu",
     "adc_offset", "adc_gain"))}


class DeviceModel:
    """The device of one CIM layer (``layer.device_model``); not a module, so never in a state_dict.

    Args:
        spec: the device.
        key: the layer's identity within the chip (a hash of its name in the model).
        mode: ``"chip"``, ``"fresh"`` or ``"ideal"`` (module docstring).
        seed: the chip (None = ``spec.seed``).
        time: seconds since programming at which the chip is read (None = ``spec.read_time``).
    """

    def __init__(self, spec: DeviceSpec, key: int, mode: str = "chip", seed: Optional[int] = None,
                 time: Optional[float] = None) -> None:
        self.spec = spec
        self.key = int(key)
        self._draws: dict = {}
        self._fresh: dict = {}
        self.mode, self.seed, self.time = "ideal", spec.seed, spec.read_time
        self.set(mode, seed, time)
        self._read_variance = None

    def set(self, mode: Optional[str] = None, seed: Optional[int] = None, time: Optional[float] = None) -> None:
        """Change the mode, the chip (``seed``) or the read time; None keeps the current value."""
        if mode is not None:
            if mode not in DEVICE_MODES:
                raise ValueError(f"device mode {mode!r} is invalid: expected one of {list(DEVICE_MODES)}")
            self.mode = mode
        if seed is not None and int(seed) != self.seed:
            self.seed = int(seed)
            self._draws.clear()
        if time is not None:
            if not time >= 0:
                raise ValueError(f"read time {time!r} is invalid: expected seconds >= 0")
            self.time = float(time)

    @property
    def active(self) -> bool:
        """Whether the layer must run the device hooks (not ideal mode, and some non-ideality on)."""
        return self.mode != "ideal" and not self.spec.is_ideal_at(self.time)

    def __deepcopy__(self, memo):  # a copied model is the same chip; the cached draws are rebuilt on demand
        return DeviceModel(self.spec, self.key, self.mode, self.seed, self.time)

    # ------------------------------------------------------------------ random draws
    def _draw(self, name: str, shape: tuple, like: torch.Tensor, uniform: bool = False) -> torch.Tensor:
        """A (shape) tensor of N(0, 1) (or U[0, 1)) values: the chip's, or this forward pass's fresh ones.

        Chip draws come from a CPU generator seeded by (chip seed, layer, quantity) and are cached; fresh draws
        come from the global generator and are kept for the rest of the forward pass (``program`` starts one),
        so that the drift-compensation read-out and every row-block part see the same cells and ADCs.
        """
        key = (name, tuple(shape), like.device, like.dtype)
        store = self._fresh if self.mode == "fresh" else self._draws
        cached = store.get(key)
        if cached is None:
            sample = torch.rand if uniform else torch.randn
            if self.mode == "fresh":
                cached = sample(tuple(shape), device=like.device, dtype=like.dtype)
            else:
                generator = torch.Generator().manual_seed(derive_seed(self.seed, self.key, _STREAMS[name]))
                with torch.inference_mode(False):  # a normal tensor: usable later outside inference mode
                    cached = sample(tuple(shape), generator=generator).to(device=like.device, dtype=like.dtype)
            store[key] = cached
        return cached

    # ------------------------------------------------------------------ 1. programmed cells
    def _cell_levels(self, digits: torch.Tensor, streams: tuple, time: float, levels: int, g0: float) -> torch.Tensor:
        """G(t) / dG of cells programmed to ``digits`` (>= 0): programming error, stuck-at faults, drift.

        ``streams`` names the draws (programming error, stuck-at, nu) of these cells.
        """
        spec = self.spec
        shape = tuple(digits.shape)
        value = digits + g0
        if spec.programming_sigma > 0:
            z = self._draw(streams[0], shape, digits)
            if spec.programming_distribution == "normal":
                value = value * (1 + spec.programming_sigma * z).clamp_min(0)
            else:
                value = value * torch.exp(spec.programming_sigma * z - spec.programming_sigma**2 / 2)
        if spec.stuck:
            stuck_off, stuck_on = self._stuck(streams[1], shape, digits)
            value = torch.where(stuck_off, torch.full_like(value, g0), value)
            value = torch.where(stuck_on, torch.full_like(value, levels + g0), value)
        if spec.drifts and time > 0:
            nu = (spec.drift_nu_mean + spec.drift_nu_std * self._draw(streams[2], shape, digits)).clamp_min(0)
            value = value * torch.exp(-math.log1p(time / spec.t0) * nu)
        return value

    def _stuck(self, stream: str, shape: tuple, like: torch.Tensor) -> tuple:
        """(stuck at g_off, stuck at g_on): the boolean fault maps of the cells drawn from ``stream``."""
        u = self._draw(stream, shape, like, uniform=True)
        off, on = self.spec.stuck_off_prob, self.spec.stuck_on_prob
        return u < off, (u >= off) & (u < off + on)

    def _pair_targets(self, slices: torch.Tensor, signed: torch.Tensor, levels: int) -> tuple:
        """The digits the two cells of each pair are programmed to: max(d, 0) and max(-d, 0), or, with
        ``stuck_compensation``, the partner of a cell stuck at g_on set to absorb it (G+ stuck on: G- holds
        clamp(L - d, 0, L); G- stuck on: G+ holds clamp(d + L, 0, L)), so that the pair reads d, or 0 when d has
        the stuck cell's sign against it. A cell stuck at g_off is left as is: its partner already holds all a
        pair can still read."""
        positive = torch.where(slices >= 0, slices, torch.zeros_like(slices))
        negative = torch.where(slices < 0, -slices, torch.zeros_like(slices))
        if not (self.spec.stuck_compensation and self.spec.stuck_on_prob > 0 and bool(signed.any())):
            return positive, negative
        shape = tuple(slices.shape)
        plus_off, plus_on = self._stuck("stuck+", shape, slices)
        minus_off, minus_on = self._stuck("stuck-", shape, slices)
        plus_on, minus_on = plus_on & ~(minus_off | minus_on) & signed, minus_on & ~(plus_off | plus_on) & signed
        negative = torch.where(plus_on, (levels - slices).clamp(0, levels), negative)
        positive = torch.where(minus_on, (slices + levels).clamp(0, levels), positive)
        return positive, negative

    def _effective(self, slices: torch.Tensor, signed: torch.Tensor, ref_cells: Optional[torch.Tensor],
                   time: float, levels: int, g0: float) -> tuple:
        """(d_eff of the weight cells, d_eff of the reference cells or None, G/dG of the read cells (plus, minus,
        reference) for the read noise)."""
        k_mean = self.spec.drift_factor(self.spec.drift_nu_mean, time) if self.spec.drifts else 1.0
        positive, negative = self._pair_targets(slices, signed, levels)
        plus = self._cell_levels(positive, ("program+", "stuck+", "nu+"), time, levels, g0)
        minus = None
        if bool(signed.any()):
            minus = self._cell_levels(negative, ("program-", "stuck-", "nu-"), time, levels, g0)
            cells = plus - torch.where(signed, minus, torch.full_like(minus, g0 * k_mean))
        else:
            cells = plus - g0 * k_mean
        reference = ref_level = None
        if ref_cells is not None:
            ref_level = self._cell_levels(ref_cells, ("ref_program", "ref_stuck", "ref_nu"), time, levels, g0)
            reference = ref_level - g0 * k_mean
        return cells, reference, (plus, minus, ref_level)

    def program(self, layer: nn.Module, slices: torch.Tensor, ref_digit: int) -> tuple:
        """The cells of ``layer`` as the chip holds them, in digit units (starts a forward pass's draws).

        Args:
            layer: the CIM layer (its geometry gives the cell bits, slice signs and reference columns).
            slices: (n_slices, C_out, C_in/g, k_h, k_w) weight digits (integers, or AdaRound's soft digits).
            ref_digit: the reference-column digit of offset slicing (0: no reference column).

        Returns:
            ``(cells, reference, gain)``: cells like ``slices``; the reference cells (G, n_col_blocks,
            C_in/g, k_h, k_w), or ``ref_digit`` itself when they are ideal or absent; the drift-compensation
            gain (a 0-dim tensor, 1 without compensation). Differentiable in ``slices`` (d d_eff / d d is the
            cell's gain); ideal cells are returned unchanged (``slices`` itself).
        """
        geo, spec = layer.geometry, self.spec
        self._fresh, self._read_variance = {}, None
        gain = slices.new_ones(())
        if not (spec.cells_at(self.time) or spec.read_noise):
            return slices, ref_digit, gain
        levels = 2**geo.cell_bits - 1
        g0 = spec.off_levels(geo.cell_bits)
        signed = torch.tensor(geo.slice_signed(), device=slices.device).view(-1, 1, 1, 1, 1)
        ref_cells = None
        if ref_digit:
            ref_cells = slices.new_full((geo.groups, geo.n_col_blocks, *slices.shape[2:]), float(ref_digit))
        cells, reference, (plus, minus, ref_level) = self._effective(slices, signed, ref_cells, self.time, levels, g0)
        if spec.read_noise:
            with torch.no_grad():
                variance = plus.square()
                if minus is not None:
                    variance = variance + torch.where(signed, minus.square(), torch.zeros_like(minus))
                ref_variance = spec.read_sigma**2 * ref_level.square() if ref_level is not None else ref_digit
                self._read_variance = (spec.read_sigma**2 * variance, ref_variance)
        if not spec.cells_at(self.time):  # only read noise: the programmed cells are the ideal digits
            return slices, ref_digit, gain
        if spec.drift_compensation and spec.drifts and self.time > 0:
            with torch.no_grad():
                at_t0, ref_t0, _ = self._effective(slices, signed, ref_cells, 0.0, levels, g0)
                gain = _read_out(at_t0, ref_t0) / _read_out(cells, reference)
        return cells, (reference if reference is not None else ref_digit), gain

    # ------------------------------------------------------------------ 2. analog partial sums
    def analog_psums(self, layer: nn.Module, psums: list, stacked: torch.Tensor, metas: list) -> list:
        """What the ADCs of ``layer`` see: the partial sums of each part plus read noise and ADC errors.

        Args:
            layer: the CIM layer.
            psums: per row-block part, (n_cycles * N, G * blocks * K, H, W) partial sums of the programmed cells.
            stacked: the input digits of all cycles, (n_cycles * N, C_in, H, W), as the array convolution read them.
            metas: per part, (ADC alpha group, signed) per channel (`_CIMLayerBase._channel_meta`).
        """
        spec, pq = self.spec, layer.psum_quantizer
        out = []
        for index, psum in enumerate(psums):
            if self._read_variance is not None:
                variance_weight = layer._part_weight(self._read_variance[0], index, self._read_variance[1])
                with torch.no_grad():
                    part_input = layer._part_input(stacked, index)
                    groups = layer.geometry.groups * len(layer.parts[index].row_blocks)
                    std = layer._conv(part_input.square(), variance_weight, groups).clamp_min(0).sqrt()
                psum = psum + std * torch.randn_like(psum)
            if spec.adc_errors and pq is not None and pq.enabled and pq.initialized:
                psum = self._adc_errors(layer, psum, index, pq.channel_params(*metas[index])[0])
            out.append(psum)
        return out

    def _adc_errors(self, layer: nn.Module, psum: torch.Tensor, index: int, step: torch.Tensor) -> torch.Tensor:
        geo, spec = layer.geometry, self.spec
        blocks = getattr(layer, f"_part{index}_blocks")
        columns = psum.shape[1] // (geo.groups * blocks.numel())
        every_adc = (geo.groups, geo.n_row_blocks, columns)  # one ADC per column of every array

        def per_channel(name: str) -> torch.Tensor:
            return self._draw(name, every_adc, psum).index_select(1, blocks).reshape(1, -1, 1, 1)

        view = step.reshape(1, -1, 1, 1)
        if spec.adc_gain_sigma > 0:
            psum = psum * (1 + spec.adc_gain_sigma * per_channel("adc_gain"))
        error = 0
        if spec.adc_offset_lsb > 0:
            error = spec.adc_offset_lsb * per_channel("adc_offset")
        if spec.adc_noise_lsb > 0:
            error = error + spec.adc_noise_lsb * torch.randn_like(psum)
        return psum + view * error if not isinstance(error, int) else psum


def _read_out(cells: torch.Tensor, reference: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean |d_eff| of every cell read alone (one-hot inputs): aihwkit's global drift-compensation read-out."""
    total, count = cells.abs().sum(), cells.numel()
    if reference is not None:
        total, count = total + reference.abs().sum(), count + reference.numel()
    return (total / count).clamp_min(1e-12)


def active_device(layer: nn.Module) -> Optional[DeviceModel]:
    """The layer's `DeviceModel` when its hooks must run, else None (ideal cells: the exact integer path)."""
    device = getattr(layer, "device_model", None)
    return device if device is not None and device.active else None


def _layer_key(name: str) -> int:
    return zlib.crc32(name.encode())


def attach_device_(model: nn.Module, device: Optional[DeviceSpec], mode: str = "chip", seed: Optional[int] = None,
                   time: Optional[float] = None) -> int:
    """Give every CIM layer of ``model`` the device ``device`` (None removes it), in place.

    A layer's chip identity is its name in ``model``, so attach on the whole network (names as in
    ``model.named_modules()``) for a chip to be the same whatever part of the model is run.

    Args:
        model: a converted model (`convert_to_cim`).
        device: the device, or None for ideal cells and ADCs.
        mode: ``"chip"`` (default: the chip ``seed`` read at ``time``), ``"fresh"`` or ``"ideal"``.
        seed: the chip (None = ``device.seed``).
        time: seconds since programming (None = ``device.read_time``).

    Returns:
        The number of CIM layers given the device.
    """
    from cimq_pl.quant.layers import cim_layers

    layers = cim_layers(model)
    for name, layer in layers:
        layer.device_model = None if device is None else DeviceModel(device, _layer_key(name), mode, seed, time)
    return len(layers)


def attached_device(model: nn.Module) -> Optional[DeviceSpec]:
    """The `DeviceSpec` attached to the CIM layers of ``model`` (the first one found), or None."""
    from cimq_pl.quant.layers import cim_layers

    for _, layer in cim_layers(model):
        if getattr(layer, "device_model", None) is not None:
            return layer.device_model.spec
    return None


def set_device_mode_(model: nn.Module, mode: Optional[str] = None, seed: Optional[int] = None,
                     time: Optional[float] = None) -> None:
    """Set the mode, chip seed and read time of every attached device (None keeps each value)."""
    from cimq_pl.quant.layers import cim_layers

    for _, layer in cim_layers(model):
        if getattr(layer, "device_model", None) is not None:
            layer.device_model.set(mode, seed, time)


@contextlib.contextmanager
def device_mode(model: nn.Module, mode: Optional[str] = None, seed: Optional[int] = None,
                time: Optional[float] = None) -> Iterator[None]:
    """`set_device_mode_` for the duration of a ``with`` block; every layer's previous settings come back."""
    from cimq_pl.quant.layers import cim_layers

    devices = [layer.device_model for _, layer in cim_layers(model) if getattr(layer, "device_model", None) is not None]
    saved = [(d.mode, d.seed, d.time) for d in devices]
    try:
        for device in devices:
            device.set(mode, seed, time)
        yield
    finally:
        for device, (old_mode, old_seed, old_time) in zip(devices, saved):
            device.set(old_mode, old_seed, old_time)
