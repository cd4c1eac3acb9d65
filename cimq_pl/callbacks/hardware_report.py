"""`HardwareReport`: energy, TOPS/W, bit density and efficiency vs the conventional baseline at every evaluation.

During validation and test the callback turns the CIM layers' event counters on, accumulates them per batch
in a DDP-safe `HardwareCostMetric`, and runs the conventional baseline (`cimq_pl.cost.build_baseline`: same
network and macro, layerwise min-max weights, uniform min-max inputs, 8-bit min-max ADC, calibrated on the
datamodule's calibration subset) on the same images, so both bit densities are measured. At the end it logs
scalars, writes a per-layer CSV and a summary CSV (atomically) into the run folder, a stacked-bar picture of
the energy per layer, a W&B Table and Image when the logger is a `WandbLogger`, and prints the table (rank 0).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from cimq_pl.cost import (
    BASELINE_ADC_BITS,
    LAYER_COLUMNS,
    SUMMARY_COLUMNS,
    EnergyTable,
    NetworkCost,
    build_baseline,
    describe_layers,
    format_table,
    hw_efficiency,
    layer_rows,
    plot_energy_breakdown,
    summary_row,
    take_counts,
    uncosted_layers,
    write_csv_atomic,
)
from cimq_pl.callbacks.calibration import batch_images, calibration_batches
from cimq_pl.errors import ConfigError
from cimq_pl.metrics.hardware import HardwareCostMetric
from cimq_pl.quant.convert import cim_layers, set_collect_stats

__all__ = ["HardwareReport", "report_file_name"]


def report_file_name(stage: str, part: str) -> str:
    """The name of a `HardwareReport` file: ``hardware_<stage>_<part>`` (``layers.csv``, ``summary.csv``,
    ``energy.png``), in the run's output folder."""
    return f"hardware_{stage}_{part}"


def run_output_dir(trainer: Trainer, output_dir: Optional[str]) -> Path:
    """Where a callback writes its files: ``output_dir``, else the W&B run's files folder, else the log dir.

    Collective (it reads ``trainer.log_dir``): call it on every rank."""
    fallback = trainer.log_dir or trainer.default_root_dir
    if output_dir is not None:
        return Path(output_dir)
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and trainer.is_global_zero:
            return Path(logger.experiment.dir)
    return Path(fallback)


def _network(pl_module: LightningModule) -> torch.nn.Module:
    """The network the module runs (``pl_module.model`` for `CIMQModule`)."""
    model = getattr(pl_module, "model", None)
    return model if isinstance(model, torch.nn.Module) else pl_module


def _weights_key(network: torch.nn.Module) -> tuple:
    """Identity and in-place version of every CIM layer's weight and bias: changes whenever they are updated."""
    key = []
    for name, layer in cim_layers(network):
        for tensor in (layer.weight, layer.bias):
            if tensor is not None:
                key.append((name, tensor.data_ptr(), tensor._version, tuple(tensor.shape)))
    return tuple(key)


class _Evaluation:
    """Bookkeeping of one validation/test run: the layers, the metrics and the baseline (never checkpointed)."""

    def __init__(self, layers, metric, baseline=None, baseline_layers=(), baseline_metric=None) -> None:
        self.layers = layers
        self.metric = metric
        self.baseline = baseline
        self.baseline_layers = baseline_layers
        self.baseline_metric = baseline_metric
        self.batches = 0
        self.cost: Optional[NetworkCost] = None
        self.baseline_cost: Optional[NetworkCost] = None


