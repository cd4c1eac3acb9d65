"""The one LightningModule: a timm classifier with top-1/top-5 accuracy, trained or evaluated by Lightning.

With ``cim`` (a :class:`~cimq_pl.quant.CIMSpec`) the network is put on that macro at construction: batch
norms are folded into their convs and every conv/linear becomes a CIM layer with *conventional* quantizers
(layerwise min-max weights, uniform min-max activations, fixed min-max ADC). The CIMQ techniques are
callbacks that upgrade those quantizers at ``setup``. What ``training_step`` optimises is the module's
``objective`` (:mod:`cimq_pl.objectives`): the task loss by default (fine-tuning, QAT), block reconstruction for
PTQ; the PTQ and QAT callbacks calibrate the quantizers and drive the fit around it.
"""

from __future__ import annotations

from typing import Any

import dataclasses
import sys

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
import timm.data
import torch
import torch.nn.functional as F
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from cimq_pl.errors import ConfigError
from cimq_pl.models import create_model
from cimq_pl.models.pretrained import check_state_dict_fits
from cimq_pl.objectives import Objective, TaskObjective
from cimq_pl.provenance import RECORD_KEY, check_quantizer_options, quantizer_options, run_record
from cimq_pl.quant import (CIMSpec, DeviceSpec, attach_device_, cim_layers, convert_to_cim, device_mode, fold_batchnorm_,
                           iter_quantizers)
from cimq_pl.quant.device_model import set_device_mode_
from cimq_pl.quant.overrides import normalize_overrides
from cimq_pl.quant.fused import SIMULATIONS, compiled_simulation_available, set_simulation
from cimq_pl.quant.techniques import CONVENTIONAL_OPTIONS

__all__ = ["AUTO_COMPILE_MIN_STEPS", "CIMQModule"]

#: ``simulation: auto`` compiles the CIM layers for fits of at least this many optimizer steps. Measured on
#: 2 CPU cores (README, "Simulation paths"): compiling ResNet-20 costs about 113 s (29 s from Inductor's disk
#: cache) and saves about 0.12 s per reconstruction step, so it pays for itself after about 900 steps.
AUTO_COMPILE_MIN_STEPS = 1000


