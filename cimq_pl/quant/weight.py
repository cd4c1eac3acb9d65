"""`WeightQuantizer`: signed LSQ weight codes with layer/channel/array/array_channel scales, AdaRound and the
GPTQ compensation of the weights it rounds."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cimq_pl.quant.ste import clip_levels, code_range, floor_ste, lsq_grad_factor, round_ste, scale_grad
from cimq_pl.quant.tiling import TileGeometry
from cimq_pl.quant.uniform import QuantizerBase, check_bits, check_choice

WEIGHT_GRANULARITIES = ("layer", "channel", "array", "array_channel")
ROUNDINGS = ("nearest", "adaround", "gptq")
ADAROUND_ZETA = 1.1
ADAROUND_GAMMA = -0.1


class WeightQuantizer(QuantizerBase):
    """Signed weight quantizer whose scales follow the crossbar tiling (SPEC 4.2).

    Codes ``q = clamp(round(w / s), -2^(b-1), 2^(b-1)-1)`` with one step ``s`` per group:

    * ``"layer"``: one step for the layer, ``step`` shape (1, 1, 1);
    * ``"channel"``: one per output channel, shape (groups, 1, out_channels_per_group);
    * ``"array"``: one per crossbar tile (g, r, c), shape (groups, n_row_blocks, n_col_blocks);
    * ``"array_channel"``: one per tile row block and output column, shape
      (groups, n_row_blocks, out_channels_per_group).

    The step of a row block is applied digitally to that array's ADC output before the shift-add across row
    blocks, so ``expanded_step()`` (groups, n_row_blocks, out_channels_per_group) is what the CIM layer uses.

    With ``rounding="adaround"`` the codes are ``floor(w / s) + h(V)`` (AdaRound, Nagel et al. 2020),
    ``h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)``, zeta = 1.1, gamma = -0.1, V initialised so that
    h(V) equals the fractional part of w / s; rounding is hard (h >= 0.5) when ``hard`` is True or in eval
    mode.

    With ``rounding="gptq"`` the codes are round-to-nearest, like ``"nearest"``; the rounding that differs is the
    weights': `calibrate_` runs GPTQ (`cimq_pl.quant.gptq`) on the layer and stores its result here as the
    ``compensation`` (C_out, C_in/g, k_h, k_w), the float offset GPTQ adds to every weight before rounding. Every
    rounding mode quantizes ``w + compensation`` when a compensation is set (AdaRound then starts from
    frac((w + compensation) / s), `BlockReconstruction(rounding_init="gptq")`), so the layer's own weights, and
    with them the float network (every quantizer disabled), stay the original ones. The compensation is saved
    in the state_dict (extra state), carried over by `adopt_calibration_`, and dropped when the steps are
    re-initialised (`init_from_observer`) or the codes baked into the weights (`bake_rounding_`).

    Args:
        geometry: the layer's `TileGeometry`.
        bits: weight code bits b_w.
        granularity: one of ``"layer"``, ``"channel"``, ``"array"``, ``"array_channel"``.
        rounding: ``"nearest"``, ``"adaround"`` or ``"gptq"`` (nearest codes of GPTQ-compensated weights).
        observer: step initialisation, ``"mse"`` (default, SPEC 4.2), ``"minmax"`` or ``"percentile"``.
        grad_scaling: LSQ gradient scaling of the step.
        **observer_kwargs: forwarded to the observer.

    Raises:
        ValueError: on an unknown granularity or rounding, or bits outside [1, 16].
    """

    def __init__(
        self,
        geometry: TileGeometry,
        bits: int,
        granularity: str = "array",
        rounding: str = "nearest",
        observer: str = "mse",
        grad_scaling: bool = True,
        **observer_kwargs,
    ) -> None:
        super().__init__(observer, **observer_kwargs)
        check_choice("granularity", granularity, WEIGHT_GRANULARITIES)
        check_choice("rounding", rounding, ROUNDINGS)
        check_bits(bits)
        self.geometry = geometry
        self.bits = bits
        self.granularity = granularity
        self.rounding = rounding
        self.grad_scaling = grad_scaling
        self.hard = False
        g, n_r, n_c = geometry.groups, geometry.n_row_blocks, geometry.n_col_blocks
        cout_g = geometry.out_channels_per_group
        shape = {"layer": (1, 1, 1), "channel": (g, 1, cout_g), "array": (g, n_r, n_c), "array_channel": (g, n_r, cout_g)}
        self.step = nn.Parameter(torch.ones(shape[granularity]))
        self.register_buffer("row_block_of_row", geometry.row_block_of_row(), persistent=False)
        self.register_buffer("col_block_of_column", geometry.col_block_of_column(), persistent=False)
        weight_shape = (g * cout_g, geometry.in_channels_per_group, *geometry.kernel_size)
        self.rounding_logits = nn.Parameter(torch.zeros(weight_shape)) if rounding == "adaround" else None
        self.register_buffer("compensation", None, persistent=False)  # GPTQ's offset, saved as extra state

    SETTINGS = ()  # every weight option changes the quantizer's parameters: it is rebuilt

    def get_extra_state(self) -> Any:
        return {"initialized": self.initialized, "hard": self.hard, "compensation": self.compensation}

    def set_extra_state(self, state: Any) -> None:
        self.initialized = bool(state["initialized"])
        self.hard = bool(state.get("hard", False))
        compensation = state.get("compensation")
        self.compensation = None if compensation is None else compensation.to(self.step.device, self.step.dtype)

    @property
    def compensated(self) -> bool:
        """Whether GPTQ's compensation is set (the weights this quantizer rounds are ``w + compensation``)."""
        return self.compensation is not None

    @torch.no_grad()
    def adopt_calibration_(self, old: "QuantizerBase") -> bool:
        """As `QuantizerBase.adopt_calibration_`; the GPTQ compensation comes along when the steps do."""
        adopted = super().adopt_calibration_(old)
        if adopted and getattr(old, "compensation", None) is not None:
            self.compensation = old.compensation.clone()
        return adopted

    @property
    def code_range(self) -> tuple:
        """(qmin, qmax) of the signed codes."""
        return code_range(self.bits, True)

    def expanded_step(self) -> torch.Tensor:
        """Step of every (group, row block, output column): shape (groups, n_row_blocks, out_channels_per_group)."""
        geo = self.geometry
        step = self.step.abs() + 1e-12
        if self.grad_scaling:
            step = scale_grad(step, lsq_grad_factor(max(self._numel() // self.step.numel(), 1), self.code_range[1]))
        if self.granularity == "array":
            step = step[:, :, self.col_block_of_column]
        return step.expand(geo.groups, geo.n_row_blocks, geo.out_channels_per_group)

    def element_step(self, expanded: torch.Tensor = None) -> torch.Tensor:
        """Step of every weight element, shape (C_out, C_in/groups, k_h, k_w)."""
        geo = self.geometry
        expanded = self.expanded_step() if expanded is None else expanded
        per_row = expanded[:, self.row_block_of_row, :]  # (groups, unrolled_rows, out_channels_per_group)
        return per_row.permute(0, 2, 1).reshape(
            geo.groups * geo.out_channels_per_group, geo.in_channels_per_group, *geo.kernel_size
        )

    def _numel(self) -> int:
        geo = self.geometry
        return geo.groups * geo.out_channels_per_group * geo.unrolled_rows

    def group_index(self) -> torch.Tensor:
        """(C_out, C_in/groups, k_h, k_w) int64: the step (flat index into ``step``) of every weight element."""
        geo = self.geometry
        g = torch.arange(geo.groups, device=self.step.device).view(-1, 1, 1)
        o = torch.arange(geo.out_channels_per_group, device=self.step.device).view(1, -1, 1)
        r = self.row_block_of_row.view(1, 1, -1)
        c = self.col_block_of_column.view(1, -1, 1)
        if self.granularity == "layer":
            index = torch.zeros_like(g * o * r)
        elif self.granularity == "channel":
            index = (g * geo.out_channels_per_group + o).expand(-1, -1, geo.unrolled_rows)
        elif self.granularity == "array":
            index = (g * geo.n_row_blocks + r) * geo.n_col_blocks + c
        else:
            index = (g * geo.n_row_blocks + r) * geo.out_channels_per_group + o
        return index.expand(geo.groups, geo.out_channels_per_group, geo.unrolled_rows).reshape(
            geo.groups * geo.out_channels_per_group, geo.in_channels_per_group, *geo.kernel_size
        )

    @torch.no_grad()
    def init_from_observer(self, weight: torch.Tensor) -> None:
        """Set every step from ``weight`` with the observer's method (weights need no calibration data).

        Also initialises the AdaRound logits so that h(V) equals the fractional part of w / s. A GPTQ
        compensation, computed for the old steps, is dropped.
        """
        self.compensation = None
        qmin, qmax = self.code_range
        levels = clip_levels(qmin, qmax)
        self.observer.reset()
        self.observer.update(weight.detach().reshape(-1, 1))
        alpha = self.observer.compute(self.group_index().reshape(-1), self.step.numel(), qmin, qmax, levels)
        self.observer.reset()
        self.step.copy_((alpha / levels).view_as(self.step))
        self.initialized = True
        if self.rounding_logits is not None:
            self.init_rounding(weight)

    def init_if_needed_(self, weight: torch.Tensor) -> None:
        """Initialise from ``weight`` unless already initialised (a quantizer used before calibration)."""
        if not self.initialized:
            self.init_from_observer(weight)

    def ratio(self, weight: torch.Tensor, expanded_step: torch.Tensor = None) -> torch.Tensor:
        """``(w + compensation) / s`` per element (``w / s`` without compensation): what the codes round.

        Args:
            weight: (C_out, C_in/groups, k_h, k_w) float weight.
            expanded_step: optional precomputed `expanded_step()`.
        """
        if self.compensation is not None:
            weight = weight + self.compensation
        return weight / self.element_step(expanded_step)

    @torch.no_grad()
    def compensate_(self, weight: torch.Tensor, compensated: torch.Tensor) -> None:
        """Make the codes of ``weight`` the round-to-nearest codes of ``compensated`` (GPTQ's W'), exactly.

        Stores ``compensated - weight`` as the compensation; where float rounding of ``w + compensation`` lands
        on another code than ``compensated`` gives (a tie, or a different summation order), the element is
        moved to the middle of its code's interval, so the codes match bit for bit.

        Args:
            weight: the layer's (C_out, C_in/groups, k_h, k_w) weight.
            compensated: W', same shape (any float dtype).
        """
        qmin, qmax = self.code_range
        step = self.element_step().detach()
        target = torch.clamp(torch.round(compensated.to(torch.float64) / step.to(torch.float64)), qmin, qmax)
        target = target.to(weight.dtype)
        self.compensation = (compensated.to(weight.dtype) - weight).detach().clone()
        codes = torch.clamp(torch.round(self.ratio(weight)), qmin, qmax)
        wrong = codes != target
        if wrong.any():
            self.compensation[wrong] = (target * step - weight)[wrong]

    @torch.no_grad()
    def init_rounding(self, weight: torch.Tensor) -> None:
        """Initialise the AdaRound logits V so that h(V) = frac((w + compensation) / s)."""
        ratio = self.ratio(weight)
        fraction = (ratio - torch.floor(ratio)).clamp(1e-4, 1 - 1e-4)
        sig = ((fraction - ADAROUND_GAMMA) / (ADAROUND_ZETA - ADAROUND_GAMMA)).clamp(1e-6, 1 - 1e-6)
        self.rounding_logits.copy_(torch.log(sig / (1 - sig)))

    def harden_(self) -> None:
        """Freeze the AdaRound decisions: from now on h(V) is rounded to 0/1 in training too (PTQ, unit done)."""
        self.hard = True

    @torch.no_grad()
    def bake_rounding_(self, weight: torch.Tensor, rounding_logits: torch.Tensor = None) -> None:
        """Write the hard AdaRound decisions into ``weight`` in place, so that round-to-nearest gives the same codes.

        The code is ``floor((w + compensation) / s) + [V >= 0]`` (h(V) >= 0.5 exactly when V >= 0); ``weight``
        becomes ``code x s`` and the GPTQ compensation, now in the weights, is dropped. Used where AdaRound ends
        and plain rounding takes over (QAT from a PTQ checkpoint).

        Args:
            weight: the layer's (C_out, C_in/groups, k_h, k_w) weight, changed in place.
            rounding_logits: V (default: this quantizer's own; nothing to bake when neither exists).
        """
        logits = self.rounding_logits if rounding_logits is None else rounding_logits
        if logits is None:
            return
        step = self.element_step().detach()
        qmin, qmax = self.code_range
        codes = torch.clamp(torch.floor(self.ratio(weight)) + (logits.to(step.device) >= 0).to(step.dtype), qmin, qmax)
        weight.copy_(codes * step)
        self.compensation = None

    def soft_rounding(self) -> torch.Tensor:
        """h(V) in [0, 1], the AdaRound rectified sigmoid of the logits."""
        return torch.clamp(
            torch.sigmoid(self.rounding_logits) * (ADAROUND_ZETA - ADAROUND_GAMMA) + ADAROUND_GAMMA, 0, 1
        )

    def rounding_loss(self, beta: float) -> torch.Tensor:
        """AdaRound regulariser sum(1 - |2 h(V) - 1|^beta), pushing h(V) to 0 or 1 (0 without AdaRound)."""
        if self.rounding_logits is None:
            return self.step.new_zeros(())
        return (1 - (2 * self.soft_rounding() - 1).abs().pow(beta)).sum()

    def codes(self, weight: torch.Tensor, expanded_step: torch.Tensor = None) -> torch.Tensor:
        """Integer-valued weight codes (soft with AdaRound in training), straight-through gradients.

        Args:
            weight: (C_out, C_in/groups, k_h, k_w) float weight.
            expanded_step: optional precomputed `expanded_step()`.
        """
        self.init_if_needed_(weight)
        qmin, qmax = self.code_range
        ratio = self.ratio(weight, expanded_step)
        if self.rounding_logits is None:
            return round_ste(torch.clamp(ratio, qmin, qmax))
        rounding = self.soft_rounding()
        if self.hard or not self.training:
            rounding = (rounding >= 0.5).to(ratio.dtype)
        return torch.clamp(floor_ste(ratio) + rounding, qmin, qmax)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """Dequantized weight (identity when disabled)."""
        if not self.enabled:
            return weight
        expanded = self.expanded_step()
        return self.codes(weight, expanded) * self.element_step(expanded)

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, granularity={self.granularity}, rounding={self.rounding}, enabled={self.enabled}"
                + (", compensated" if self.compensated else ""))
