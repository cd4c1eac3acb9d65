"""Fast simulation of a CIM layer: channels-last array convolutions and one compiled pass around them.

A CIM layer (`layers.py`) runs one of two simulations, chosen per layer by ``layer.simulation`` (None: the
process default `default_simulation()`, ``"eager"`` unless the environment variable ``CIMQ_SIMULATION`` says
``"compiled"``; `set_simulation` sets a whole model):

* ``"eager"`` (default): plain PyTorch operators, bit for bit the results (forward values and gradients) of
  the original implementation. The input digits of all cycles feed one grouped convolution per row-block
  part; the ADC with the cycle shift-add (`PsumQuantizer.convert_and_sum`), then the per-tile scales and the
  shift-add over slices and row blocks (``_CIMLayerBase._shift_add``) follow as passes over the partial sums.
  Where no gradient is needed (evaluation) and the partial sums are exact integers (quantized inputs and
  weights, codes rounded), the convolutions run channels-last (`channels_last_psums`) and the ADC in place:
  integer sums do not depend on the summation order, so the bits stay the same.
* ``"compiled"``: `_CompiledLayer`. The digit split before the convolutions and everything after them (ADC
  clip, round and code, cycle shift-add, slice and row-block shift-add, per-tile scales, input scale, bias)
  are ``torch.compile`` kernels, one pass over the partial sums for the forward and one for the backward
  (straight-through round, zero gradient where the ADC clips); Inductor writes C++/OpenMP code on the CPU and
  Triton code on CUDA. Convolutions are channels-last throughout. The gradient of the input codes is one
  transposed convolution of the ``N`` images instead of one per cycle: the straight-through digit split
  averages the digit gradients divided by their cycle weights and the convolution is linear, so
  ``d codes = conv_T(sum_j d psum_j / (n w_j))``. ADC codes are the eager ones; the forward values differ
  from the eager ones at most by the order of float sums (row blocks and slices, which PyTorch's own reduction
  orders by shape and vector width; convolutions of non-integer digits), the gradients likewise. QDrop on the
  ADC (partial-sum dropping) draws the eager path's masks, in its order, and runs in the same two kernels.
  Traces, event counting (``collect_stats``) and ADC calibration run eagerly. Where compilation
  fails (no C++ compiler, no Triton) the layers warn once and run eagerly.

Compilation happens once per layer configuration (and batch size, until shapes turn dynamic); Inductor
caches the generated code on disk (``TORCHINDUCTOR_CACHE_DIR``), so a later process reuses it.
"""

from __future__ import annotations

import os
import warnings
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from cimq_pl.errors import ConfigError
from cimq_pl.quant.digits import digit_planes
from cimq_pl.quant.dropping import keep_mask
from cimq_pl.quant.ste import constant_tensor

__all__ = [
    "SIMULATIONS",
    "channels_last_psums",
    "compiled_layer",
    "compiled_simulation_available",
    "default_simulation",
    "set_default_simulation",
    "set_simulation",
]

#: The simulation paths of a CIM layer (``layer.simulation``).
SIMULATIONS = ("eager", "compiled")
_CHANNELS_LAST = torch.channels_last


def _check_simulation(mode: str, where: str) -> str:
    if mode not in SIMULATIONS:
        raise ConfigError(f"{where}={mode!r} is invalid: expected one of {list(SIMULATIONS)}")
    return mode


_default = _check_simulation(os.environ.get("CIMQ_SIMULATION", "eager"), "CIMQ_SIMULATION")


def default_simulation() -> str:
    """The simulation of CIM layers whose ``simulation`` is None (``"eager"`` unless set otherwise)."""
    return _default


def set_default_simulation(mode: str) -> None:
    """Set the process-wide default simulation (``"eager"`` or ``"compiled"``).

    Raises:
        ConfigError: on another value.
    """
    global _default
    _default = _check_simulation(mode, "simulation")


def set_simulation(model: nn.Module, mode: Optional[str]) -> int:
    """Set ``simulation`` on every CIM layer of ``model`` (None: follow the process default).

    Returns:
        The number of CIM layers set.

    Raises:
        ConfigError: on an unknown mode.
    """
    from cimq_pl.quant.layers import cim_layers

    if mode is not None:
        _check_simulation(mode, "model.simulation")
    layers = cim_layers(model)
    for _, layer in layers:
        layer.simulation = mode
    return len(layers)