class CIMQModule(pl.LightningModule):
    """A timm image classifier (any name of ``timm.list_models()``).

    Args:
        name: timm model name, e.g. ``cifar_resnet20`` or ``resnet18``.
        num_classes: classifier outputs; must match the datamodule's classes.
        pretrained: False (random init), True (the model's published weights) or a local path / URL to a
            checkpoint (a local file always takes precedence; a sha256 prefix in the file name is verified).
        lr: SGD learning rate for plain fine-tuning.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        cim: the CIM macro to run the network on (None: the float network). Read by every technique
            callback; ``--model.cim.adc_bits 4`` sets one field from the command line.
        cim_overrides: per-layer macro fields by module name or glob, e.g. ``{"layer1.*.conv2": {"adc_bits": 3},
            "fc": {"adc_bits": 6}}`` (fields ``weight_bits``, ``cell_bits``, ``input_bits``, ``dac_bits``,
            ``adc_bits``, ``mode``; later entries win; `cimq_pl.quant.overrides`). The YAML ``python -m cimq_pl
            search`` writes sets it. Needs ``cim``; every pattern must match a layer.
        export: an export directory (``python -m cimq_pl export``) to evaluate instead: the network is then the
            export's `IntegerExecutor` (integer arithmetic, inference only: test, validate, predict) and
            ``cim`` is the export's; ``pretrained`` is not read.
        simulation: how the CIM layers run (`cimq_pl.quant.fused`): ``"eager"`` (default: plain PyTorch, bit
            for bit the reference results), ``"compiled"`` (``torch.compile`` kernels around channels-last
            convolutions: about 3x faster PTQ steps after a compilation of about 2 minutes for ResNet-20 on
            the CPU; results equal up to the order of float sums; falls back to eager with one warning where
            compilation fails) or ``"auto"`` (compiled for a fit on the CPU of at least `AUTO_COMPILE_MIN_STEPS`
            optimizer steps, where the compilation pays for itself; eager otherwise, for evaluation and on CUDA,
            where the compiled path measured no faster in a PTQ fit).
        objective: what a training step optimises (:mod:`cimq_pl.objectives`), e.g. ``model.objective:
            {class_path: cimq_pl.objectives.BlockReconstruction, init_args: {iters_per_block: 200}}`` for PTQ
            (with the `PostTrainingQuantization` callback); None = `TaskObjective()` (cross-entropy: fine-tuning,
            QAT). Not a hyperparameter of the checkpoint.
        device: the real chip's cells and ADCs (a :class:`~cimq_pl.quant.DeviceSpec`; None: ideal ones), next to
            ``cim``. Validation, test and predict run on chip ``device.seed`` read ``device.read_time`` seconds
            after programming (`cimq_pl.callbacks.MonteCarloDevices` evaluates many chips and times);
            calibration and training see ideal cells unless `cimq_pl.callbacks.NoiseAwareTraining` draws a fresh
            chip every step. ``--model.device.programming_sigma 0.05`` sets one field. Not a hyperparameter
            of the checkpoint: a quantized network is tested on any device.
    """

    def __init__(
        self,
        name: str = "cifar_resnet20",
        num_classes: int = 10,
        pretrained: bool | str = False,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        cim: CIMSpec | None = None,
        cim_overrides: dict[str, dict[str, Any]] | None = None,
        export: str | None = None,
        device: DeviceSpec | None = None,
        objective: Objective | None = None,
        simulation: str = "eager",
    ):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ConfigError(f"model.num_classes must be an integer >= 1, got {num_classes!r}")
        if lr <= 0:
            raise ConfigError(f"model.lr must be > 0, got {lr!r}")
        if objective is not None and not isinstance(objective, Objective):
            raise ConfigError(f"model.objective must be a cimq_pl.objectives.Objective (TaskObjective, "
                              f"BlockReconstruction), got {type(objective).__name__}")
        # `device` is left out: LightningCLI would put a checkpoint's hyperparameters over a test's --model.device;
        # `objective` too: a checkpoint is tested or exported whatever trained it (and holds plain values only)
        self.save_hyperparameters(ignore=["cim", "cim_overrides", "device", "objective"])
        self.num_classes = num_classes
        self.conversion_report = None
        if export is not None:
            self.model = self._load_export(export, name, num_classes)
            if cim is not None and cim != self.model.spec:
                raise ConfigError(f"model.cim={cim} disagrees with the export {export!r}, made for {self.model.spec}; "
                                  "leave model.cim unset (the export carries its macro)")
            exported_overrides = self.model.manifest.get("cim_overrides") or None
            if cim_overrides and normalize_overrides(cim_overrides) != exported_overrides:
                raise ConfigError(f"model.cim_overrides={cim_overrides} disagrees with the export {export!r}, made with "
                                  f"{exported_overrides}; leave model.cim_overrides unset (the export carries them)")
            cim, cim_overrides = self.model.spec, exported_overrides
        else:
            self.model = create_model(name, num_classes, pretrained)
        self.hparams["cim"] = dataclasses.asdict(cim) if cim is not None else None  # plain types in checkpoints
        self.hparams["cim_overrides"] = normalize_overrides(cim_overrides) or None
        self.cim = cim
        self.cim_overrides = self.hparams["cim_overrides"]
        if self.cim_overrides and cim is None:
            raise ConfigError("model.cim_overrides needs a macro to override: set model.cim (or drop the overrides)")
        if simulation not in (*SIMULATIONS, "auto"):
            raise ConfigError(f"model.simulation={simulation!r} is invalid: expected one of "
                              f"{[*SIMULATIONS, 'auto']}")
        if cim is not None and export is None:
            self.model.eval()
            fold_batchnorm_(self.model)
            self.conversion_report = convert_to_cim(self.model, cim, options=CONVENTIONAL_OPTIONS,
                                                    overrides=self.cim_overrides)
            set_simulation(self.model, "eager" if simulation == "auto" else simulation)
        self.simulation = simulation
        if device is not None and (cim is None or export is not None):
            raise ConfigError("model.device needs the network on a CIM macro (model.cim) and is not simulated by an "
                              "export's integer executor (model.export): set model.cim, or remove model.device")
        self.device_spec = device
        if device is not None:
            attach_device_(self.model, device, mode="ideal")  # chip on for evaluation, see on_validation_start
        self.noise_aware = False  # set by the NoiseAwareTraining callback: fresh chips in every training step
        self.chip_evaluation = True  # False: evaluate on ideal cells (the export's reference test)
        self.checkpoint_record: dict | None = None  # checkpoint["cimq"] of the checkpoint loaded, if any
        self.objective: Objective = objective if objective is not None else TaskObjective()
        top_k = min(5, num_classes)
        self.val_metrics = self._metrics("val/", top_k)
        self.test_metrics = self._metrics("test/", top_k)

    @staticmethod
    def _load_export(path: str, name: str, num_classes: int) -> torch.nn.Module:
        """The export's `IntegerExecutor` (the export package is imported only when ``export`` is given)."""
        from cimq_pl.export import IntegerExecutor

        executor = IntegerExecutor(path)
        exported = executor.manifest.get("model", {})
        for field, value in (("name", name), ("num_classes", num_classes)):
            if field in exported and exported[field] != value:
                raise ConfigError(f"model.{field}={value!r} disagrees with the export {path!r}, made from "
                                  f"{field}={exported[field]!r}; use the model config the export was made with")
        return executor

    @property
    def is_export(self) -> bool:
        """Whether the network is an export's integer executor (``export`` was given)."""
        executor = sys.modules.get("cimq_pl.export.executor")  # never imported: no executor exists
        return executor is not None and isinstance(self.model, executor.IntegerExecutor)

    def _metrics(self, prefix: str, top_k: int) -> MetricCollection:
        """Top-1 (``acc``) and top-k (``acc_top5``) accuracy as fractions, DDP-reduced by torchmetrics."""
        return MetricCollection(
            {
                "acc": MulticlassAccuracy(num_classes=self.num_classes, top_k=1, average="micro"),
                f"acc_top{top_k}": MulticlassAccuracy(num_classes=self.num_classes, top_k=top_k, average="micro"),
            },
            prefix=prefix,
        )

    @property
    def data_config(self) -> dict[str, Any]:
        """timm's data config of the model (input size, mean, std, ...), read by the datamodules."""
        return timm.data.resolve_model_data_config(self.model)

    def setup(self, stage: str) -> None:
        """Check the data, then let the objective prepare the model (after every callback's ``setup``)."""
        if self.is_export and stage == "fit":
            raise ConfigError(f"model.export={self.hparams['export']!r} is inference only: use test, validate or "
                              "predict (fit the float or CIM model, then export it)")
        self.check_data(getattr(self.trainer, "datamodule", None) if self._trainer is not None else None)
        self.objective.setup(self, stage)

    def fit_datamodule(self, datamodule: pl.LightningDataModule | None) -> pl.LightningDataModule | None:
        """The datamodule a fit of this module reads: ``datamodule``, or, when the objective makes its own training
        batches (block reconstruction), ``datamodule`` with the objective's train loader (`WithTrainLoader`).

        Lightning takes the train loader from the datamodule when one is given, so the objective's loader reaches
        the fit through it; `CIMQTrainer.fit` (``python -m cimq_pl fit``) calls this, a plain `Trainer` needs
        ``trainer.fit(module, datamodule=module.fit_datamodule(datamodule))``.
        """
        from cimq_pl.datamodules.with_train_loader import WithTrainLoader

        if datamodule is None or isinstance(datamodule, WithTrainLoader) or not self.objective.makes_train_batches:
            return datamodule
        return WithTrainLoader(datamodule, self.objective.train_dataloader)

    def check_data(self, datamodule) -> None:
        """Raise `ConfigError` when ``datamodule`` has another number of classes than the classifier."""
        data_classes = getattr(datamodule, "num_classes", None)
        if data_classes and data_classes != self.num_classes:
            raise ConfigError(
                f"model.num_classes={self.num_classes} disagrees with the data ({type(datamodule).__name__} "
                f"has {data_classes} classes); set model.num_classes {data_classes}"
            )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the macro, technique set, quantizer options and W&B run (`cimq_pl.provenance`)."""
        checkpoint[RECORD_KEY] = run_record(self)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another model, macro or technique set with one clear error line."""
        # the options first: a layer's recorded option names the cause of the tensors a state dict lacks
        check_quantizer_options(checkpoint.get(RECORD_KEY), quantizer_options(self.model), "the checkpoint (ckpt_path)")
        check_state_dict_fits(
            self.state_dict(), checkpoint.get("state_dict", {}), "the checkpoint (ckpt_path)",
            f"model {self.hparams['name']!r} with cim={self.hparams['cim']}",
            " (resume or test with the same model, model.cim and technique callbacks as the run that wrote it)",
        )
        self.checkpoint_record = checkpoint.get(RECORD_KEY)

    @property
    def is_cim(self) -> bool:
        """Whether the network runs on a CIM macro (``cim`` was given)."""
        return self.cim is not None

    def quantizers_initialized(self) -> bool:
        """Whether every enabled quantizer of every CIM layer has its scales/ranges set."""
        return all(q.initialized for *_, q in iter_quantizers(self.model) if q.enabled)

    def _require_calibrated(self, stage: str) -> None:
        if self.is_cim and not self.quantizers_initialized():
            raise ConfigError(
                f"{stage}: the CIM model's quantizers are not calibrated; run `fit` with a PTQ/QAT callback "
                "(e.g. --config configs/quant/conventional.yaml) and pass --ckpt_path to the checkpoint it wrote"
            )

    def _evaluate_on_chip(self, on: bool) -> None:
        """Chip ``device.seed`` at ``device.read_time`` (``on``), or ideal cells (training, calibration)."""
        if self.device_spec is not None:
            on = on and self.chip_evaluation
            spec = self.device_spec
            set_device_mode_(self.model, "chip" if on else "ideal", seed=spec.seed, time=spec.read_time)

    @property
    def _auto_simulation(self) -> bool:
        """Whether ``simulation: auto`` chooses the path of CIM layers this module simulates."""
        return self.simulation == "auto" and self.is_cim and not self.is_export

    def on_train_start(self) -> None:
        """Every quantizer in training mode (QDrop, soft AdaRound, the sparsity penalty); ``simulation: auto``:
        compile the CIM layers for a CPU fit long enough to repay the compilation.

        Lightning keeps the train/eval flags modules have when a fit starts, and the network is built in eval
        mode (to fold BN): the quantizers the technique callbacks rebuild are in training mode, but those the
        conversion made and a technique only re-set in place (`QuantDropping`'s keep probability) would stay in
        eval mode and never drop. Only the
        quantizers are switched, so a BN that could not be folded keeps its running statistics. Validation
        inside the fit runs in eval mode and restores these flags (Lightning's evaluation loop).
        """
        for *_, quantizer in iter_quantizers(self.model):
            quantizer.train()
        if self._auto_simulation:
            steps = self.trainer.estimated_stepping_batches
            if self.device.type == "cpu" and steps >= AUTO_COMPILE_MIN_STEPS and compiled_simulation_available():
                set_simulation(self.model, "compiled")
                rank_zero_info(f"model.simulation=auto: {steps} training steps, CIM layers compiled "
                               f"(>= {AUTO_COMPILE_MIN_STEPS}; compilation takes a minute or two)")

    def on_train_end(self) -> None:
        if self._auto_simulation:
            set_simulation(self.model, "eager")  # evaluation after the fit runs as a separate test would

    def on_validation_start(self) -> None:
        if not self.trainer.sanity_checking:
            self._require_calibrated("validate")
        self._evaluate_on_chip(True)

    def on_validation_end(self) -> None:
        self._evaluate_on_chip(False)

    def on_test_start(self) -> None:
        self._require_calibrated("test")
        self._evaluate_on_chip(True)

    def on_test_end(self) -> None:
        self._evaluate_on_chip(False)

    def on_predict_start(self) -> None:
        self._require_calibrated("predict")
        self._evaluate_on_chip(True)

    def on_predict_end(self) -> None:
        self._evaluate_on_chip(False)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        if self.noise_aware:  # a fresh chip per step, drawn after the objective seeds the step's random draws
            with device_mode(self.model, "fresh"):
                return self.objective.training_step(self, batch, batch_idx)
        return self.objective.training_step(self, batch, batch_idx)

    def _evaluate(self, batch, metrics: MetricCollection, prefix: str) -> None:
        images, labels = batch
        logits = self(images)
        self.log(f"{prefix}loss", F.cross_entropy(logits, labels), sync_dist=True)
        metrics.update(logits, labels)
        self.log_dict(metrics, prog_bar=prefix == "val/")

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics, "val/")

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, "test/")

    def predict_step(self, batch, batch_idx: int) -> dict[str, torch.Tensor]:
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        logits = self(images)
        return {"logits": logits, "prediction": logits.argmax(1)}

    def configure_optimizers(self):
        return self.objective.configure_optimizers(self)