class HardwareReport(Callback):
    """Reports the hardware cost of the CIM model at the end of every validation and test (SPEC section 5).

    Logged scalars (``<stage>`` is ``val`` or ``test``): ``<stage>/energy_per_image_uj``,
    ``<stage>/tops_per_w``, ``<stage>/bit_density``, ``<stage>/adc_energy_share``,
    ``<stage>/latency_us_per_image``, and with the baseline ``<stage>/baseline_energy_per_image_uj``,
    ``<stage>/baseline_bit_density`` and ``<stage>/hw_efficiency_vs_baseline`` (baseline energy / ours).
    Files (``output_dir``, default the W&B run's files folder, else the trainer's log dir):
    ``hardware_<stage>_layers.csv`` (`cimq_pl.cost.LAYER_COLUMNS`, per image; its ``energy_uj`` column sums
    to ``<stage>/energy_per_image_uj``), ``hardware_<stage>_summary.csv`` (`cimq_pl.cost.SUMMARY_COLUMNS`,
    with the accuracy; feed several to `cimq_pl.cost.plot_accuracy_vs_energy`) and
    ``hardware_<stage>_energy.png``. With a `WandbLogger`: Table ``<stage>/hardware_layers`` and Image
    ``<stage>/energy_breakdown``.

    Args:
        energy_table: YAML file of per-event energies (`cimq_pl.cost.EnergyTable.from_yaml`); None = the
            NeuroSim 22 nm defaults.
        baseline: measure the conventional baseline on the same images (for the efficiency ratio).
        baseline_adc_bits: ADC bits of the baseline, in [1, 16].
        baseline_calibration_images: calibration images (from the datamodule's calibration subset, train
            split) for the baseline's min-max ranges; None = the whole subset.
        baseline_batches: evaluation batches per process the baseline runs on; None = all of them.
        output_dir: folder for the CSV and PNG files; None = the W&B run's files folder, else the log dir.
        log_validation: also report at validation (not during the sanity check).
        plots: write (and log) the energy-breakdown picture.
        print_table: print the per-layer table on rank 0.

    Raises:
        ConfigError: on a bad argument (the message names the value and what is allowed), at ``setup`` when
            the baseline is requested but the datamodule has no ``calibration_dataloader``.
    """

    def __init__(
        self,
        energy_table: Optional[str] = None,
        baseline: bool = True,
        baseline_adc_bits: int = BASELINE_ADC_BITS,
        baseline_calibration_images: Optional[int] = None,
        baseline_batches: Optional[int] = None,
        output_dir: Optional[str] = None,
        log_validation: bool = True,
        plots: bool = True,
        print_table: bool = True,
    ) -> None:
        super().__init__()
        self.table = EnergyTable.from_yaml(energy_table) if energy_table is not None else EnergyTable()
        if isinstance(baseline_adc_bits, bool) or not isinstance(baseline_adc_bits, int) or not 1 <= baseline_adc_bits <= 16:
            raise ConfigError(f"HardwareReport.baseline_adc_bits={baseline_adc_bits!r} is invalid: expected an integer in [1, 16]")
        for name, value in (("baseline_calibration_images", baseline_calibration_images),
                            ("baseline_batches", baseline_batches)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"HardwareReport.{name}={value!r} is invalid: expected an integer >= 1 or null (all)")
        if output_dir is not None and (not isinstance(output_dir, str) or not output_dir):
            raise ConfigError(f"HardwareReport.output_dir={output_dir!r} is invalid: expected a folder path or null")
        self.energy_table = energy_table
        self.baseline = bool(baseline)
        self.baseline_adc_bits = baseline_adc_bits
        self.baseline_calibration_images = baseline_calibration_images
        self.baseline_batches = baseline_batches
        self.output_dir = output_dir
        self.log_validation = log_validation
        self.plots = plots
        self.print_table = print_table
        self._runs: dict = {}
        self._baseline: Optional[tuple] = None  # (weights key, calibrated baseline), reused while weights hold
        self._warned_no_cim = False
        self.last_results: dict = {}

    # ------------------------------------------------------------------ checks that need the trainer
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        if self.baseline and not hasattr(datamodule, "calibration_dataloader"):
            raise ConfigError(
                "HardwareReport(baseline=true) calibrates the baseline on the calibration subset: it needs a cimq_pl "
                f"datamodule with calibration_dataloader(), got {type(datamodule).__name__}; set baseline: false"
            )

    # ------------------------------------------------------------------ start
    def _baseline_for(self, network: torch.nn.Module, trainer: Trainer, device: torch.device) -> torch.nn.Module:
        """The calibrated baseline of ``network``, rebuilt only when its float weights changed (e.g. by QAT)."""
        key = _weights_key(network)
        if self._baseline is None or self._baseline[0] != key:
            self._baseline = None
            # outside inference mode: the copy's parameters stay ordinary tensors; no_grad for calibration.
            with torch.inference_mode(False), torch.no_grad():
                batches = calibration_batches(trainer.datamodule, device, self.baseline_calibration_images)
                baseline = build_baseline(network, batches, self.baseline_adc_bits)
            state = trainer.strategy.broadcast(baseline.state_dict(), src=0)  # bit-identical on every process
            baseline.load_state_dict(state)
            self._baseline = (key, baseline)
        return self._baseline[1]

    def _begin(self, stage: str, trainer: Trainer, pl_module: LightningModule) -> None:
        network = _network(pl_module)
        layers = [layer for _, layer in cim_layers(network)]
        if not layers:
            if not self._warned_no_cim:
                rank_zero_warn("HardwareReport: the model has no CIM layer (set model.cim); nothing to report")
                self._warned_no_cim = True
            return
        device = pl_module.device
        table = self.table.for_device(getattr(pl_module, "device_spec", None))  # cell reads scale with G
        metric = HardwareCostMetric(describe_layers(network), table).to(device)
        run = _Evaluation(layers, metric)
        if self.baseline:
            run.baseline = self._baseline_for(network, trainer, device)
            baseline = run.baseline
            run.baseline_layers = [layer for _, layer in cim_layers(baseline)]
            run.baseline_metric = HardwareCostMetric(describe_layers(baseline), table).to(device)
            set_collect_stats(baseline, True, reset=True)
        set_collect_stats(network, True, reset=True)
        self._runs[stage] = run

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.log_validation and not trainer.sanity_checking:
            self._begin("val", trainer, pl_module)

    @override
    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._begin("test", trainer, pl_module)

    # ------------------------------------------------------------------ per batch
    def _step(self, stage: str, batch) -> None:
        run = self._runs.get(stage)
        if run is None:
            return
        run.metric.update(take_counts(run.layers, run.metric.counts.device))
        if run.baseline is not None and (self.baseline_batches is None or run.batches < self.baseline_batches):
            images = batch_images(batch).to(run.metric.counts.device)
            with torch.no_grad():
                run.baseline(images)
            run.baseline_metric.update(take_counts(run.baseline_layers, run.metric.counts.device))
        run.batches += 1

    @override
    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._step("val", batch)

    @override
    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._step("test", batch)

    # ------------------------------------------------------------------ epoch end: compute (all ranks) and log
    def _log(self, stage: str, pl_module: LightningModule) -> None:
        run = self._runs.get(stage)
        if run is None or run.batches == 0:
            return
        run.cost = run.metric.compute()
        values = {
            "energy_per_image_uj": run.cost.energy_per_image_uj,
            "tops_per_w": run.cost.tops_per_w,
            "bit_density": run.cost.bit_density,
            "adc_energy_share": run.cost.share("adc"),
            "latency_us_per_image": run.cost.latency_us_per_image,
        }
        if run.baseline_metric is not None:
            run.baseline_cost = run.baseline_metric.compute()
            values.update(
                baseline_energy_per_image_uj=run.baseline_cost.energy_per_image_uj,
                baseline_bit_density=run.baseline_cost.bit_density,
                hw_efficiency_vs_baseline=hw_efficiency(run.baseline_cost, run.cost),
            )
        for name, value in values.items():
            if not math.isnan(value):
                pl_module.log(f"{stage}/{name}", float(value), on_step=False, on_epoch=True, sync_dist=False)

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log("val", pl_module)

    @override
    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log("test", pl_module)

    # ------------------------------------------------------------------ end: files, W&B, terminal (rank 0)
    def _output_dir(self, trainer: Trainer) -> Path:
        return run_output_dir(trainer, self.output_dir)

    def _publish(self, stage: str, trainer: Trainer, pl_module: LightningModule) -> None:
        run = self._runs.pop(stage, None)
        set_collect_stats(_network(pl_module), False, reset=True)
        if run is None or run.cost is None:
            return
        folder = self._output_dir(trainer)
        self.last_results[stage] = {"cost": run.cost, "baseline": run.baseline_cost, "folder": folder}
        if not trainer.is_global_zero:
            return
        accuracy = trainer.callback_metrics.get(f"{stage}/acc")
        accuracy = float(accuracy) if accuracy is not None else None
        run_name = next((str(logger.name) + "/" + str(logger.version) for logger in trainer.loggers), stage)
        rows = layer_rows(run.cost)
        layers_csv = write_csv_atomic(folder / report_file_name(stage, "layers.csv"), rows, LAYER_COLUMNS)
        summary = summary_row(run.cost, run.baseline_cost, run=run_name, stage=stage, accuracy=accuracy)
        summary_csv = write_csv_atomic(folder / report_file_name(stage, "summary.csv"), [summary], SUMMARY_COLUMNS)
        picture = (plot_energy_breakdown(run.cost, folder / report_file_name(stage, "energy.png")) if self.plots
                   else None)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                data = [[row[column] for column in LAYER_COLUMNS] for row in rows]
                logger.log_table(key=f"{stage}/hardware_layers", columns=list(LAYER_COLUMNS), data=data)
                if picture is not None:
                    logger.log_image(key=f"{stage}/energy_breakdown", images=[str(picture)])
        self.last_results[stage].update(layers_csv=layers_csv, summary_csv=summary_csv, picture=picture)
        if self.print_table:
            title = f"[cimq] hardware cost, {stage} ({run.cost.images} images)"
            text = format_table(run.cost, run.baseline_cost, title=title)
            uncosted = uncosted_layers(_network(pl_module))
            if uncosted:
                text += f"\nnot costed (left digital): {', '.join(uncosted)}"
            print(text, flush=True)

    def output_files(self) -> list[tuple[str, Path]]:
        """The files written (per stage), for the CLI's closing lines."""
        return [(f"hardware report ({stage})", ", ".join(str(result[key]) for key in ("layers_csv", "summary_csv", "picture")
                                                           if result.get(key) is not None))
                for stage, result in self.last_results.items() if "layers_csv" in result]

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._publish("val", trainer, pl_module)

    @override
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._publish("test", trainer, pl_module)