# ---------------------------------------------------------------------------------------------- convolutions
class InputSplit(NamedTuple):
    """How input codes are cut into per-cycle digits (arguments of `digit_planes`)."""

    shifts: tuple
    widths: tuple
    cycle_weights: tuple
    qmin: int
    qmax: int
    exact: bool


class ConvParams(NamedTuple):
    """stride, padding, dilation (pairs of ints) and groups of one grouped array convolution."""

    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int


def _digits(codes: torch.Tensor, split: Optional[InputSplit]) -> torch.Tensor:
    """Digits of all cycles stacked in the batch dimension, (n_cycles * N, C, H, W), channels-last."""
    if split is None:
        return codes.contiguous(memory_format=_CHANNELS_LAST)
    codes = codes.contiguous(memory_format=_CHANNELS_LAST)
    planes = digit_planes(codes, split.shifts, split.widths, 0, split.qmin, split.qmax, split.exact)
    return planes.reshape(-1, *codes.shape[1:])


def _conv(digits: torch.Tensor, weight: torch.Tensor, conv: ConvParams) -> torch.Tensor:
    weight = weight.contiguous(memory_format=_CHANNELS_LAST)
    return F.conv2d(digits, weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)


def _conv_grads(grad_psums, digits, combined, like_input, weight, conv: ConvParams, need_input: bool,
                need_weight: bool) -> tuple:
    """(d input, d weight) of the array convolution.

    ``combined`` (N, K, H, W) is the cycle-combined output gradient for the input codes, ``grad_psums``
    (n_cycles * N, K, H, W) the per-cycle one for the weight; ``like_input`` has the shape of one cycle's input.
    """
    grad_input = grad_weight = None
    weight_cl = weight.contiguous(memory_format=_CHANNELS_LAST)
    args = (None, list(conv.stride), list(conv.padding), list(conv.dilation), False, [0, 0], conv.groups)
    if need_input:
        grad_input = torch.ops.aten.convolution_backward(
            combined, like_input, weight_cl, *args, [True, False, False])[0]
    if need_weight:
        grad_weight = torch.ops.aten.convolution_backward(
            grad_psums, digits, weight_cl, *args, [False, True, False])[1]
    return grad_input, grad_weight


@torch.no_grad()
def channels_last_psums(codes: torch.Tensor, weight: torch.Tensor, split: InputSplit, conv: ConvParams):
    """Partial sums (n_cycles * N, K, H_out, W_out), channels-last, of the digits of ``codes`` under ``weight``
    (no gradient; used where the partial sums are exact integers, so the layout cannot change a bit).

    Args:
        codes: (N, C, H, W) integer input codes of one row-block part.
        weight: the part's grouped-conv weight (K, C / groups, k_h, k_w), integer digits.
        split: how codes become per-cycle digits.
        conv: stride, padding, dilation and groups.
    """
    return _conv(_digits(codes, split), weight, conv)


def cycle_pack(weights: list, split: InputSplit, dtype: torch.dtype) -> int:
    """The factor S (a power of two) that lets one convolution compute the partial sums of two input cycles
    exactly, or 0 where it cannot.

    With integer digits and weights, a cycle's partial sum p_j is an integer with |p_j| <= B (B = the largest
    sum of |weight| over one column's rows times the largest digit). The convolution of d_2i + S d_2i+1 gives
    p_2i + S p_2i+1 exactly while (S + 1) B stays below 2^mantissa, and S > 2B makes the pair unique:
    p_2i+1 = round(P / S), p_2i = P - S p_2i+1 (`_unpack_cycles`). For W4 weights on 128 rows and 1-bit
    digits, B <= 1024 and S = 4096, well inside float32's 2^24: half the convolution work, the same bits.
    Used without gradients only (evaluation); needs an even number of cycles.
    """
    mantissa = {torch.float32: 24, torch.float64: 53}.get(dtype)
    if mantissa is None or len(split.widths) % 2 or not split.exact:
        return 0
    max_digit = max(max(abs(split.qmin >> shift), abs(split.qmax >> shift)) if not width else 2**width - 1
                    for shift, width in zip(split.shifts, split.widths))
    bound = max(float(w.abs().sum((1, 2, 3)).max()) for w in weights) * max_digit
    factor = 1 << int(2 * bound).bit_length()  # > 2 * bound
    return factor if (factor + 1) * bound < 2**mantissa else 0


