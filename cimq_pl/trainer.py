"""`CIMQTrainer`: Lightning's Trainer plus ``export``, ``cost`` and ``search``, the CLI's ``python -m cimq_pl
export``, ``python -m cimq_pl cost`` and ``python -m cimq_pl search`` subcommands, and a ``fit`` that trains on the
module's objective's own loader where it has one (PTQ's block reconstruction)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.utilities.types import EVAL_DATALOADERS, TRAIN_DATALOADERS

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from cimq_pl.errors import ConfigError
from cimq_pl.quiet import quiet_wandb_logger
from cimq_pl.search.config import SearchConfig

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
    """A `lightning.pytorch.Trainer` that can also export a quantized model for deployment, report the hardware
    cost of a configuration without training, and search per-layer precisions for the macro."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for logger in self.loggers:  # before a W&B run starts (the first use of `logger.experiment`)
            quiet_wandb_logger(logger)

    def fit(
        self,
        model: pl.LightningModule,
        train_dataloaders: Optional[Union[TRAIN_DATALOADERS, pl.LightningDataModule]] = None,
        val_dataloaders: Optional[EVAL_DATALOADERS] = None,
        datamodule: Optional[pl.LightningDataModule] = None,
        ckpt_path: Optional[_PATH] = None,
        weights_only: Optional[bool] = None,
    ) -> None:
        r"""Lightning's ``fit``; when the module's objective makes its own training batches (block reconstruction for
        PTQ), ``datamodule`` reaches the fit with the objective's train loader (`CIMQModule.fit_datamodule`).

        Lightning takes the train loader from the datamodule it is given, so the objective's loader is put there,
        in a delegating `~cimq_pl.datamodules.with_train_loader.WithTrainLoader`; validation, calibration and every
        other read stay the datamodule's, and the datamodule itself knows nothing of the objective.

        Args:
            model: Model to fit.
            train_dataloaders: An iterable or collection of iterables specifying training samples.
            val_dataloaders: An iterable or collection of iterables specifying validation samples.
            datamodule: A ``LightningDataModule`` that defines the ``train_dataloader`` hook.
            ckpt_path: Path/URL of the checkpoint from which training is resumed.
            weights_only: Defaults to ``None``. If ``True``, restricts loading to ``state_dicts`` of plain
                ``torch.Tensor`` and other primitive types.
        """
        if hasattr(model, "fit_datamodule"):
            datamodule = model.fit_datamodule(datamodule)
        super().fit(model, train_dataloaders, val_dataloaders, datamodule, ckpt_path, weights_only)

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
                "cim_overrides": getattr(model, "cim_overrides", None),
                "data_config": data_config,
                "reference": {"ckpt_path": ckpt_path, "fake_quant_test": {k: float(v) for k, v in results[0].items()}},
                "device": device_record(model),
            }
            path = export_model(model.model, model.cim, dirpath, tuple(data_config["input_size"]), info, overwrite)
            rank_zero_info(f"[cimq] export written to {path} (manifest.json, model.safetensors)")
        self.strategy.barrier("export")
        return path

    def _prepare_without_training(self, model: pl.LightningModule, datamodule, who: str) -> list:
        """What ``cost`` and ``search`` share: one process, no logger run, the model on the trainer's device with
        its technique callbacks applied as at ``setup``; returns those callbacks."""
        from cimq_pl.callbacks.technique import TechniqueCallback, require_cim

        require_cim(model, who)
        if not hasattr(datamodule, "calibration_dataloader"):
            raise ConfigError(f"{who} calibrates on the calibration subset: it needs a cimq_pl datamodule "
                              f"(data.class_path: cimq_pl.datamodules....), got {type(datamodule).__name__}")
        if self.world_size > 1:
            raise ConfigError(f"{who} runs in one process, got {self.world_size}: use --trainer.devices 1")
        self.loggers = []  # no run: no W&B run is started for it
        self.strategy.connect(model)
        datamodule.trainer = self  # the data reads the model's normalisation (timm data config) through it
        model.to(self.strategy.root_device)
        techniques = [callback for callback in self.callbacks if isinstance(callback, TechniqueCallback)]
        for callback in techniques:
            callback.setup(self, model, "test")
        return techniques

    def _hardware_report(self):
        from cimq_pl.callbacks.hardware_report import HardwareReport

        report = next((callback for callback in self.callbacks if isinstance(callback, HardwareReport)), None)
        return report or HardwareReport()

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
        calibration subset as PTQ with ``BlockReconstruction(iters_per_block=0)`` would (PTQ and QAT callbacks are
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
        from cimq_pl.cost.energy import EnergyTable
        from cimq_pl.cost.report import cost_report, describe_macro, first_images, write_report_files

        if isinstance(images, bool) or not isinstance(images, int) or images < 1:
            raise ConfigError(f"cost: images={images!r} is invalid: expected an integer >= 1")
        techniques = self._prepare_without_training(model, datamodule, "cost")
        report = self._hardware_report()
        table = EnergyTable.from_yaml(energy_table) if energy_table is not None else report.table
        table = table.for_device(getattr(model, "device_spec", None))  # cell reads scale with the conductances
        calibration = calibration_images(datamodule, model.device)
        calibrate_module_(self, model, calibration, getattr(datamodule, "seed", 0))
        title = (f"[cimq] hardware cost of {describe_macro(model.hparams['name'], model.cim, model.cim_overrides)}, "
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

    def search(self, model: pl.LightningModule, datamodule: Optional[pl.LightningDataModule] = None, **settings):
        """Search per-layer precisions of the configured CIM model under an energy (or loss) budget, without training.

        The run's config files say what is searched from: the model on its macro (``model.cim`` and its
        ``model.cim_overrides``), the data and the technique callbacks, applied as at ``setup`` (PTQ/QAT callbacks
        are not run: the search is calibration only, or
        starts from the PTQ checkpoint ``search.init_from``). On the first ``search.images`` images of the calibration
        subset it measures, for every layer and candidate setting, the loss that setting of that layer alone adds
        (by default its Fisher-weighted output noise) and that layer's energy (`cimq_pl.search`), solves the
        budget exactly on the additive model's Pareto front, and (``search.verify``) calibrates and measures the chosen assignment
        and every uniform setting as whole networks. It writes ``<output_dir>/cim_overrides.yaml``, a config
        that ``fit`` takes after the technique config, the CSVs and ``search.png``, and prints the summary.

        Its arguments after ``datamodule`` are the fields of `SearchConfig` (``--energy_budget adc_bits=4``,
        ``--candidates '{adc_bits: [3, 4, 5, 6]}'``; listed by ``python -m cimq_pl search --help``).

        Args:
            model: a `CIMQModule` with a CIM macro (``model.cim``).
            datamodule: a cimq_pl datamodule (calibration subset; test split for ``test_images``).
            **settings: `SearchConfig` fields.

        Returns:
            The `cimq_pl.search.SearchResult`.

        Raises:
            ConfigError: a model without ``model.cim``, data without a calibration subset, more than one process, a
                bad ``search.layers`` pattern or a budget no assignment meets.
        """
        import sys

        import torch
        from lightning.pytorch.utilities import rank_zero_warn

        from cimq_pl.cost.energy import EnergyTable
        from cimq_pl.cost.report import describe_macro, first_images
        from cimq_pl.search import search_precision
        from cimq_pl.search.report import OVERRIDES_FILE, format_summary, write_search_files

        search = SearchConfig(**settings)
        techniques = self._prepare_without_training(model, datamodule, "search")
        table = EnergyTable.from_yaml(search.energy_table) if search.energy_table is not None else self._hardware_report().table
        table = table.for_device(getattr(model, "device_spec", None))  # cell reads scale with the conductances
        images, labels = [], []
        for batch_images, batch_labels in datamodule.calibration_dataloader():
            images.append(batch_images)
            labels.append(batch_labels)
        images, labels = torch.cat(images)[: search.images], torch.cat(labels)[: search.images]
        if len(images) < search.images:
            rank_zero_warn(f"search.images={search.images} but the calibration subset holds {len(images)} images: "
                           "using them all (raise data.calibration_size)")
        device = model.device
        batches = images.to(device).split(search.batch_size)
        test = first_images(datamodule.test_dataloader(), search.test_images, device) if search.test_images else None
        reconstructed = None
        if search.init_from is not None:  # the PTQ network's values, loaded by the bench after its calibration
            from cimq_pl.callbacks.qat import reconstructed_state

            reconstructed = reconstructed_state(model, search.init_from, "search.init_from")
        start = f"from {search.init_from}" if search.init_from is not None else "calibration only"
        title = (f"[cimq] per-layer precision search of {describe_macro(model.hparams['name'], model.cim, model.cim_overrides)}, "
                 f"{', '.join(type(callback).__name__ for callback in techniques) or 'conventional quantizers'}, "
                 f"{start} ({len(images)} train images)")
        bar = {}

        def on_start(total: int) -> None:
            if "tqdm" in bar:  # the number of verified points, known after the trials
                bar["tqdm"].total = total
                bar["tqdm"].refresh()
            elif self.progress_bar_callback is not None:
                from tqdm.auto import tqdm

                bar["tqdm"] = tqdm(total=total, desc="search", dynamic_ncols=True, leave=True)

        def progress(text: str) -> None:
            if "tqdm" in bar:
                bar["tqdm"].set_postfix_str(text, refresh=False)
                bar["tqdm"].update(1)

        try:
            result = search_precision(
                model.model, batches, search, table, labels.to(device).split(search.batch_size), test,
                model.cim_overrides, getattr(datamodule, "seed", 0), progress, on_start, reconstructed,
            )
        finally:
            if "tqdm" in bar:
                bar["tqdm"].close()
        command = "python -m cimq_pl " + " ".join(sys.argv[1:]) if len(sys.argv) > 1 else "python -m cimq_pl search"
        kind, budget, description = result.budget
        header = (f"Per-layer precision chosen by `{command}`\n"
                  f"{title.removeprefix('[cimq] ')}\n"
                  f"{kind} budget {budget:.6g} ({description}); predicted {result.chosen.energy_uj:.6g} uJ/image, "
                  f"{result.table.metric} {result.chosen.loss:.6g} (configured: {result.table.reference_energy_uj:.6g} "
                  f"uJ/image, {result.table.reference_loss:.6g})\n"
                  "Use it after the technique config: python -m cimq_pl fit --config <model> --config <technique> "
                  f"--config {Path(search.output_dir) / OVERRIDES_FILE}")
        written = write_search_files(result, search.output_dir, header, title.removeprefix("[cimq] "))
        print(format_summary(result, title), flush=True)
        for path in written:
            rank_zero_info(f"[cimq] search: {path}")
        return result


def _signature_from_config(method, config: type):
    """``method``'s signature and documentation with ``config``'s fields as its arguments after ``datamodule`` (their
    types, defaults and help text are the dataclass's: the CLI's ``--<field>`` flags, nothing restated)."""
    import dataclasses
    import inspect
    import typing

    from cimq_pl.callbacks.technique import _args_section

    hints = typing.get_type_hints(config)
    parameters = list(inspect.signature(method).parameters.values())[:3]  # self, model, datamodule
    for item in dataclasses.fields(config):
        default = item.default if item.default is not dataclasses.MISSING else item.default_factory()
        parameters.append(inspect.Parameter(item.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                            annotation=hints[item.name]))
    method.__signature__ = inspect.Signature(parameters)
    method.__annotations__ = {p.name: p.annotation for p in parameters[1:] if p.annotation is not inspect.Parameter.empty}
    doc = inspect.cleandoc(method.__doc__ or "")
    head, _, tail = doc.partition("\n\nArgs:")
    method.__doc__ = head + "\n\n" + _args_section(config, {}).replace("Args:", "Args:\n    model: a `CIMQModule` with a "
                                                                      "CIM macro (``model.cim``).\n    datamodule: a cimq_pl "
                                                                      "datamodule.", 1) + "\n\nReturns:" + tail.partition("Returns:")[2]
    return method


_signature_from_config(CIMQTrainer.search, SearchConfig)
