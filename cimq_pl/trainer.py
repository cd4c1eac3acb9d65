"""`CIMQTrainer`: Lightning's Trainer plus ``export`` and ``cost``, the CLI's ``python -m cimq_pl export`` and
``python -m cimq_pl cost`` subcommands."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from cimq_pl.errors import ConfigError
from cimq_pl.quiet import quiet_wandb_logger

__all__ = ["CIMQTrainer"]


def device_record(model: pl.LightningModule) -> Optional[dict]:
    """The export's ``device`` field: the `DeviceSpec` the network was quantized for, or None.

    That is the device noise-aware training drew its chips from (recorded in the checkpoint), else ``model.device``
    (the chip the network is meant for, not trained against); ``noise_aware_training`` says which.
    """
    import dataclasses

    record = getattr(model, "checkpoint_record", None) or {}
    trained = record.get("device") if record.get("noise_aware") else None
    spec = getattr(model, "device_spec", None)
    if trained is None and spec is None:
        return None
    return {"spec": trained if trained is not None else dataclasses.asdict(spec), "noise_aware_training": trained is not None}


class CIMQTrainer(pl.Trainer):
    """A `lightning.pytorch.Trainer` that can also export a quantized model for deployment and report the
    hardware cost of a configuration without training."""

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
        model.chip_evaluation = False  # the reference the integer executor must reproduce: ideal cells and ADCs
        try:
            results = self.test(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        finally:
            model.chip_evaluation = True
        path = None
        if self.is_global_zero:
            data_config = model.data_config  # tuples are written as JSON lists
            info = {
                "model": {"name": model.hparams["name"], "num_classes": model.num_classes},
                "data_config": data_config,
                "reference": {"ckpt_path": ckpt_path, "fake_quant_test": {k: float(v) for k, v in results[0].items()}},
                "device": device_record(model),
            }
            path = export_model(model.model, model.cim, dirpath, tuple(data_config["input_size"]), info, overwrite)
            rank_zero_info(f"[cimq] export written to {path} (manifest.json, model.safetensors)")
        self.strategy.barrier("export")
        return path

    def cost(
        self,
        model: pl.LightningModule,
        datamodule: Optional[pl.LightningDataModule] = None,
        images: int = 64,
        energy_table: Optional[str] = None,
        output_dir: Optional[str] = None,
    ):
        """Print the hardware cost of the configured CIM model beside its conventional baseline, without training.

        The run's config files say what is costed: the model on its macro (``model.cim``), the data, and the
        technique callbacks, applied as at ``setup``. Every quantizer is then calibrated on the datamodule's
        calibration subset as ``PostTrainingQuantization(iters_per_block=0)`` would (PTQ and QAT callbacks are
        not run: no reconstruction, so the accuracy is not a PTQ result), the first ``images`` test images run
        with the event counters on, and `cimq_pl.cost.cost_report` prints the per-layer table beside the
        baseline's. A `HardwareReport` callback in the config gives the energy table, whether to measure the
        baseline, its ADC bits and its calibration images. Nothing is logged (no logger run is started).

        Args:
            model: a `CIMQModule` with a CIM macro (``model.cim``).
            datamodule: a cimq_pl datamodule (test split and calibration subset).
            images: test images to run, from the start of the test split.
            energy_table: YAML file of per-event energies; None = the HardwareReport callback's, else NeuroSim 22 nm.
            output_dir: folder for ``hardware_cost_layers.csv``, ``hardware_cost_summary.csv`` and
                ``hardware_cost_energy.png``; None = print only.

        Returns:
            The `cimq_pl.cost.CostReport`.

        Raises:
            ConfigError: on a bad argument, a model without ``model.cim``, data without a calibration subset, or
                more than one process.
        """
        import torch

        from cimq_pl.callbacks.calibration import calibrate_module_, calibration_images
        from cimq_pl.callbacks.hardware_report import HardwareReport
        from cimq_pl.callbacks.technique import TechniqueCallback, require_cim
        from cimq_pl.cost.energy import EnergyTable
        from cimq_pl.cost.report import cost_report, describe_macro, first_images, write_report_files

        if isinstance(images, bool) or not isinstance(images, int) or images < 1:
            raise ConfigError(f"cost: images={images!r} is invalid: expected an integer >= 1")
        require_cim(model, "cost")
        if not hasattr(datamodule, "calibration_dataloader"):
            raise ConfigError(f"cost calibrates on the calibration subset: it needs a cimq_pl datamodule "
                              f"(data.class_path: cimq_pl.datamodules....), got {type(datamodule).__name__}")
        if self.world_size > 1:
            raise ConfigError(f"cost runs in one process, got {self.world_size}: use --trainer.devices 1")
        report = next((callback for callback in self.callbacks if isinstance(callback, HardwareReport)), None)
        report = report or HardwareReport()
        table = EnergyTable.from_yaml(energy_table) if energy_table is not None else report.table
        table = table.for_device(getattr(model, "device_spec", None))  # cell reads scale with the conductances
        self.loggers = []  # a cost estimate is no run: no W&B run is started for it
        self.strategy.connect(model)
        datamodule.trainer = self  # the data reads the model's normalisation (timm data config) through it
        model.to(self.strategy.root_device)
        techniques = [callback for callback in self.callbacks if isinstance(callback, TechniqueCallback)]
        for callback in techniques:
            callback.setup(self, model, "test")
        calibration = calibration_images(datamodule, model.device)
        calibrate_module_(self, model, calibration, getattr(datamodule, "seed", 0))
        title = (f"[cimq] hardware cost of {describe_macro(model.hparams['name'], model.cim)}, "
                 f"{', '.join(type(callback).__name__ for callback in techniques) or 'conventional quantizers'}, "
                 f"calibration only ({len(calibration)} train images), {images} test images")
        with torch.no_grad():
            result = cost_report(
                model.model, None, first_images(datamodule.test_dataloader(), images, model.device),
                calibration[: report.baseline_calibration_images].split(256), table=table, baseline=report.baseline,
                baseline_adc_bits=report.baseline_adc_bits, title=title,
            )
        if output_dir is not None:
            folder = Path(output_dir)
            names = ("hardware_cost_layers.csv", "hardware_cost_summary.csv", "hardware_cost_energy.png")
            written = write_report_files(result, *(folder / name for name in names), run=title)
            rank_zero_info(f"[cimq] hardware report (cost): {', '.join(str(path) for path in written)}")
        return result