def _unpack_cycles(packed: torch.Tensor, factor: int) -> list:
    """Per-cycle partial sums [p_0, p_1, ...] of cycle-pair partial sums (n_cycles / 2, ...) (`cycle_pack`)."""
    cycles = []
    for pair in range(packed.shape[0]):
        high = torch.round(packed[pair] * (1.0 / factor))
        cycles += [packed[pair] - high * factor, high]
    return cycles


# ------------------------------------------------------------------------------------------ compiled kernels
class PostConfig(NamedTuple):
    """Static description of what follows the array convolutions of a layer (compile-time constants)."""

    cycle_weights: tuple  # shift-add weight of each input cycle
    part_blocks: tuple  # number of row blocks of each part
    groups: int
    cout_g: int  # output columns per group
    n_slices: int
    n_ref: int  # reference columns per array (offset slicing), 0 otherwise
    adc: bool  # whether the ADC quantizes (False: ideal ADC)
    scaled: bool  # whether the shift-add multiplies (slice weights, tile scales or reference columns)
    input_scale: bool
    bias: bool
    pack: int = 0  # > 0: the convolutions ran on cycle pairs d_2i + pack * d_2i+1 (`cycle_pack`)
    psum_keep_prob: Optional[float] = None  # QDrop on the ADC: each conversion keeps its code with this probability


def _sequential_sum(terms: list) -> torch.Tensor:
    """``terms[0] + terms[1] + ...`` left to right (the order of PyTorch's own small reductions in most shapes)."""
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


def _cycle_sum_nhwc(codes: torch.Tensor, cycle_weights: tuple) -> torch.Tensor:
    terms = [codes[j] if w == 1 else codes[j] * w for j, w in enumerate(cycle_weights)]
    return _sequential_sum(terms)


def _adc_codes(P, step, qmin, qmax, offset=None):
    """(P / step, the ADC's level of P in steps): clamp(round(P / step - z), qmin, qmax) + z, z the per-channel
    offset of an asymmetric ADC (None: 0)."""
    normalized = P / step
    if offset is None:
        return normalized, torch.clamp(torch.round(normalized), qmin, qmax)
    return normalized, torch.clamp(torch.round(normalized - offset), qmin, qmax) + offset


def _part_output(u, coef, ref_coef, ref_index, n_blocks: int, cfg: PostConfig):
    """Shift-add of one part, NHWC: u (N, H, W, G * blocks * K) -> (N, H, W, G, C_out/g), plus what the
    backward pass needs: (output, columns (N, H, W, G, blocks * slices, C_out/g) or None, gathered reference
    values (N, H, W, G, blocks, C_out/g) or None)."""
    n, h, w, _ = u.shape
    g, cout_g, n_slices, n_ref = cfg.groups, cfg.cout_g, cfg.n_slices, cfg.n_ref
    per_block = u.view(n, h, w, g, n_blocks, n_slices * cout_g + n_ref)
    if not cfg.scaled:
        return _sequential_sum([per_block[:, :, :, :, b] for b in range(n_blocks)]), None, None
    columns = per_block[..., : n_slices * cout_g].reshape(n, h, w, g, n_blocks * n_slices, cout_g)
    out = _sequential_sum([columns[:, :, :, :, i] * coef[:, i] for i in range(n_blocks * n_slices)])
    gathered = None
    if n_ref:
        gathered = per_block[..., n_slices * cout_g:][..., ref_index]
        out = out + _sequential_sum([gathered[:, :, :, :, b] * ref_coef[:, b] for b in range(n_blocks)])
    return out, columns, gathered


def _adc_values(P, codes, step, keep, cfg: PostConfig):
    """The cycle-summed ADC output of one part, NHWC (N, H, W, K_p): sum_j w_j step code_j, or, under QDrop on
    the ADC (``keep`` (n_cycles, N, H, W, K_p) uint8, 1 = keep), the raw partial sum P_j where a conversion is
    dropped. ``lerp`` at weights 0 and 1 is exact; Inductor's CPU code does not vectorise a ``where`` on a loaded
    mask (about 10x slower here), but does the uint8-to-float conversion."""
    if keep is None:
        return _cycle_sum_nhwc(codes, cfg.cycle_weights) * step
    return _cycle_sum_nhwc([torch.lerp(P[j], codes[j] * step, keep[j].to(P.dtype)) for j in range(len(codes))],
                           cfg.cycle_weights)


