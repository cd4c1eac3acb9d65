"""`CIMQTrainer`: Lightning's Trainer plus ``export``, the CLI's ``python -m cimq_pl export`` subcommand."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from cimq_pl.errors import ConfigError
from cimq_pl.quiet import quiet_wandb_logger

__all__ = ["CIMQTrainer"]


class CIMQTrainer(pl.Trainer):
    """A `lightning.pytorch.Trainer` that can also export a quantized model for deployment."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for logger in self.loggers:  # before a W&B run starts (the first use of `logger.experiment`)
            quiet_wandb_logger(logger)

    def export(
        self,
        model: pl.LightningModule,
        datamodule: Optional[pl.LightningDataModule] = None,
        ckpt_path: Optional[str] = None,
        dirpath: str = "export",
        overwrite: bool = False,
    ) -> Optional[Path]:
        """Test the quantized model (weights from ``ckpt_path``), then write its deployment export to ``dirpath``.

        The test gives the fake-quant accuracy the export must reproduce; it is recorded in the manifest
        (``reference``) and ``test --model.export <dirpath>`` evaluates the export's integer executor on the same
        data. The export is written atomically by global rank 0.

        Args:
            model: a `CIMQModule` with a CIM macro (``model.cim``) and the technique callbacks it was fit with.
            datamodule: the data to test on.
            ckpt_path: the checkpoint PTQ or QAT wrote (``ptq.ckpt``, ``last.ckpt``).
            dirpath: the export directory to create.
            overwrite: replace an existing export directory.

        Returns:
            The export directory (None on other ranks).
        """
        from cimq_pl.export import export_model  # imported here: the other subcommands do not need it
        from cimq_pl.export.writer import check_export_target

        if not getattr(model, "is_cim", False) or getattr(model, "is_export", False):
            raise ConfigError("export needs a CIM model fit with PTQ or QAT: set model.cim and pass --ckpt_path "
                              "(model.export is already an export)")
        check_export_target(Path(dirpath), overwrite)
        results = self.test(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        path = None
        if self.is_global_zero:
            data_config = model.data_config  # tuples are written as JSON lists
            info = {
                "model": {"name": model.hparams["name"], "num_classes": model.num_classes},
                "data_config": data_config,
                "reference": {"ckpt_path": ckpt_path, "fake_quant_test": {k: float(v) for k, v in results[0].items()}},
            }
            path = export_model(model.model, model.cim, dirpath, tuple(data_config["input_size"]), info, overwrite)
            rank_zero_info(f"[cimq] export written to {path} (manifest.json, model.safetensors)")
        self.strategy.barrier("export")
        return path
