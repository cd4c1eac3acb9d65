"""Callback: post-training quantization as an ordinary ``trainer.fit`` (SPEC 4.4).

``setup``: AdaRound weight rounding on every CIM layer (every stage, so checkpoints fit), and for ``fit``:
network weights frozen, reconstruction units found generically, the reconstruction objective installed,
the datamodule switched to drawing batches from the calibration subset, one epoch per unit.
``on_fit_start``: calibration of every quantizer (skipped when resuming from a checkpoint).
Each epoch reconstructs one unit from block inputs/outputs cached over the calibration images (progress bar with ``ptq/rec_loss``), then hardens its rounding and logs
its partial-sum clip rate and input bit density. At the end the quantized model is written, atomically, to
``<log dir>/checkpoints/ptq.ckpt`` for ``test --ckpt_path``.

With ``iters_per_block: 0`` the fit only calibrates (the conventional baseline) and writes the checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from cimq_pl.callbacks.calibration import calibrate_module_, calibration_images
from cimq_pl.callbacks.technique import require_cim
from cimq_pl.checkpointing import save_checkpoint_atomic
from cimq_pl.cost import describe_layers, take_counts
from cimq_pl.errors import ConfigError
from cimq_pl.metrics import HardwareCostMetric
from cimq_pl.objectives import BlockReconstructionObjective, quantizer_parameters
from cimq_pl.quant import cim_layers, set_collect_stats
from cimq_pl.quant.layers import _CIMLayerBase
from cimq_pl.quant.reconstruction import capture_block_io, eval_mode, find_blocks
from cimq_pl.quant.techniques import QuantDroppingConfig, applied_technique, reconfigure_

__all__ = ["PostTrainingQuantization"]


class PostTrainingQuantization(Callback):
    """Calibrate, then reconstruct block by block with AdaRound (BRECQ) and QDrop.

    Defaults are QDrop's GPU setting except ``iters_per_block`` (QDrop uses 20,000); the configs in
    ``configs/quant/`` state their own presets.

    Args:
        iters_per_block: reconstruction steps per unit; 0 = calibration only (no reconstruction).
        batch_size: images per reconstruction step (per process).
        adaround: learn weight rounding (AdaRound); False keeps round-to-nearest.
        rounding_weight: weight of the AdaRound regulariser.
        warmup: fraction of each unit's steps before the rounding regulariser starts.
        beta_start: AdaRound beta after the warm-up.
        beta_end: AdaRound beta at the end of the unit.
        lr_rounding: Adam learning rate of the AdaRound logits.
        lr_step: Adam learning rate of the input step sizes (QDrop: 4e-5, cosine decay).
        lr_clip: Adam learning rate of the ADC clip parameters theta.
        checkpoint_name: file written into the run's checkpoint folder at the end (rank 0).

    Raises:
        ConfigError: on a bad value (named in the message with what is allowed).
    """

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
        checkpoint_name: str = "ptq.ckpt",
    ):
        for name, value, low in (("iters_per_block", iters_per_block, 0), ("batch_size", batch_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"PostTrainingQuantization.{name}={value!r} is invalid: expected an integer >= {low}")
        if not 0 <= warmup < 1:
            raise ConfigError(f"PostTrainingQuantization.warmup={warmup!r} is invalid: expected a fraction in [0, 1)")
        for name, value in (("rounding_weight", rounding_weight), ("lr_rounding", lr_rounding),
                            ("lr_step", lr_step), ("lr_clip", lr_clip), ("beta_start", beta_start),
                            ("beta_end", beta_end)):
            if not value >= 0:
                raise ConfigError(f"PostTrainingQuantization.{name}={value!r} is invalid: expected a number >= 0")
        self.iters_per_block = iters_per_block
        self.batch_size = batch_size
        self.adaround = adaround
        self.objective_kwargs = dict(
            rounding_weight=rounding_weight, warmup=warmup, beta_start=beta_start, beta_end=beta_end,
            lr_rounding=lr_rounding, lr_step=lr_step, lr_clip=lr_clip,
        )
        self.checkpoint_name = checkpoint_name
        self.objective: BlockReconstructionObjective | None = None
        self.checkpoint_path: Path | None = None
        self._calibration_images: torch.Tensor | None = None

    @property
    def reconstructs(self) -> bool:
        return self.iters_per_block > 0

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        require_cim(pl_module, type(self).__name__)
        model = pl_module.model
        if self.reconstructs and self.adaround:
            reconfigure_(model, weight_rounding="adaround")
        if stage != "fit":
            return
        learnable = {id(p) for params in quantizer_parameters(model, include_frozen=True).values() for p in params}
        for param in model.parameters():  # weights, biases and weight steps stay fixed
            param.requires_grad_(id(param) in learnable)
        blocks = find_blocks(model, lambda m: isinstance(m, _CIMLayerBase))
        dropping = applied_technique(model, QuantDroppingConfig)  # QuantDropping's setup ran before (callback order)
        self.objective = BlockReconstructionObjective(
            blocks,
            block_input_keep_prob=dropping.block_input_keep_prob if dropping else None,
            batch_size=self.batch_size,
            seed=getattr(trainer.datamodule, "seed", 0),
            rank=trainer.global_rank,
            **self.objective_kwargs,
        )
        pl_module.objective = self.objective
        if self.reconstructs:
            if trainer.datamodule is None or not hasattr(trainer.datamodule, "fit_on_steps"):
                raise ConfigError("PostTrainingQuantization needs a cimq_pl datamodule (data.class_path: cimq_pl.datamodules....)")
            trainer.datamodule.fit_on_steps(self.iters_per_block)
            trainer.fit_loop.max_epochs = len(blocks)
            trainer.check_val_every_n_epoch = len(blocks)
        else:
            trainer.fit_loop.max_epochs = 0
        rank_zero_info(
            f"[cimq] PTQ: {len(blocks)} reconstruction units x {self.iters_per_block} steps of {self.batch_size} "
            f"images: {', '.join(name for name, _ in blocks)}"
        )

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._calibration_images = calibration_images(trainer.datamodule, pl_module.device)
        if not (trainer.ckpt_path is not None and pl_module.quantizers_initialized()):
            calibrate_module_(trainer, pl_module, self._calibration_images, getattr(trainer.datamodule, "seed", 0))
        if not self.reconstructs:  # calibration is the whole PTQ: no epoch will run
            self._write_checkpoint(trainer)

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start_unit(trainer, pl_module)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.objective.cache is None:  # resumed in the middle of a unit: Lightning skips on_train_epoch_start
            self._start_unit(trainer, pl_module)

    def _start_unit(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Make unit ``current_epoch`` the one that learns and cache its block I/O (earlier units are final)."""
        index = trainer.current_epoch
        for earlier in range(index):  # after a resume, earlier units are final
            self.objective.finish_block(earlier)
        self.objective.start_block(index, trainer.num_training_batches)
        name = self.objective.blocks[index][0]
        rank_zero_info(f"[cimq] reconstructing unit {index + 1}/{len(self.objective.blocks)}: {name}")
        self.objective.cache_block_io(pl_module.model, self._calibration_images)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        index = trainer.current_epoch
        self.objective.finish_block(index)
        name, block = self.objective.blocks[index]
        pl_module.log_dict(self._block_statistics(trainer, pl_module, name, block), rank_zero_only=True)

    @torch.no_grad()
    def _block_statistics(self, trainer, pl_module, name: str, block) -> dict[str, float]:
        """Partial-sum clip rate and input bit density of the unit on one batch of calibration images."""
        images = self._calibration_images[: self.batch_size]
        set_collect_stats(block, True)
        with eval_mode(pl_module.model):
            capture_block_io(pl_module.model, block, images)  # the forward stops after the unit
        metric = HardwareCostMetric(describe_layers(block), sync_on_compute=False)  # this process's batch
        metric.update(take_counts([layer for _, layer in cim_layers(block)]))
        set_collect_stats(block, False)
        total = metric.compute()
        return {f"ptq/{name}/psum_clip_rate": total.psum_clip_rate, f"ptq/{name}/bit_density": total.bit_density}

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write_checkpoint(trainer)

    def _write_checkpoint(self, trainer: Trainer) -> None:
        """Save the quantized model into the run's checkpoint folder atomically (temporary file + rename)."""
        self.checkpoint_path = save_checkpoint_atomic(trainer, self.checkpoint_name)
        rank_zero_info(f"[cimq] quantized model written to {self.checkpoint_path}")

    def output_files(self) -> list[tuple[str, Path]]:
        """What this run wrote, for the CLI's closing lines."""
        return [("quantized model", self.checkpoint_path)] if self.checkpoint_path is not None else []


#: The DDP strategy PTQ needs: only one unit learns at a time, so the other units' parameters get no gradient
#: (``python -m cimq_pl fit`` picks it for ``--trainer.strategy ddp``).
PTQ_DDP_STRATEGY = "ddp_find_unused_parameters_true"