def _post_forward(psums, psum_keeps, steps, qmins, qmaxs, offsets, coefs, ref_coefs, ref_index, input_step, bias,
                  cfg: PostConfig):
    """ADC, cycle shift-add, per-tile scales, shift-add, input scale and bias: NHWC partial sums
    (n_cycles, N, H, W, K_p) of each part -> NHWC output (N, H, W, C_out); ``psum_keeps``: per part the QDrop
    mask of the conversions (None: every conversion quantizes); ``offsets``: per part the ADC offsets in steps
    (None: a symmetric ADC)."""
    out = None
    for p, P in enumerate(psums):
        cycles = _unpack_cycles(P, cfg.pack) if cfg.pack else P
        if cfg.adc:
            codes = [_adc_codes(cycle, steps[p], qmins[p], qmaxs[p], offsets[p])[1] for cycle in cycles]
            u = _adc_values(cycles, codes, steps[p], psum_keeps[p], cfg)
        else:
            u = _cycle_sum_nhwc(cycles, cfg.cycle_weights)
        part, _, _ = _part_output(u, coefs[p], ref_coefs[p], ref_index, cfg.part_blocks[p], cfg)
        out = part if out is None else out + part
    n, h, w = out.shape[:3]
    out = out.reshape(n, h, w, cfg.groups * cfg.cout_g)
    if cfg.input_scale:
        out = out * input_step
    if cfg.bias:
        out = out + bias
    return out


def _sum_pixels(t: torch.Tensor) -> torch.Tensor:
    """Sum of an NHWC tensor over N, H and W, per channel: per image first, then over the images. One reduction
    over all pixels keeps the channels as the only parallel dimension, which Inductor's CPU code runs on one thread
    for a few channels (one vector); per image, it runs over images x channels."""
    return t.sum((1, 2)).sum(0)


