"""Block-wise reconstruction (BRECQ) with random quantization dropping (QDrop): the PTQ training step.

One block is reconstructed at a time (the PTQ callback advances blocks, one epoch per block). When a block
starts, the calibration images are run once: with every quantizer off to cache the block's full-precision
input ``x_fp`` and output ``y_fp``, and with quantizers on (earlier blocks already reconstructed and
hardened) to cache its quantized input ``x_q``; both forwards stop at the block. A step then draws
``batch_size`` calibration samples of the cache and:

1. QDrop on the block input: each element is ``x_q`` with probability ``p`` and ``x_fp`` otherwise;
2. runs the block in training mode (soft AdaRound rounding, dropping inside its quantizers) and minimise
   ``||y - y_fp||^2`` (summed over channels, mean over batch and positions, as BRECQ)
   ``+ rounding_weight x sum(1 - |2h(V) - 1|^beta)`` (after the warm-up) ``+ the bit-sparsity penalty``.

Only the current block's AdaRound logits, input step sizes and ADC clip parameters learn; weights, biases
and weight step sizes stay fixed.

Every random draw of a step (which samples, which elements QDrop keeps) is seeded from ``(seed, rank, block,
step)`` alone, so a fit resumed from a mid-block checkpoint makes exactly the draws of an uninterrupted one.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cimq_pl.objectives.base import quantizer_parameters, sparsity_penalty
from cimq_pl.quant import iter_quantizers
from cimq_pl.quant.diagnostics import check_finite
from cimq_pl.seeding import derive_seed
from cimq_pl.quant.reconstruction import (
    RoundingSchedule,
    capture_block_input,
    capture_block_io,
    eval_mode,
    float_mode,
)

__all__ = ["BlockReconstructionObjective"]


class BlockReconstructionObjective:
    """The reconstruction step of the current block.

    Args:
        blocks: ``(name, module)`` reconstruction units in execution order.
        rounding_weight: weight of the AdaRound regulariser.
        warmup: fraction of a block's steps before the rounding regulariser starts.
        beta_start: AdaRound beta at the end of the warm-up.
        beta_end: AdaRound beta at the last step.
        lr_rounding: Adam learning rate of the AdaRound logits.
        lr_step: Adam learning rate of the input step sizes.
        lr_clip: Adam learning rate of the ADC clip parameters theta.
        block_input_keep_prob: QDrop keep probability of the block input (None: always the quantized input).
        batch_size: calibration samples per step.
        seed: base seed of the per-step draws.
        rank: this process's rank under DDP (ranks draw different samples).
    """

    def __init__(
        self,
        blocks: list[tuple[str, nn.Module]],
        rounding_weight: float = 0.01,
        warmup: float = 0.2,
        beta_start: float = 20.0,
        beta_end: float = 2.0,
        lr_rounding: float = 1e-3,
        lr_step: float = 4e-5,
        lr_clip: float = 1e-3,
        block_input_keep_prob: float | None = None,
        batch_size: int = 32,
        seed: int = 0,
        rank: int = 0,
    ):
        self.blocks = blocks
        self.rounding_weight = rounding_weight
        self.warmup = warmup
        self.beta_start, self.beta_end = beta_start, beta_end
        self.learning_rates = {"rounding": lr_rounding, "step": lr_step, "clip": lr_clip}
        self.block_input_keep_prob = block_input_keep_prob
        self.batch_size, self.seed, self.rank = batch_size, seed, rank
        self.current = 0
        self.steps_in_block = 1
        self.step_in_block = 0
        self.cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    # -- block bookkeeping (driven by the PTQ callback) ----------------------------------------------------
    @property
    def block(self) -> tuple[str, nn.Module]:
        return self.blocks[self.current]

    def start_block(self, index: int, steps: int) -> None:
        """Make block ``index`` the one that learns, for ``steps`` steps."""
        self.current, self.steps_in_block, self.step_in_block = index, max(1, steps), 0
        learning = {id(p) for ps in quantizer_parameters(self.blocks[index][1], include_frozen=True).values() for p in ps}
        for _, module in self.blocks:
            for params in quantizer_parameters(module, include_frozen=True).values():
                for param in params:
                    param.requires_grad_(id(param) in learning)

    @torch.no_grad()
    def cache_block_io(self, model: nn.Module, images: torch.Tensor, chunk: int = 256) -> None:
        """Cache ``(x_fp, y_fp, x_q)`` of the current block for all calibration ``images`` (in order)."""
        parts = [self.block_io(model, images[i : i + chunk]) for i in range(0, len(images), chunk)]
        self.cache = tuple(torch.cat(tensors) for tensors in zip(*parts))

    def finish_block(self, index: int) -> None:
        """Freeze block ``index``: hard rounding from now on; its cache is dropped."""
        self.cache = None
        for *_, quantizer in iter_quantizers(self.blocks[index][1], ("weight",)):
            quantizer.harden_()

    @property
    def schedule(self) -> RoundingSchedule:
        return RoundingSchedule(self.steps_in_block, self.warmup, self.beta_start, self.beta_end)

    def lr_factor(self) -> float:
        """Cosine decay within the current block (1 at its first step, ~0 at its last)."""
        return 0.5 * (1 + math.cos(math.pi * min(1.0, self.step_in_block / self.steps_in_block)))

    # -- the objective ------------------------------------------------------------------------------------
    def block_io(self, model: nn.Module, images: torch.Tensor):
        """``(x_fp, y_fp, x_q)`` of the current block for ``images`` (no gradients)."""
        _, block = self.block
        with torch.no_grad(), eval_mode(model):
            with float_mode(model):
                x_fp, y_fp = capture_block_io(model, block, images)
            x_q = capture_block_input(model, block, images)
        return x_fp, y_fp, x_q

    def step_seed(self, step: int) -> int:
        """Seed of step ``step`` of the current block: a function of (seed, rank, block, step) only."""
        return derive_seed(self.seed, self.rank, self.current, step)

    def training_step(self, module, batch, batch_idx: int) -> torch.Tensor:
        name, block = self.block
        self.step_in_block = batch_idx
        seed = self.step_seed(batch_idx)
        generator = torch.Generator().manual_seed(seed)
        indices = torch.randint(len(self.cache[0]), (self.batch_size,), generator=generator)
        torch.manual_seed(seed)  # QDrop masks of this step (block input and inside the quantizers)
        x_fp, y_fp, x_q = (tensor[indices.to(tensor.device)] for tensor in self.cache)
        x = x_q
        if self.block_input_keep_prob is not None:
            x = torch.where(torch.rand_like(x_q) < self.block_input_keep_prob, x_q, x_fp)
        y = block(x)
        reconstruction = (y - y_fp).pow(2).sum(1).mean()
        loss = reconstruction
        schedule = self.schedule
        if schedule.active(batch_idx) and self.rounding_weight > 0:
            beta = schedule.beta(batch_idx)
            rounding = sum(quantizer.rounding_loss(beta) for *_, quantizer in iter_quantizers(block, ("weight",)))
            loss = loss + self.rounding_weight * rounding
            module.log("ptq/rounding_loss", rounding, on_step=True, on_epoch=False)
        penalty = sparsity_penalty(block)
        if penalty is not None:
            loss = loss + penalty
            module.log("ptq/sparsity_penalty", penalty, on_step=True, on_epoch=False)
        check_finite(loss, block, x, where=f"PTQ reconstruction of block {name!r} at step {batch_idx}", prefix=name)
        module.log("ptq/block", float(self.current), on_step=True, on_epoch=False)
        module.log("ptq/rec_loss", reconstruction, on_step=True, on_epoch=False, prog_bar=True)
        module.log(f"ptq/{name}/rec_loss", reconstruction, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self, module):
        groups = [
            {"params": params, "lr": self.learning_rates[kind], "name": kind}
            for kind, params in quantizer_parameters(module.model, include_frozen=True).items()
            if params
        ]
        optimizer = torch.optim.Adam(groups)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _step: self.lr_factor())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
