"""Block-wise reconstruction (BRECQ) with random quantization dropping (QDrop): the PTQ objective.

``model.objective: {class_path: cimq_pl.objectives.BlockReconstruction, init_args: {iters_per_block: 200, ...}}``
with the `PostTrainingQuantization` callback. The fit is **one epoch** of ``iters_per_block`` training batches per
unit (``unit_iters`` gives chosen units their own count), the units one after another (`UnitSchedule` maps
Lightning's batch index to a unit and a step); the train loader is the objective's own (`UnitSteps`, batches of
step numbers: the samples come from the cache below).

When a unit starts, the calibration images are run once: with every quantizer off to cache the unit's
full-precision input ``x_fp`` and output ``y_fp``, and with quantizers on (earlier units already reconstructed and
hardened) to cache its quantized input ``x_q``; both forwards stop at the unit. Where the unit's input is the
previous unit's output (`chained_units`: the blocks of a residual stage) and the previous unit's cache is at hand,
only the two units run instead (``x_fp`` is the previous ``y_fp``, ``x_q`` the finished previous unit on its
``x_q``): the same tensors bit for bit, in time independent of the unit's depth (a ResNet-56's 29 units cached
from the images took 459 s eagerly, growing with depth). A step then draws ``batch_size`` calibration samples of
the cache and:

1. QDrop on the unit input: each element is ``x_q`` with probability ``p`` and ``x_fp`` otherwise;
2. runs the unit in training mode (soft AdaRound rounding, dropping inside its quantizers) and minimise
   ``||y - y_fp||^2`` (summed over channels, mean over batch and positions, as BRECQ)
   ``+ rounding_weight x sum(1 - |2h(V) - 1|^beta)`` (after the warm-up) ``+ the bit-sparsity penalty``.

Only the current unit's AdaRound logits, input step sizes and ADC clip parameters learn (and, with ``lr_offset``,
a digital offset per output channel of each layer with an ADC, beside the bias); weights, biases and weight step
sizes stay fixed.

With ``rounding_init="gptq"`` the unit's weights are GPTQ-rounded when it starts (`init_unit_rounding`): the
Hessian of each of its layers is collected by running the unit on the cached quantized inputs ``x_q`` (the
earlier units final), GPTQ's compensation is stored in the weight quantizers and AdaRound's logits start at
frac((w + compensation) / s), so AdaRound starts from GPTQ's codes (without AdaRound, the codes stay GPTQ's).

Every random draw of a step (which samples, which elements QDrop keeps) is seeded from ``(seed, rank, unit,
step)`` alone, so a fit resumed from a mid-unit checkpoint makes exactly the draws of an uninterrupted one.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import inspect
import itertools
import math
from dataclasses import dataclass
from typing import Literal, Mapping, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cimq_pl.errors import ConfigError
from cimq_pl.objectives.base import Objective, logs_this_step, quantizer_parameters, sparsity_penalty
from cimq_pl.quant import cim_layers, iter_quantizers
from cimq_pl.quant.diagnostics import check_finite
from cimq_pl.quant.dropping import keep_mask, mix_kept
from cimq_pl.quant.gptq import DEFAULT_DAMP, GPTQReport, gptq_
from cimq_pl.quant.layers import _CIMLayerBase
from cimq_pl.quant.layout import select_rows
from cimq_pl.quant.overrides import fields_by_glob
from cimq_pl.quant.techniques import QuantDroppingConfig, applied_technique, reconfigure_
from cimq_pl.seeding import derive_seed, seed_step
from cimq_pl.quant.reconstruction import (
    RoundingSchedule,
    capture_block_input,
    capture_block_io,
    chained_units,
    eval_mode,
    float_mode,
    find_blocks,
)

__all__ = ["ROUNDING_INITS", "BlockReconstruction", "UnitSchedule", "UnitSteps"]

#: Where a unit's weight rounding starts: round-to-nearest of the weights, or GPTQ's rounding.
ROUNDING_INITS = ("nearest", "gptq")


@dataclass(frozen=True)
class UnitSchedule:
    """Where a training batch of the one reconstruction epoch falls: unit ``u`` runs ``steps[u]`` steps, the units
    one after another.

    Batch ``b`` (Lightning's ``batch_idx``, also after a resume) is step ``b - start(u)`` of the unit ``u`` whose
    batches ``start(u) .. start(u) + steps[u] - 1`` hold it.
    """

    steps: tuple[int, ...]

    @classmethod
    def uniform(cls, units: int, steps_per_unit: int) -> "UnitSchedule":
        """``units`` units of ``steps_per_unit`` steps each."""
        return cls((steps_per_unit,) * units)

    @property
    def units(self) -> int:
        return len(self.steps)

    @property
    def total(self) -> int:
        """Training batches of the epoch (per process)."""
        return sum(self.steps)

    @functools.cached_property
    def starts(self) -> tuple[int, ...]:
        """The first batch index of each unit."""
        return tuple(itertools.accumulate(self.steps, initial=0))[:-1]

    def unit(self, batch_idx: int) -> int:
        return bisect.bisect_right(self.starts, batch_idx) - 1

    def step(self, batch_idx: int) -> int:
        """The step within its unit (0-based)."""
        return batch_idx - self.starts[self.unit(batch_idx)]

    def starts_unit(self, batch_idx: int) -> bool:
        return self.step(batch_idx) == 0

    def ends_unit(self, batch_idx: int) -> bool:
        return self.step(batch_idx) == self.steps[self.unit(batch_idx)] - 1

    def describe(self) -> str:
        """``"11 units x 400 steps"``, or ``"11 units of 400-800 steps"`` where they differ."""
        low, high = (min(self.steps), max(self.steps)) if self.steps else (0, 0)
        return f"{self.units} units x {low} steps" if low == high else f"{self.units} units of {low}-{high} steps"


class UnitSteps(Dataset):
    """The reconstruction epoch's training "data": item ``i`` is ``i // world_size``, ``steps x world_size`` items.

    Lightning shards it across processes with its `DistributedSampler` (rank ``r`` takes items ``r, r + world_size,
    ...``), so every process gets ``steps`` items numbered ``0 .. steps - 1``, its own batch indices. The
    numbers only pace the fit: the samples of a step come from the cached block I/O.
    """

    def __init__(self, steps: int, world_size: int = 1):
        self.steps, self.world_size = steps, world_size

    def __len__(self) -> int:
        return self.steps * self.world_size

    def __getitem__(self, index: int) -> int:
        return index // self.world_size


class BlockReconstruction(Objective):
    """Reconstruct the quantized network unit by unit (BRECQ + AdaRound), with QDrop on the unit inputs.

    Plain configuration until :meth:`setup` (called by the module at its ``setup``) finds the units on the
    converted model and reads the seed (``data.seed``), the process rank and the number of processes. Needs the
    `PostTrainingQuantization` callback, which calibrates, starts and finishes units and writes ``ptq.ckpt``.
    Defaults are QDrop's GPU setting except ``iters_per_block`` (QDrop uses 20,000); the configs in
    ``configs/quant/`` state their own presets.

    Args:
        iters_per_block: reconstruction steps per unit; 0 = calibration only (no reconstruction, no training
            step). Under DDP each of the N processes runs ``ceil(iters_per_block / N)`` of them.
        batch_size: calibration samples per reconstruction step (per process).
        adaround: learn weight rounding (AdaRound); False keeps round-to-nearest. Switched on at ``setup`` of
            every stage (fit, test, export...), since the AdaRound logits are part of the model's checkpoint.
        rounding_weight: weight of the AdaRound regulariser.
        warmup: fraction of each unit's steps before the rounding regulariser starts.
        beta_start: AdaRound beta at the end of the warm-up.
        beta_end: AdaRound beta at the unit's last step.
        lr_rounding: Adam learning rate of the AdaRound logits.
        lr_step: Adam learning rate of the input step sizes (QDrop: 4e-5, cosine decay within each unit).
        lr_clip: Adam learning rate of the ADC clip parameters theta.
        lr_offset: Adam learning rate of a digital offset per output channel of every layer with an ADC
            (`add_output_offset_`, added with the bias while the ADC is on), learned to cancel the ADC's systematic
            error; 0 (the default) adds none. Added at ``setup`` of every stage, since the offsets are part of the
            model's checkpoint.
        rounding_init: where each unit's rounding starts: ``"nearest"`` (AdaRound's h(V) = frac(w / s)) or
            ``"gptq"`` (GPTQ from the unit's cached quantized inputs, computed when the unit starts; AdaRound then
            starts from GPTQ's codes, or, with ``adaround: false``, the codes are GPTQ's). Needs
            ``iters_per_block > 0``; for calibration-only GPTQ use the `GPTQRounding` callback.
        gptq_damp: GPTQ's Hessian dampening (fraction of its mean diagonal), with ``rounding_init: gptq``.
        unit_iters: steps of the units whose name matches a glob, instead of ``iters_per_block``
            (``{"layer1.*": 800}``; unit names are the block names ``conv1``, ``layer1.0``, ..., ``fc``; the last
            matching glob wins; each must match a unit). For units that need more reconstruction than the rest,
            such as those with 3-bit ADCs in a per-layer assignment. Needs ``iters_per_block > 0``.
        unit_learning_rates: learning rates of their own for the units a glob names, by argument name
            (``{"layer1.*": {"lr_step": 2e-5}}``: ``lr_rounding``, ``lr_step``, ``lr_clip``, ``lr_offset``; later
            globs win field by field), e.g. a unit given twice the steps with half the input-step rate, so its
            input steps move as far as in the preset (its bit density holds). Each glob must match a unit.
        unit_keep_prob: QDrop keep probability of the units a glob names instead of `QuantDropping`'s
            (``{"layer1.*": 0.75}``; the last matching glob wins), for the unit input and the quantizers inside
            the unit that drop (`QuantDropping`'s targets; it adds no target), set while the unit learns and put
            back when it finishes; e.g. the units with 3-bit ADCs of a per-layer assignment. Needs `QuantDropping`;
            each glob must match a unit.

    Raises:
        ConfigError: on a bad value (named in the message with what is allowed).
    """

    @classmethod
    def scaled_learning_rates(cls, scale: float) -> dict:
        """``{"lr_rounding": ..., "lr_step": ..., "lr_clip": ...}``: QDrop's three rates (the defaults) x ``scale``,
        as keyword arguments of this class (benchmarks that sweep the rates)."""
        defaults = inspect.signature(cls).parameters
        return {name: scale * defaults[name].default for name in ("lr_rounding", "lr_step", "lr_clip")}

    def __init__(
        self,
        iters_per_block: int = 20000,
        batch_size: int = 32,
        adaround: bool = True,
        rounding_weight: float = 0.01,
        warmup: float = 0.2,
        beta_start: float = 20.0,
        beta_end: float = 2.0,
        lr_rounding: float = 1e-3,
        lr_step: float = 4e-5,
        lr_clip: float = 1e-3,
        lr_offset: float = 0.0,
        rounding_init: Literal["nearest", "gptq"] = "nearest",
        gptq_damp: float = DEFAULT_DAMP,
        unit_iters: Optional[Mapping[str, int]] = None,
        unit_learning_rates: Optional[Mapping[str, Mapping[str, float]]] = None,
        unit_keep_prob: Optional[Mapping[str, float]] = None,
    ):
        for name, value, low in (("iters_per_block", iters_per_block, 0), ("batch_size", batch_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"BlockReconstruction.{name}={value!r} is invalid: expected an integer >= {low}")
        unit_iters = dict(unit_iters or {})
        for pattern, value in unit_iters.items():
            if not isinstance(pattern, str) or isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"BlockReconstruction.unit_iters[{pattern!r}]={value!r} is invalid: expected a "
                                  "unit name or glob mapped to an integer >= 1 (steps)")
        if unit_iters and iters_per_block == 0:
            raise ConfigError(f"BlockReconstruction.unit_iters={unit_iters} gives units their own steps, but "
                              "iters_per_block=0 reconstructs none (calibration only): set iters_per_block > 0")
        unit_learning_rates = {pattern: dict(rates) for pattern, rates in (unit_learning_rates or {}).items()}
        bases = {"lr_rounding": lr_rounding, "lr_step": lr_step, "lr_clip": lr_clip, "lr_offset": lr_offset}
        for pattern, rates in unit_learning_rates.items():
            for name, value in rates.items():
                base = bases.get(name)
                if base is None or not (isinstance(value, (int, float)) and value >= 0):
                    raise ConfigError(f"BlockReconstruction.unit_learning_rates[{pattern!r}][{name!r}]={value!r} is "
                                      "invalid: expected lr_rounding, lr_step, lr_clip or lr_offset mapped to a "
                                      "number >= 0")
                if base == 0:
                    raise ConfigError(f"BlockReconstruction.unit_learning_rates[{pattern!r}][{name!r}]: {name} is 0, "
                                      f"so that kind learns in no unit: set {name} > 0 to give units their own")
        unit_keep_prob = dict(unit_keep_prob or {})
        for pattern, value in unit_keep_prob.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise ConfigError(f"BlockReconstruction.unit_keep_prob[{pattern!r}]={value!r} is invalid: expected a "
                                  "unit name or glob mapped to a probability in (0, 1]")
        if not 0 <= warmup < 1:
            raise ConfigError(f"BlockReconstruction.warmup={warmup!r} is invalid: expected a fraction in [0, 1)")
        for name, value in (("rounding_weight", rounding_weight), ("lr_rounding", lr_rounding),
                            ("lr_step", lr_step), ("lr_clip", lr_clip), ("lr_offset", lr_offset),
                            ("beta_start", beta_start), ("beta_end", beta_end)):
            if not value >= 0:
                raise ConfigError(f"BlockReconstruction.{name}={value!r} is invalid: expected a number >= 0")
        if rounding_init not in ROUNDING_INITS:
            raise ConfigError(f"BlockReconstruction.rounding_init={rounding_init!r} is invalid: expected one of "
                              f"{list(ROUNDING_INITS)}")
        if not 0 <= gptq_damp < float("inf"):
            raise ConfigError(f"BlockReconstruction.gptq_damp={gptq_damp!r} is invalid: expected a number >= 0")
        if rounding_init == "gptq" and iters_per_block == 0:
            raise ConfigError("BlockReconstruction.rounding_init='gptq' acts when a reconstruction unit starts, but "
                              "iters_per_block=0 reconstructs none: for calibration-only GPTQ rounding add the "
                              "cimq_pl.callbacks.GPTQRounding callback instead")
        self.iters_per_block = iters_per_block
        self.unit_iters = unit_iters
        self.unit_learning_rates = unit_learning_rates
        self._unit_rates: list[dict[str, float]] = []  # each unit's own rates by kind, set by `attach`
        self.unit_keep_prob = unit_keep_prob
        self._unit_keep: list[Optional[float]] = []  # each unit's own keep probability or None, set by `attach`
        self._kept_options: list[tuple[nn.Module, object]] = []  # (layer, its options) a unit's keep replaced
        self.batch_size = batch_size
        self.adaround = adaround
        self.rounding_weight = rounding_weight
        self.warmup = warmup
        self.beta_start, self.beta_end = beta_start, beta_end
        self.learning_rates = {"rounding": lr_rounding, "step": lr_step, "clip": lr_clip, "offset": lr_offset}
        self.rounding_init, self.gptq_damp = rounding_init, gptq_damp
        # the runtime state of a fit, built by `setup` / `attach`
        self.blocks: list[tuple[str, nn.Module]] = []
        self.schedule = UnitSchedule(())
        self.block_input_keep_prob: float | None = None
        self.seed, self.rank, self.world_size = 0, 0, 1
        self.current = 0
        self.cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._previous: tuple[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None  # last unit's cache
        self._chained: list[bool] | None = None  # `chained_units` of this fit, found when first needed
        self._unit_loss_sum, self._unit_loss_steps = 0.0, 0

    @property
    def reconstructs(self) -> bool:
        """False for ``iters_per_block: 0``: the fit only calibrates."""
        return self.iters_per_block > 0

    @property
    def makes_train_batches(self) -> bool:
        return self.reconstructs

    # -- setup: from configuration to a fit ------------------------------------------------------------------
    def setup(self, module, stage: str) -> None:
        """AdaRound on every CIM layer (every stage, so checkpoints fit); for ``fit``: the network weights frozen,
        the units found, the QDrop keep probability of the unit input read from the model (`QuantDropping`), and
        the fit's length checked (one epoch).

        Raises:
            ConfigError: no `PostTrainingQuantization` callback, or a fit longer or shorter than one epoch.
        """
        model = module.model
        self._refuse_gptq_option(model)
        if self.reconstructs and self.adaround:
            reconfigure_(model, weight_rounding="adaround")
        if self.reconstructs and self.learning_rates["offset"] > 0:
            for _, layer in cim_layers(model):
                layer.add_output_offset_()
        if stage != "fit":
            return
        trainer = module.trainer
        _require_ptq_callback(trainer.callbacks)
        learnable = {id(p) for params in self.learned_parameters(model).values() for p in params}
        for param in model.parameters():  # weights, biases and weight steps stay fixed
            param.requires_grad_(id(param) in learnable)
        dropping = applied_technique(model, QuantDroppingConfig)
        if self.unit_keep_prob and dropping is None:
            raise ConfigError(f"BlockReconstruction.unit_keep_prob={self.unit_keep_prob} sets QDrop keep probabilities, "
                              "but no QuantDropping was applied (nothing drops): add cimq_pl.callbacks.QuantDropping "
                              "to trainer.callbacks, or remove unit_keep_prob")
        self.attach(
            find_blocks(model, lambda m: isinstance(m, _CIMLayerBase)),
            seed=getattr(trainer.datamodule, "seed", 0),
            rank=trainer.global_rank,
            world_size=trainer.world_size,
            block_input_keep_prob=dropping.block_input_keep_prob if dropping else None,
        )
        if self.reconstructs:
            self.check_fit_length(trainer.max_epochs, trainer.max_steps)

    def _refuse_gptq_option(self, model: nn.Module) -> None:
        """Refuse layers GPTQ-rounded at calibration (`GPTQRounding`) when reconstruction would replace that rounding
        (AdaRound) or redo it (``rounding_init: gptq``)."""
        if not (self.reconstructs and (self.adaround or self.rounding_init == "gptq")):
            return
        if any(layer.options.weight_rounding == "gptq" for _, layer in cim_layers(model)):
            raise ConfigError(
                "the GPTQRounding callback rounds the weights at calibration, but BlockReconstruction "
                f"(adaround={self.adaround}, rounding_init={self.rounding_init!r}) would "
                f"{'learn' if self.adaround else 'recompute'} that rounding per unit: for AdaRound from GPTQ remove "
                "GPTQRounding and set model.objective.init_args.rounding_init: gptq; to keep GPTQ's rounding set "
                "adaround: false (or iters_per_block: 0)")

    def attach(self, blocks: list[tuple[str, nn.Module]], seed: int = 0, rank: int = 0, world_size: int = 1,
               block_input_keep_prob: float | None = None) -> None:
        """Start a fit over the units ``blocks`` (``(name, module)`` in execution order) in process ``rank`` of
        ``world_size``, drawing from ``seed``; each process runs ``ceil(steps / world_size)`` of a unit's steps
        (``iters_per_block``, or its ``unit_iters``).

        Raises:
            ConfigError: a ``unit_iters`` glob that matches no unit (the message lists them).
        """
        self.blocks = blocks
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.block_input_keep_prob = block_input_keep_prob
        names = [name for name, _ in blocks]
        steps = self.steps_of_units(names)
        self.schedule = UnitSchedule(tuple(math.ceil(count / world_size) for count in steps))
        self._unit_rates = [{name.removeprefix("lr_"): rate for name, rate in fields.items()}
                            for fields in _per_unit(names, self.unit_learning_rates, "unit_learning_rates")]
        keeps = {pattern: {"keep": p} for pattern, p in self.unit_keep_prob.items()}
        self._unit_keep = [fields.get("keep") for fields in _per_unit(names, keeps, "unit_keep_prob")]
        self.current, self.cache = 0, None
        self._previous, self._chained = None, None

    def steps_of_units(self, names: list[str]) -> list[int]:
        """The reconstruction steps of each unit of ``names``: ``iters_per_block`` or the last matching
        ``unit_iters`` glob's."""
        per_unit = _per_unit(names, {pattern: {"steps": count} for pattern, count in self.unit_iters.items()},
                             "unit_iters")
        return [fields.get("steps", self.iters_per_block) for fields in per_unit]

    def describe(self) -> str:
        start = ", rounding from GPTQ" if self.rounding_init == "gptq" else ""
        names = [name for name, _ in self.blocks]
        own = [f"{name} {count}" for name, count in zip(names, self.steps_of_units(names))
               if count != self.iters_per_block]
        steps = f" ({', '.join(own)} steps of their own)" if own else ""
        rates = [f"{name} {', '.join(f'lr_{kind} {rate:g}' for kind, rate in own_rates.items())}"
                 for name, own_rates in zip(names, self._unit_rates) if own_rates]
        steps += f" (learning rates of their own: {'; '.join(rates)})" if rates else ""
        keeps = [f"{name} {keep:g}" for name, keep in zip(names, self._unit_keep) if keep is not None]
        steps += f" (QDrop keep probabilities of their own: {', '.join(keeps)})" if keeps else ""
        return (f"{len(names)} reconstruction units x {self.iters_per_block} steps of {self.batch_size} "
                f"images{steps}{start}: {', '.join(names)}")

    def check_fit_length(self, max_epochs: int | None, max_steps: int) -> None:
        """Refuse a trainer that would not run exactly the one epoch of the units' steps."""
        total, length = self.schedule.total, self.schedule.describe()
        if max_steps not in (-1, None) and max_steps < total:
            raise ConfigError(f"block reconstruction is one epoch of {length} ({total} training steps) but "
                              f"trainer.max_steps={max_steps} stops it earlier: set trainer.max_steps -1")
        if max_epochs != 1 and max_steps != total:
            raise ConfigError(f"block reconstruction is one epoch of {length} ({total} training steps) but "
                              f"trainer.max_epochs={max_epochs}: set trainer.max_epochs 1")

    def check_train_batches(self, num_training_batches: int | float) -> None:
        """Refuse a fit whose train loader is not this objective's (or is cut by ``limit_train_batches``)."""
        if num_training_batches != self.schedule.total:
            raise ConfigError(
                f"block reconstruction trains on its own loader of {self.schedule.describe()} "
                f"({self.schedule.total} batches) but the fit has "
                f"{num_training_batches}: fit with cimq_pl.trainer.CIMQTrainer (python -m cimq_pl fit does) or pass "
                "datamodule=module.fit_datamodule(datamodule), and leave trainer.limit_train_batches at 1.0")

    def train_dataloader(self) -> DataLoader:
        """One item per training step of every unit (`UnitSteps`), one item per batch."""
        return DataLoader(UnitSteps(self.schedule.total, self.world_size), batch_size=1)

    # -- units (started and finished by the PTQ callback) ------------------------------------------------
    @property
    def block(self) -> tuple[str, nn.Module]:
        return self.blocks[self.current]

    def start_unit(self, index: int) -> None:
        """Make unit ``index`` the one that learns (with its own QDrop keep probability, where it has one)."""
        self.current = index
        self._set_unit_keep(index)
        self._unit_loss_sum, self._unit_loss_steps = 0.0, 0  # its steps' reconstruction losses (since a resume)
        learning = {id(p) for ps in self.learned_parameters(self.blocks[index][1]).values() for p in ps}
        for _, module in self.blocks:
            for params in self.learned_parameters(module).values():
                for param in params:
                    param.requires_grad_(id(param) in learning)

    @torch.no_grad()
    def cache_block_io(self, model: nn.Module, images: torch.Tensor, chunk: int = 256) -> None:
        """Cache ``(x_fp, y_fp, x_q)`` of the current unit for all calibration ``images`` (in order, in chunks of
        ``chunk`` images).

        From the previous unit's cache when that unit was the last one finished and feeds this one directly
        (`chained_units`), else from the images through the network. Both run the same layers on the same chunks,
        so they give the same tensors bit for bit, and a fit resumed mid-unit (which starts from the images)
        repeats an uninterrupted one exactly.
        """
        previous, self._previous = self._previous, None
        if previous is not None and previous[0] == self.current - 1 and self._units_chained(model, images)[self.current]:
            self.cache = self._block_io_from_previous(previous[1], chunk)
            return
        parts = [self.block_io(model, images[i : i + chunk]) for i in range(0, len(images), chunk)]
        self.cache = tuple(torch.cat(tensors) for tensors in zip(*parts))

    def _units_chained(self, model: nn.Module, images: torch.Tensor, probe: int = 16) -> list[bool]:
        """`chained_units` of ``model`` on its first ``probe`` calibration images, with every quantizer off and
        on (both must hold), found once per fit."""
        if self._chained is None:
            with eval_mode(model):
                with float_mode(model):
                    as_float = chained_units(model, self.blocks, images[:probe])
                quantized = chained_units(model, self.blocks, images[:probe])
            self._chained = [a and b for a, b in zip(as_float, quantized)]
        return self._chained

    def _block_io_from_previous(self, previous: tuple[torch.Tensor, torch.Tensor, torch.Tensor], chunk: int):
        """``(x_fp, y_fp, x_q)`` of the current unit from the previous unit's cache: ``x_fp`` is its ``y_fp``, ``x_q``
        the previous unit (finished: hard rounding) run on its ``x_q``, ``y_fp`` this unit run on ``x_fp`` as floats."""
        _, y_fp_previous, x_q_previous = previous
        _, previous_block = self.blocks[self.current - 1]
        _, block = self.block
        with eval_mode(previous_block):
            x_q = torch.cat([previous_block(part) for part in x_q_previous.split(chunk)])
        with eval_mode(block), float_mode(block):
            y_fp = torch.cat([block(part) for part in y_fp_previous.split(chunk)])
        return y_fp_previous, y_fp, x_q

    @torch.no_grad()
    def init_unit_rounding(self, chunk: int = 256) -> GPTQReport | None:
        """With ``rounding_init="gptq"``: GPTQ-round the current unit's layers from its cached quantized inputs
        (call after `cache_block_io`) and start their AdaRound logits there; None otherwise.

        Layers already compensated are left alone (a fit resumed mid-unit: the checkpoint holds the compensation
        and the logits learned since), so GPTQ runs once per unit. The Hessians come from one pass of the unit,
        in eval mode, over ``x_q`` in chunks of ``chunk`` samples.
        """
        if self.rounding_init != "gptq" or self.cache is None:
            return None
        _, block = self.block
        names = [name for name, layer in cim_layers(block) if layer.weight_quantizer is not None
                 and layer.weight_quantizer.enabled and not layer.weight_quantizer.compensated]
        if not names:
            return None
        with eval_mode(block):
            report = gptq_(block, self.cache[2].split(chunk), lambda unit, x: unit(x), layers=names, damp=self.gptq_damp)
        for name, layer in cim_layers(block):
            if name in names and layer.weight_quantizer.rounding_logits is not None:
                layer.weight_quantizer.init_rounding(layer._weight4d())
        return report

    def finish_unit(self, index: int) -> None:
        """Freeze unit ``index``: hard rounding from now on. Its cache is kept for the next unit's
        (`cache_block_io`) when it is the current unit and not the last one, else dropped."""
        if self.cache is not None and index == self.current and index + 1 < len(self.blocks):
            self._previous = (index, self.cache)
        self.cache = None
        for *_, quantizer in iter_quantizers(self.blocks[index][1], ("weight",)):
            quantizer.harden_()
        self._restore_keep()

    def _set_unit_keep(self, index: int) -> None:
        """Give the dropping quantizers of unit ``index`` its ``unit_keep_prob`` (their options saved to restore)."""
        self._restore_keep()
        keep = self._own_keep(index)
        if keep is None:
            return
        for _, layer in cim_layers(self.blocks[index][1]):
            changes = {field: keep for field in ("input_keep_prob", "psum_keep_prob")
                       if getattr(layer.options, field) is not None}
            if changes:
                self._kept_options.append((layer, layer.options))
                layer.set_options(dataclasses.replace(layer.options, **changes))

    def _restore_keep(self) -> None:
        """Put back the keep probabilities `_set_unit_keep` replaced."""
        for layer, options in self._kept_options:
            layer.set_options(options)
        self._kept_options = []

    @property
    def unit_block_input_keep_prob(self) -> float | None:
        """The current unit's QDrop keep probability of its input: its own, where `QuantDropping` drops the unit
        input, else `QuantDropping`'s (None: not dropped)."""
        if self.block_input_keep_prob is None:
            return None
        own = self._own_keep(self.current)
        return self.block_input_keep_prob if own is None else own

    def _own_keep(self, index: int) -> Optional[float]:
        """Unit ``index``'s ``unit_keep_prob``, None where it has none (or before `attach`)."""
        return self._unit_keep[index] if index < len(self._unit_keep) else None

    @property
    def rounding_schedule(self) -> RoundingSchedule:
        return RoundingSchedule(self.unit_steps, self.warmup, self.beta_start, self.beta_end)

    @property
    def unit_steps(self) -> int:
        """The current unit's steps in this process (at least 1: with 0, calibration only, nothing steps)."""
        steps = self.schedule.steps
        return max(1, steps[self.current]) if self.current < len(steps) else 1

    def lr_factor(self, batch_idx: int, kind: Optional[str] = None) -> float:
        """The learning-rate factor of batch ``batch_idx`` of the fit: cosine decay within its unit (1 at the unit's
        first step, ~0 at its last), times that unit's own rate of ``kind`` (``rounding``, ``step``, ``clip``,
        ``offset``) over the objective's, where it has one. A function of the batch index alone, as `LambdaLR`
        asks: the scheduler sets the rate of batch ``b + 1`` after batch ``b``, before any state of it exists."""
        batch_idx = min(batch_idx, self.schedule.total - 1)
        if batch_idx < 0:  # nothing to step (calibration only)
            return 1.0
        unit = self.schedule.unit(batch_idx)
        steps = max(1, self.schedule.steps[unit])
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, self.schedule.step(batch_idx) / steps)))
        own = self._unit_rates[unit] if unit < len(self._unit_rates) else {}
        return cosine * own[kind] / self.learning_rates[kind] if kind in own else cosine

    # -- the objective ------------------------------------------------------------------------------------
    def block_io(self, model: nn.Module, images: torch.Tensor):
        """``(x_fp, y_fp, x_q)`` of the current unit for ``images`` (no gradients)."""
        _, block = self.block
        with torch.no_grad(), eval_mode(model):
            with float_mode(model):
                x_fp, y_fp = capture_block_io(model, block, images)
            x_q = capture_block_input(model, block, images)
        return x_fp, y_fp, x_q

    def step_seed(self, step: int) -> int:
        """Seed of step ``step`` of the current unit: a function of (seed, rank, unit, step) only."""
        return derive_seed(self.seed, self.rank, self.current, step)

    def training_step(self, module, batch, batch_idx: int) -> torch.Tensor:
        name, block = self.block
        if self.cache is None or self.schedule.unit(batch_idx) != self.current:
            raise ConfigError(f"BlockReconstruction step {batch_idx} of unit {self.schedule.unit(batch_idx)} has no "
                              "cached block input: add cimq_pl.callbacks.PostTrainingQuantization to trainer.callbacks")
        step = self.schedule.step(batch_idx)
        seed = self.step_seed(step)
        generator = torch.Generator().manual_seed(seed)
        indices = torch.randint(len(self.cache[0]), (self.batch_size,), generator=generator)
        seed_step(seed, self.cache[0].device)  # QDrop masks of this step (unit input and inside the quantizers)
        x_fp, y_fp, x_q = (select_rows(tensor, indices.to(tensor.device)) for tensor in self.cache)
        x = x_q
        keep = self.unit_block_input_keep_prob
        if keep is not None:
            x = mix_kept(keep_mask(x_q, keep), x_q, x_fp)
        y = block(x)
        reconstruction = (y - y_fp).pow(2).sum(1).mean()
        loss = reconstruction
        logged = {"ptq/rec_loss": reconstruction}
        schedule = self.rounding_schedule
        if schedule.active(step) and self.rounding_weight > 0:
            beta = schedule.beta(step)
            rounding = sum(quantizer.rounding_loss(beta) for *_, quantizer in iter_quantizers(block, ("weight",)))
            loss = loss + self.rounding_weight * rounding
            logged["ptq/rounding_loss"] = rounding
        penalty = sparsity_penalty(block)
        if penalty is not None:
            loss = loss + penalty
            logged["ptq/sparsity_penalty"] = penalty
        check_finite(loss, block, x, where=f"PTQ reconstruction of block {name!r} at step {step}", prefix=name)
        if logs_this_step(module):  # the steps the loggers see (trainer.log_every_n_steps); the bar follows them
            for key, value in logged.items():
                module.log(key, value, on_step=True, on_epoch=False, prog_bar=key == "ptq/rec_loss")
        self._unit_loss_sum = self._unit_loss_sum + reconstruction.detach()
        self._unit_loss_steps += 1
        if self.schedule.ends_unit(batch_idx):  # the unit's mean, logged once (a log call costs ~0.4 ms a step)
            module.log(f"ptq/{name}/rec_loss", self._unit_loss_sum / self._unit_loss_steps, on_step=False,
                       on_epoch=True)
        return loss

    def learned_parameters(self, model: nn.Module) -> dict[str, list[nn.Parameter]]:
        """What reconstruction learns in ``model`` (a network or a unit), by kind: `quantizer_parameters` (AdaRound
        logits, input steps, ADC clips) and, with ``lr_offset`` > 0, the layers' output offsets."""
        groups = quantizer_parameters(model, include_frozen=True)
        if self.learning_rates["offset"] > 0:
            groups["offset"] = [layer.output_offset for _, layer in cim_layers(model) if layer.output_offset is not None]
        return groups

    def configure_optimizers(self, module):
        groups = [
            {"params": params, "lr": self.learning_rates[kind], "name": kind}
            for kind, params in self.learned_parameters(module.model).items()
            if params
        ]
        optimizer = torch.optim.Adam(groups)
        factors = [functools.partial(_kind_factor, self, group["name"]) for group in groups]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _kind_factor(objective: BlockReconstruction, kind: str, batch_idx: int) -> float:
    """`LambdaLR`'s factor of the parameter group ``kind`` at the scheduler's step count, the index of the batch it
    sets the rate for (a module-level function: the scheduler's state saves)."""
    return objective.lr_factor(batch_idx, kind)


def _per_unit(names: list[str], fields_by_pattern: Mapping[str, Mapping], option: str) -> list[dict]:
    """The fields of each unit of ``names`` from globs of unit names (`fields_by_glob`: later globs win field by
    field; a glob that matches no unit is a `ConfigError` listing them)."""
    found = fields_by_glob(names, fields_by_pattern, f"BlockReconstruction.{option}", "reconstruction unit", "units")
    return [found.get(name, {}) for name in names]


def _require_ptq_callback(callbacks) -> None:
    from cimq_pl.callbacks.ptq import PostTrainingQuantization  # the callback imports this module

    if not any(isinstance(callback, PostTrainingQuantization) for callback in callbacks):
        raise ConfigError("model.objective BlockReconstruction needs the PostTrainingQuantization callback (it "
                          "calibrates, starts and finishes the units): add cimq_pl.callbacks.PostTrainingQuantization "
                          "to trainer.callbacks")