def _post_backward(grad_out, psums, psum_keeps, steps, qmins, qmaxs, offsets, coefs, ref_coefs, ref_index,
                   ref_onehot, input_step, cfg: PostConfig, need_psums: bool, need_combined: bool):
    """Gradients of `_post_forward` (straight-through round, zero gradient where the ADC clips, identity where
    QDrop dropped the conversion) for the NHWC output gradient ``grad_out`` (N, H, W, C_out).

    Returns ``(grad_psums, combined, grad_steps, grad_offsets, grad_coefs, grad_ref_coefs, grad_input_step,
    grad_bias)``, per part where a list: grad_psums (n_cycles, N, H, W, K_p), combined = sum_j grad_psums_j /
    (n w_j) (N, H, W, K_p) for the input codes; grad_offsets None for a symmetric ADC.
    """
    n, h, w, c = grad_out.shape
    g, cout_g = cfg.groups, cfg.cout_g
    n_cycles = len(cfg.cycle_weights)
    grad = grad_out
    grad_bias = _sum_pixels(grad) if cfg.bias else None
    scaled_grad = grad * input_step if cfg.input_scale else grad
    grad5 = scaled_grad.reshape(n, h, w, g, 1, cout_g)
    results = ([], [], [], [], [], [])
    pre = None
    for p, P in enumerate(psums):
        n_blocks = cfg.part_blocks[p]
        keep = psum_keeps[p]
        if cfg.adc:
            normalized, codes = _adc_codes(P, steps[p], qmins[p], qmaxs[p], offsets[p])
            u = _adc_values(P, codes, steps[p], keep, cfg)
        else:
            u = _cycle_sum_nhwc(P, cfg.cycle_weights)
        part, columns, gathered = _part_output(u, coefs[p], ref_coefs[p], ref_index, n_blocks, cfg)
        pre = part if pre is None else pre + part
        grad_coef = grad_ref_coef = None
        if not cfg.scaled:
            grad_u = grad5.expand(n, h, w, g, n_blocks, cout_g)
        else:
            grad_u = grad5 * coefs[p]
            grad_coef = _sum_pixels(grad5 * columns)
            grad_u = grad_u.reshape(n, h, w, g, n_blocks, cfg.n_slices * cout_g)
            if cfg.n_ref:
                grad_ref_coef = _sum_pixels(grad5 * gathered)
                grad_ref = torch.matmul(grad5 * ref_coefs[p], ref_onehot)  # sum over each column block
                grad_u = torch.cat([grad_u, grad_ref], -1)
        grad_u = grad_u.reshape(n, h, w, -1)
        grad_offset = None
        if cfg.adc:  # per cycle, so that every output is written by the one loop over the partial sums
            low, high = (qmins[p], qmaxs[p]) if offsets[p] is None else (qmins[p] + offsets[p], qmaxs[p] + offsets[p])
            inside = [(normalized[j] >= low) & (normalized[j] <= high) for j in range(n_cycles)]
            local = [codes[j] - torch.where(inside[j], normalized[j], 0) for j in range(n_cycles)]
            if keep is None:
                passes = inside
                grad_psums = None
                if need_psums:
                    grad_psums = torch.stack([torch.where(inside[j], grad_u * wj, 0)
                                              for j, wj in enumerate(cfg.cycle_weights)])
            else:  # a dropped conversion passes its gradient and does not depend on the ADC step; float masks
                kept = [keep[j].to(grad_u.dtype) for j in range(n_cycles)]  # (see `_adc_values`)
                passes = [1 - k + k * inside[j].to(grad_u.dtype) for j, k in enumerate(kept)]
                grad_psums = torch.stack([grad_u * wj * passes[j] for j, wj in enumerate(cfg.cycle_weights)]
                                         ) if need_psums else None
                local = [local[j] * kept[j] for j in range(n_cycles)]
            grad_step = _sum_pixels(grad_u * _cycle_sum_nhwc(local, cfg.cycle_weights))
            if offsets[p] is not None:  # a clipped conversion moves with the offset, an unclipped one does not
                # (compared afresh: Inductor then computes it in the reduction's loop; ``1 - inside`` there reloads
                # the stored masks and made the backward pass 2.5x slower, measured on a 32-channel layer)
                clipped = [((normalized[j] < low) | (normalized[j] > high)).to(grad_u.dtype) for j in range(n_cycles)]
                if keep is not None:
                    clipped = [clipped[j] * kept[j] for j in range(n_cycles)]
                grad_offset = _sum_pixels(grad_u * _cycle_sum_nhwc(clipped, cfg.cycle_weights)) * steps[p]
            combined = None
            if need_combined:
                combined = grad_u * (_sequential_sum([passes[j].to(grad_u.dtype) for j in range(n_cycles)])
                                     * (1.0 / n_cycles))
        else:
            grad_psums = torch.stack([grad_u * wj for wj in cfg.cycle_weights]) if need_psums else None
            grad_step = None
            combined = grad_u if need_combined else None
        for store, value in zip(results, (grad_psums, combined, grad_step, grad_offset, grad_coef, grad_ref_coef)):
            store.append(value)
    grad_input_step = (grad * pre.reshape(n, h, w, c)).sum().reshape(1) if cfg.input_scale else None
    return (*results, grad_input_step, grad_bias)


class InputQuant(NamedTuple):
    """The input quantizer inside the compiled path: code range and bit-sparse projection (look-up table)."""

    qmin: int
    qmax: int
    sparse: bool


def _quantize(x, step, lut, keep, quant: InputQuant):
    """(codes, normalised inputs) with `UniformQuantizer.codes`' values: clamp(x / step), projected to the
    nearest allowed code (`ActivationQuantizer.project`); QDrop keeps ``x / step`` where ``keep`` is False."""
    normalized = x / step
    clamped = torch.clamp(normalized, quant.qmin, quant.qmax)
    if quant.sparse:
        index = torch.clamp(torch.ceil(clamped * 2) - 2 * quant.qmin, 0, 2 * (quant.qmax - quant.qmin))
        codes = lut[index.to(torch.int64)]
    else:
        codes = torch.round(clamped)
    if keep is not None:
        codes = torch.where(keep, codes, normalized)
    return codes, normalized


def _split_kernel(values: torch.Tensor, split: InputSplit, step=None, lut=None, keep=None,
                  quant: Optional[InputQuant] = None, pack: int = 0) -> torch.Tensor:
    """`digit_planes` of (N, C, H, W) codes in int32 arithmetic, NHWC: (n_cycles, N, H, W, C); with ``quant``,
    ``values`` are the float inputs, quantized first (`_quantize`); with ``pack``, the cycle pairs
    d_2i + pack * d_2i+1 (n_cycles / 2, N, H, W, C) (`cycle_pack`)."""
    codes_nhwc = values.permute(0, 2, 3, 1)
    if quant is not None:
        codes_nhwc, _ = _quantize(codes_nhwc, step, lut, None if keep is None else keep.permute(0, 2, 3, 1), quant)
    if split.exact:
        integer, residual = codes_nhwc.to(torch.int32), None
    else:
        floored = torch.clamp(torch.floor(codes_nhwc), split.qmin, split.qmax)
        integer, residual = floored.to(torch.int32), codes_nhwc - floored
    planes = []
    for shift, width in zip(split.shifts, split.widths):
        digit = integer >> shift
        if width:
            digit = digit & (2**width - 1)
        planes.append(digit.to(codes_nhwc.dtype))
    if residual is not None:
        planes[0] = planes[0] + residual
    if pack:
        planes = [planes[i] + planes[i + 1] * pack for i in range(0, len(planes), 2)]
    return torch.stack(planes)


