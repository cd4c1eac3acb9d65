"""Callback: post-training quantization as an ordinary ``trainer.fit`` (SPEC 4.4), with the
`~cimq_pl.objectives.BlockReconstruction` objective (``model.objective``).

PTQ as a recipe: the module's objective says what a training step optimises, which parameters learn, how
long the fit is (one epoch of every unit's steps) and brings its own train loader; this callback
does what happens around the steps:

* ``on_fit_start``: calibration of every quantizer (skipped when resuming from a checkpoint); with
  ``iters_per_block: 0`` (the conventional baseline) that is the whole PTQ: the checkpoint is written and the fit
  stops before its first training step.
* ``on_train_batch_start`` of a unit's first batch (or of the first batch after a resume): earlier units are
  hardened and the unit's block I/O is cached over the calibration images (and, with ``rounding_init: gptq``,
  the unit's weights GPTQ-rounded from the cached inputs: `BlockReconstruction.init_unit_rounding`).
* ``on_train_batch_end`` of a unit's last batch: its rounding is hardened and its partial-sum clip rate and input
  bit density are logged (``ptq/<unit>/psum_clip_rate``, ``ptq/<unit>/bit_density``).
* At the end the quantized model is written, atomically, to ``<log dir>/checkpoints/ptq.ckpt`` for
  ``test --ckpt_path``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

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
from cimq_pl.objectives import BlockReconstruction
from cimq_pl.quant import cim_layers, set_collect_stats
from cimq_pl.quant.reconstruction import eval_mode

__all__ = ["MOVED_TO_OBJECTIVE", "PostTrainingQuantization"]

#: Init arguments of this callback before the objective took them: `BlockReconstruction`'s arguments now
#: (``model.objective.init_args``). The CLI still reads them from a config, for one release, with a FutureWarning.
MOVED_TO_OBJECTIVE = ("iters_per_block", "batch_size", "adaround", "rounding_weight", "warmup", "beta_start",
                      "beta_end", "lr_rounding", "lr_step", "lr_clip")


class PostTrainingQuantization(Callback):
    """Calibrate, then drive block reconstruction unit by unit (BRECQ + AdaRound, QDrop) and write ``ptq.ckpt``.

    The reconstruction's settings are the module's objective's:
    ``model.objective: {class_path: cimq_pl.objectives.BlockReconstruction, init_args: {iters_per_block: 200}}``.

    Args:
        checkpoint_name: file written into the run's checkpoint folder at the end (rank 0).
        iters_per_block: deprecated: `BlockReconstruction`'s (``model.objective.init_args.iters_per_block``); the
            CLI moves it there for one release. The same holds for batch_size, adaround, rounding_weight, warmup,
            beta_start, beta_end, lr_rounding, lr_step and lr_clip.

    Raises:
        ConfigError: a moved argument given in Python, or (at setup) a model without a CIM macro or without a
            `BlockReconstruction` objective.
    """

    def __init__(
        self,
        checkpoint_name: str = "ptq.ckpt",
        *,
        iters_per_block: Optional[int] = None,
        batch_size: Optional[int] = None,
        adaround: Optional[bool] = None,
        rounding_weight: Optional[float] = None,
        warmup: Optional[float] = None,
        beta_start: Optional[float] = None,
        beta_end: Optional[float] = None,
        lr_rounding: Optional[float] = None,
        lr_step: Optional[float] = None,
        lr_clip: Optional[float] = None,
    ):
        given = {name: value for name, value in locals().items() if name in MOVED_TO_OBJECTIVE and value is not None}
        if given:
            arguments = ", ".join(f"{name}={value!r}" for name, value in given.items())
            raise ConfigError(f"PostTrainingQuantization({arguments}): these settings are the objective's now: "
                              f"CIMQModule(objective=BlockReconstruction({arguments})) (model.objective in a config)")
        self.checkpoint_name = checkpoint_name
        self.checkpoint_path: Path | None = None
        self._calibration_images: torch.Tensor | None = None

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        require_cim(pl_module, type(self).__name__)
        require_reconstruction(getattr(pl_module, "objective", None))

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        objective: BlockReconstruction = pl_module.objective
        rank_zero_info(f"[cimq] PTQ: {objective.describe()}")
        self._calibration_images = calibration_images(trainer.datamodule, pl_module.device)
        if not (trainer.ckpt_path is not None and pl_module.quantizers_initialized()):
            calibrate_module_(trainer, pl_module, self._calibration_images, getattr(trainer.datamodule, "seed", 0))
        if not objective.reconstructs:  # calibration is the whole PTQ: stop before the first training step
            self._write_checkpoint(trainer)
            trainer.should_stop = True

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pl_module.objective.check_train_batches(trainer.num_training_batches)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        objective: BlockReconstruction = pl_module.objective
        if objective.schedule.starts_unit(batch_idx) or objective.cache is None:  # cache None: resumed mid-unit
            self._start_unit(pl_module, objective.schedule.unit(batch_idx))

    def _start_unit(self, pl_module: LightningModule, index: int) -> None:
        """Make unit ``index`` the one that learns and cache its block I/O (earlier units are final)."""
        objective: BlockReconstruction = pl_module.objective
        for earlier in range(index):  # after a resume, earlier units are final
            objective.finish_unit(earlier)
        objective.start_unit(index)
        name = objective.blocks[index][0]
        rank_zero_info(f"[cimq] reconstructing unit {index + 1}/{len(objective.blocks)}: {name}")
        objective.cache_block_io(pl_module.model, self._calibration_images)
        report = objective.init_unit_rounding()  # rounding_init: gptq (not again after a resume mid-unit)
        if report is not None:
            rank_zero_info(f"[cimq] {name}: {report.describe()}")

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        objective: BlockReconstruction = pl_module.objective
        if not objective.schedule.ends_unit(batch_idx):
            return
        index = objective.schedule.unit(batch_idx)
        # the quantized network's inputs to the unit (the cache every step reads; finish_unit may drop it)
        unit_inputs = objective.cache[2][: objective.batch_size]
        objective.finish_unit(index)
        name, block = objective.blocks[index]
        statistics = block_statistics(name, block, unit_inputs)
        pl_module.log_dict(statistics, on_step=False, on_epoch=True, rank_zero_only=True)  # logged at the epoch's end

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


@torch.no_grad()
def block_statistics(name: str, block: torch.nn.Module, unit_inputs: torch.Tensor) -> dict[str, float]:
    """Partial-sum clip rate and input bit density of the (hardened) unit ``block`` named ``name``, run alone in eval
    mode on ``unit_inputs``, the quantized network's inputs to it (one batch of calibration images, from the PTQ
    cache: no forward of the units before it)."""
    set_collect_stats(block, True)
    with eval_mode(block):
        block(unit_inputs)
    metric = HardwareCostMetric(describe_layers(block), sync_on_compute=False)  # this process's batch
    metric.update(take_counts([layer for _, layer in cim_layers(block)]))
    set_collect_stats(block, False)
    total = metric.compute()
    return {f"ptq/{name}/psum_clip_rate": total.psum_clip_rate, f"ptq/{name}/bit_density": total.bit_density}


def require_reconstruction(objective: Any) -> None:
    """Raise unless ``objective`` (the module's) is a `BlockReconstruction`, which PTQ drives."""
    if not isinstance(objective, BlockReconstruction):
        raise ConfigError(
            f"PostTrainingQuantization drives block reconstruction, but model.objective is "
            f"{type(objective).__name__}: add model.objective: {{class_path: cimq_pl.objectives.BlockReconstruction, "
            "init_args: {iters_per_block: 200}} (iters_per_block: 0 = calibration only)"
        )


#: The DDP strategy PTQ needs: only one unit learns at a time, so the other units' parameters get no gradient
#: (``python -m cimq_pl fit`` picks it for ``--trainer.strategy ddp``).
PTQ_DDP_STRATEGY = "ddp_find_unused_parameters_true"