def _quantize_backward(grad_codes, x, step, keep, quant: InputQuant):
    """(d x, d step) of `_quantize` (straight-through projection, zero gradient where clamped), NHWC."""
    normalized = x / step
    passes = (normalized >= quant.qmin) & (normalized <= quant.qmax)
    if keep is not None:
        passes = passes | ~keep
    grad_normalized = torch.where(passes, grad_codes, 0)
    grad_x = grad_normalized / step
    grad_step = -(grad_x * normalized).sum().reshape(1)
    return grad_x, grad_step


#: False runs the kernels of the compiled path without compiling them (same code, eagerly: for tests and
#: debugging; ``CIMQ_COMPILE_KERNELS=0`` in the environment).
COMPILE_KERNELS = os.environ.get("CIMQ_COMPILE_KERNELS", "1") != "0"
_compiled_kernels: dict = {}
# An asymmetric ADC's codes read five tensors (partial sums, step, offset, qmin, qmax); at Inductor's default of
# four reads a value used twice is stored and read back (`should_realize_on_reuse`), which made the backward
# pass of a 32-channel layer at batch 128 about 1.5x its symmetric time; at five it is recomputed in each loop
_ASYMMETRIC_BACKWARD_OPTIONS = {"realize_reads_threshold": 5}
_compile_failure: Optional[str] = None


def compiled_simulation_available() -> bool:
    """False once a compilation failed in this process (the layers then run eagerly)."""
    return _compile_failure is None


def _run_compiled(kernel, *args, inductor_options: Optional[dict] = None, **kwargs):
    """``kernel`` compiled with ``torch.compile`` (once per kernel and ``inductor_options``, Inductor config
    overrides; Inductor caches per shape and config); on a compilation failure warn once, remember it and run
    ``kernel`` eagerly."""
    global _compile_failure
    if COMPILE_KERNELS and _compile_failure is None:
        key = (kernel, tuple(sorted((inductor_options or {}).items())))
        compiled = _compiled_kernels.get(key)
        if compiled is None:
            import torch._dynamo

            config = torch._dynamo.config
            for name in ("recompile_limit", "cache_size_limit"):  # one entry per layer shape and batch size
                if hasattr(config, name):
                    setattr(config, name, max(getattr(config, name), 256))
                    break
            compiled = _compiled_kernels[key] = torch.compile(kernel, fullgraph=True, options=inductor_options)
        try:
            return compiled(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - any compiler failure falls back to eager
            first_line = (str(error).strip().splitlines() or [""])[0]
            _compile_failure = f"{type(error).__name__}: {first_line}"
            warnings.warn(f"CIM layers: torch.compile failed ({_compile_failure[:200]}); simulating eagerly "
                          "(simulation='eager')", RuntimeWarning, stacklevel=3)
    return kernel(*args, **kwargs)


def _batch_dynamic(tensor: Optional[torch.Tensor], dim: int = 0) -> Optional[torch.Tensor]:
    """Mark the batch dimension of a kernel argument dynamic (one compilation serves every batch size)."""
    if tensor is not None and COMPILE_KERNELS and _compile_failure is None:
        import torch._dynamo

        torch._dynamo.maybe_mark_dynamic(tensor, dim)
    return tensor


def _owning(view: torch.Tensor) -> torch.Tensor:
    """``view``'s memory as a tensor of its own, not an autograd view: a custom Function may not return a view of
    its own intermediate when the caller modifies the output in place (``relu_`` after a layer)."""
    return view.new_empty(0).set_(view.untyped_storage(), view.storage_offset(), view.size(), view.stride())


def _nhwc(tensor_4d: torch.Tensor, n_cycles: int) -> torch.Tensor:
    """A channels-last (n_cycles * N, K, H, W) tensor as its NHWC view (n_cycles, N, H, W, K)."""
    nhwc = tensor_4d.permute(0, 2, 3, 1)
    return nhwc.reshape(n_cycles, -1, *nhwc.shape[1:])


class _CompiledLayer(torch.autograd.Function):
    """A whole CIM layer after its weight quantizer: compiled input quantization and digit split, array
    convolutions, compiled post-conv forward; compiled post-conv backward, the convolution gradients,
    compiled input-quantizer backward.

    ``tensors``, each per part: the float inputs (``quant`` given) or the input codes, the conv weight, the ADC
    step, qmin, qmax, offset (None: symmetric), the shift-add coefficients, the reference-column coefficients, the
    QDrop keep mask (None where absent); then the input step, the bias and the bit-sparse projection table.
    """

    PER_PART = 9  # tensors per part in ``tensors``

    @staticmethod
    def forward(ctx, cfg, split, quant, convs, ref_index, ref_onehot, *tensors):
        n_parts, per_part = len(cfg.part_blocks), _CompiledLayer.PER_PART
        inputs, weights, steps, qmins, qmaxs, offsets, coefs, ref_coefs, keeps = (
            list(tensors[i * n_parts:(i + 1) * n_parts]) for i in range(per_part))
        input_step, bias, lut = tensors[per_part * n_parts:]
        n_cycles = len(cfg.cycle_weights)
        inputs = [t.contiguous(memory_format=_CHANNELS_LAST) for t in inputs]  # a transposing read is slower
        keeps = [None if k is None else k.contiguous(memory_format=_CHANNELS_LAST) for k in keeps]
        digits = [_digits_compiled(t, split, input_step, lut, k, quant, cfg.pack) for t, k in zip(inputs, keeps)]
        n_convolved = n_cycles // 2 if cfg.pack else n_cycles
        conv_outputs = [_conv(d, w, conv) for d, w, conv in zip(digits, weights, convs)]
        psums = [_batch_dynamic(_nhwc(t, n_convolved), 1) for t in conv_outputs]
        psum_keeps = [None] * n_parts
        if cfg.psum_keep_prob is not None:  # the eager path's draws: one mask per part, in NCHW order
            psum_keeps = [_batch_dynamic(_nhwc(keep_mask(t, cfg.psum_keep_prob).view(torch.uint8).contiguous(
                memory_format=_CHANNELS_LAST), n_cycles), 1) for t in conv_outputs]
        del conv_outputs
        out = _owning(_run_compiled(_post_forward, psums, psum_keeps, steps, qmins, qmaxs, offsets, coefs, ref_coefs,
                                    ref_index, input_step, bias, cfg).permute(0, 3, 1, 2))  # channels-last
        ctx.n_images = inputs[0].shape[0]
        ctx.save_for_backward(*digits, *weights, *psums, *steps, *qmins, *qmaxs, *offsets, *coefs, *ref_coefs,
                              input_step, *(inputs if quant is not None else [None] * n_parts), *keeps, *psum_keeps)
        ctx.cfg, ctx.quant, ctx.convs, ctx.ref_index, ctx.ref_onehot = cfg, quant, convs, ref_index, ref_onehot
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        cfg, quant, n_parts = ctx.cfg, ctx.quant, len(ctx.cfg.part_blocks)
        per_part = _CompiledLayer.PER_PART
        saved = ctx.saved_tensors
        digits, weights, psums, steps, qmins, qmaxs, offsets, coefs, ref_coefs = (
            list(saved[i * n_parts:(i + 1) * n_parts]) for i in range(per_part))
        input_step = saved[per_part * n_parts]
        first = per_part * n_parts + 1
        inputs, keeps, psum_keeps = (list(saved[first + i * n_parts:first + (i + 1) * n_parts]) for i in range(3))
        needs = ctx.needs_input_grad[6:]
        need_inputs, need_weights = needs[:n_parts], needs[n_parts:2 * n_parts]
        need_input_step = needs[per_part * n_parts]
        need_codes = [n or (quant is not None and need_input_step) for n in need_inputs]
        grad_nhwc = _batch_dynamic(grad_out.permute(0, 2, 3, 1).contiguous())
        grads = _run_compiled(_post_backward, grad_nhwc, psums, psum_keeps, steps, qmins, qmaxs, offsets, coefs,
                              ref_coefs, ctx.ref_index, ctx.ref_onehot, input_step, cfg, any(need_weights),
                              any(need_codes), inductor_options=_ASYMMETRIC_BACKWARD_OPTIONS
                              if any(o is not None for o in offsets) else None)
        grad_psums, combined, grad_steps, grad_offsets, grad_coefs, grad_ref_coefs, grad_input_step, grad_bias = grads
        grad_inputs, grad_weights = [], []
        for p in range(n_parts):
            grad_p = combined_p = None
            if need_weights[p]:  # (n_cycles, N, H, W, K) -> channels-last (n_cycles * N, K, H, W)
                grad_p = grad_psums[p].reshape(-1, *grad_psums[p].shape[2:]).permute(0, 3, 1, 2)
            if need_codes[p]:
                combined_p = combined[p].permute(0, 3, 1, 2)
            grad_c, grad_w = _conv_grads(grad_p, digits[p], combined_p, digits[p][: ctx.n_images], weights[p],
                                         ctx.convs[p], need_codes[p], need_weights[p])
            if quant is not None and grad_c is not None:  # through the input quantizer
                keep = None if keeps[p] is None else keeps[p].permute(0, 2, 3, 1)
                grad_x, grad_step = _run_compiled(_quantize_backward, _batch_dynamic(grad_c.permute(0, 2, 3, 1)),
                                                  _batch_dynamic(inputs[p].permute(0, 2, 3, 1)), input_step,
                                                  _batch_dynamic(keep), quant)
                grad_c = grad_x.permute(0, 3, 1, 2)
                if need_input_step:
                    grad_input_step = grad_step if grad_input_step is None else grad_input_step + grad_step
            grad_inputs.append(grad_c)
            grad_weights.append(grad_w)
        none = [None] * n_parts
        return (None, None, None, None, None, None, *grad_inputs, *grad_weights, *grad_steps, *none, *none,
                *grad_offsets, *grad_coefs, *grad_ref_coefs, *none, grad_input_step,
                grad_bias if ctx.has_bias else None, None)


def _digits_compiled(values: torch.Tensor, split: Optional[InputSplit], step=None, lut=None, keep=None,
                     quant: Optional[InputQuant] = None, pack: int = 0) -> torch.Tensor:
    """`_digits` through the compiled `_split_kernel` (channels-last values and digits; cycle pairs when
    ``pack``)."""
    if split is None:
        return values
    planes = _run_compiled(_split_kernel, _batch_dynamic(values), split, step, lut, _batch_dynamic(keep),
                           quant, pack)  # (n_cycles, N, H, W, C)
    return planes.reshape(-1, *planes.shape[2:]).permute(0, 3, 1, 2)


def compiled_layer(cfg: PostConfig, split, quant, convs, ref_index, ref_onehot, inputs, weights, steps, qmins, qmaxs,
                   offsets, coefs, ref_coefs, keeps, input_step, bias, lut) -> torch.Tensor:
    """Output (N, C_out, H, W) of a layer on the compiled path (see `_CompiledLayer`), in channels-last memory
    whatever the input's layout: the next layer then reads it without a layout copy, as does the gradient."""
    return _CompiledLayer.apply(cfg, split, quant, convs, ref_index, ref_onehot, *inputs, *weights,
                                *steps, *qmins, *qmaxs, *offsets, *coefs, *ref_coefs, *keeps, input_step, bias, lut)


def compiled_input(quantizer, x: torch.Tensor) -> tuple:
    """What `compiled_layer` needs to quantize ``x`` itself: ``(step, keep mask or None, InputQuant, table)``.

    The side effects and the random numbers are those of `ActivationQuantizer.codes`: lazy initialisation,
    the recorded sparsity penalty, one ``rand_like`` for the QDrop mask.
    """
    if quantizer.training and quantizer.sparsity_weight > 0 and torch.is_grad_enabled():
        quantizer.last_sparsity_penalty = quantizer.sparsity_weight * quantizer.expected_ones(x)
    if not quantizer.initialized:
        quantizer.init_from_data(x)
    qmin, qmax = quantizer.code_range
    step = quantizer._step_for(x)
    keep = quantizer.drop_mask(x, channels_last=True) if quantizer.dropping else None  # as the kernels read it
    quant = InputQuant(qmin, qmax, quantizer.sparse_codes)
    lut = quantizer._projection_table(x.dtype, x.device) if quant.sparse else None
    return step, keep, quant, lut
