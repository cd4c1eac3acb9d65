"""Callback: Monte Carlo evaluation of a quantized network over fabricated chips of ``model.device``.

One chip is one draw of every cell's programming error, stuck-at fault and drift exponent and every ADC's
offset and gain (`cimq_pl.quant.DeviceSpec`). After the ordinary ``test`` (chip ``device.seed``), this callback
evaluates the test set again on ``samples`` chips, seeds ``seed, seed + 1, ...`` (``--model.device.seed S``
then tests sample S alone, with the same accuracy), each read at every time of ``times`` (seconds after
programming, e.g. ``[1, 3600, 86400, 31536000]``: 1 s, 1 h, 1 day, 1 year). It reports, per time, the mean and
standard deviation (sample, ddof = 1) of the top-1 accuracy over the chips:

* logged as ``test/mc/<time>/acc_mean`` and ``test/mc/<time>/acc_std`` (``<time>`` like ``1s``, ``1h``, ``1d``,
  ``1y`` or ``90s``), so ``test`` prints them with its metrics and W&B keeps them;
* every sample as a row of the W&B Table ``test/mc_samples`` (when the logger is a `WandbLogger`);
* ``monte_carlo_test.csv`` (one row per chip and time) and ``monte_carlo_test_summary.csv`` (one row per time),
  written atomically into ``output_dir`` (default: the W&B run's files folder, else the trainer's log dir);
* a table on the terminal (rank 0) and a progress bar over chips x times x batches.

Per-conversion noise (read and ADC noise) is seeded per (chip, time), so an evaluation is repeatable. Under
DDP every process evaluates its shard of the test set and the counts are summed.

With ``calibration_images`` N > 0 every chip is calibrated after programming, at each read time, before it is
tested (`cimq_pl.quant.fit_chip_calibration`): a digital gain and offset per output channel of every CIM layer,
fitted on the first N images of the calibration subset (train split) so that each channel's mean and standard
deviation on the chip match the ideal network's. Every process fits on the same images and draws, so the
corrections agree under DDP.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from typing_extensions import override

from cimq_pl.callbacks.calibration import calibration_batches
from cimq_pl.callbacks.hardware_report import run_output_dir
from cimq_pl.callbacks.technique import require_cim
from cimq_pl.cost.tables import write_csv_atomic
from cimq_pl.errors import ConfigError
from cimq_pl.quant import DeviceSpec, channel_affine, device_mode, fit_chip_calibration, output_statistics
from cimq_pl.seeding import derive_seed

__all__ = ["MonteCarloDevices", "time_label"]

_UNITS = (("y", 365 * 86400), ("d", 86400), ("h", 3600), ("min", 60), ("s", 1))
DEVICE_COLUMNS = tuple(name for name in DeviceSpec.__dataclass_fields__ if name not in ("seed", "read_time"))
SAMPLE_COLUMNS = ("sample", "chip_seed", "time_s", "time", "acc", "correct", "images", "calibration_images",
                  *DEVICE_COLUMNS)
SUMMARY_COLUMNS = ("time_s", "time", "samples", "acc_mean", "acc_std", "acc_min", "acc_max", "nominal_acc",
                   "images", "first_seed", "calibration_images", *DEVICE_COLUMNS)


def time_label(seconds: float) -> str:
    """A short label of a time after programming: ``1s``, ``1h``, ``1d``, ``1y``, ``90s``, ``0s``."""
    for unit, size in _UNITS:
        if seconds >= size and float(seconds / size).is_integer():
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


class MonteCarloDevices(Callback):
    """Test on ``samples`` chips of ``model.device`` at each of ``times``: mean and std of the accuracy.

    Args:
        samples: chips to draw (>= 1).
        times: seconds after programming to read each chip at (each >= 0); None = ``[model.device.read_time]``.
        seed: the first chip's seed; chip i has seed ``seed + i``. None = ``model.device.seed``.
        output_dir: folder of the CSV files; None = the W&B run's files folder, else the trainer's log dir.
        calibration_images: calibrate every chip on this many calibration images (train split) before testing
            it: a digital gain and offset per output channel of every CIM layer (`fit_chip_calibration`); 0 = off.

    Attributes:
        rows: after a test, one dict per (chip, time) (the CSV's rows).
        summary: after a test, one dict per time (mean, std, min, max over the chips).

    Raises:
        ConfigError: on a bad argument (named, with what is allowed), or at setup when the model has no
            ``model.device``.
    """

    def __init__(self, samples: int = 10, times: Optional[list[float]] = None, seed: Optional[int] = None,
                 output_dir: Optional[str] = None, calibration_images: int = 0):
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ConfigError(f"MonteCarloDevices.samples={samples!r} is invalid: expected an integer >= 1")
        if times is not None:
            if not isinstance(times, (list, tuple)) or not times:
                raise ConfigError(f"MonteCarloDevices.times={times!r} is invalid: expected a non-empty list of seconds "
                                  "after programming, or null")
            for value in times:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                    raise ConfigError(f"MonteCarloDevices.times={list(times)!r} is invalid: {value!r} is not a time in "
                                      "seconds >= 0")
            times = [float(value) for value in times]
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ConfigError(f"MonteCarloDevices.seed={seed!r} is invalid: expected an integer >= 0 or null")
        if output_dir is not None and (not isinstance(output_dir, str) or not output_dir):
            raise ConfigError(f"MonteCarloDevices.output_dir={output_dir!r} is invalid: expected a folder path or null")
        if isinstance(calibration_images, bool) or not isinstance(calibration_images, int) or calibration_images < 0:
            raise ConfigError(f"MonteCarloDevices.calibration_images={calibration_images!r} is invalid: expected an "
                              "integer >= 0 (0: chips are not calibrated)")
        self.samples, self.times, self.seed, self.output_dir = samples, times, seed, output_dir
        self.calibration_images = calibration_images
        self.rows: list[dict] = []
        self.summary: list[dict] = []
        self.files: list[Path] = []

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        require_cim(pl_module, type(self).__name__)
        if getattr(pl_module, "device_spec", None) is None:
            raise ConfigError("MonteCarloDevices needs the device to sample chips of: set model.device, e.g. "
                              "--model.device.programming_sigma 0.05")

    # ------------------------------------------------------------------ evaluation
    def _loader(self, trainer: Trainer):
        loaders = trainer.test_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        limit = trainer.num_test_batches[0] if trainer.num_test_batches else math.inf
        return loader, (len(loader) if math.isinf(limit) else int(limit))

    @torch.no_grad()
    def _calibration_target(self, trainer: Trainer, pl_module: LightningModule) -> tuple[list, dict]:
        """The chip-calibration images and the ideal network's per-channel output statistics on them (none when
        ``calibration_images`` is 0)."""
        if not self.calibration_images:
            return [], {}
        batches = calibration_batches(trainer.datamodule, pl_module.device, self.calibration_images)
        with device_mode(pl_module.model, "ideal"):
            return batches, output_statistics(pl_module.model, batches)

    @torch.no_grad()
    def _accuracy(self, trainer, pl_module, loader, batches: int, progress) -> tuple[int, int]:
        """(correct, images) over this process's first ``batches`` test batches, summed over processes."""
        device = pl_module.device
        correct = torch.zeros((), dtype=torch.long, device=device)
        total = torch.zeros((), dtype=torch.long, device=device)
        for index, (images, labels) in enumerate(loader):
            if index >= batches:
                break
            logits = pl_module(images.to(device))
            correct += (logits.argmax(1) == labels.to(device)).sum()
            total += labels.numel()
            if progress is not None:
                progress.update(1)
        counts = trainer.strategy.reduce(torch.stack([correct, total]), reduce_op="sum")
        return int(counts[0]), int(counts[1])

    @override
    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        spec: DeviceSpec = pl_module.device_spec
        times = self.times or [spec.read_time]
        first = spec.seed if self.seed is None else self.seed
        loader, batches = self._loader(trainer)
        progress = None
        if trainer.is_global_zero and trainer.progress_bar_callback is not None:
            from tqdm.auto import tqdm

            progress = tqdm(total=self.samples * len(times) * batches, desc=f"Monte Carlo: {self.samples} chips",
                            unit="batch", dynamic_ncols=True)
        device = pl_module.device
        calibration, target = self._calibration_target(trainer, pl_module)
        self.rows = []
        try:
            for sample in range(self.samples):
                chip = first + sample
                for time in times:
                    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                            device_mode(pl_module.model, "chip", seed=chip, time=time):
                        torch.manual_seed(derive_seed(chip, round(time * 1000)))  # per-conversion noise
                        corrections = fit_chip_calibration(pl_module.model, calibration, target) if calibration else {}
                        with channel_affine(pl_module.model, corrections):
                            correct, images = self._accuracy(trainer, pl_module, loader, batches, progress)
                    self.rows.append({"sample": sample, "chip_seed": chip, "time_s": time, "time": time_label(time),
                                      "acc": correct / max(images, 1), "correct": correct, "images": images,
                                      "calibration_images": self.calibration_images,
                                      **{name: getattr(spec, name) for name in DEVICE_COLUMNS}})
        finally:
            if progress is not None:
                progress.close()
        nominal = trainer.callback_metrics.get("test/acc")
        self.summary = []
        for time in times:
            accuracies = [row["acc"] for row in self.rows if row["time_s"] == time]
            row = {"time_s": time, "time": time_label(time), "samples": len(accuracies),
                   "acc_mean": statistics.fmean(accuracies),
                   "acc_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
                   "acc_min": min(accuracies), "acc_max": max(accuracies),
                   "nominal_acc": float(nominal) if nominal is not None else None,
                   "images": self.rows[0]["images"], "first_seed": first,
                   "calibration_images": self.calibration_images,
                   **{name: getattr(spec, name) for name in DEVICE_COLUMNS}}
            self.summary.append(row)
            for stat in ("acc_mean", "acc_std"):
                pl_module.log(f"test/mc/{row['time']}/{stat}", row[stat], on_step=False, on_epoch=True,
                              sync_dist=False)
        self._publish(trainer, spec)

    # ------------------------------------------------------------------ outputs (rank 0)
    def _publish(self, trainer: Trainer, spec: DeviceSpec) -> None:
        folder = run_output_dir(trainer, self.output_dir)  # collective
        if not trainer.is_global_zero:
            return
        self.files = [write_csv_atomic(folder / "monte_carlo_test.csv", self.rows, SAMPLE_COLUMNS),
                      write_csv_atomic(folder / "monte_carlo_test_summary.csv", self.summary, SUMMARY_COLUMNS)]
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                columns = list(SAMPLE_COLUMNS[:7])
                logger.log_table(key="test/mc_samples", columns=columns,
                                 data=[[row[column] for column in columns] for row in self.rows])
        lines = [f"[cimq] Monte Carlo over {self.samples} chips (seeds {self.summary[0]['first_seed']}.."
                 f"{self.summary[0]['first_seed'] + self.samples - 1}), {self.summary[0]['images']} test images; "
                 f"{spec.describe()}",
                 f"{'time':>8} {'acc mean':>9} {'acc std':>8} {'min':>7} {'max':>7}"]
        for row in self.summary:
            lines.append(f"{row['time']:>8} {row['acc_mean']:9.4f} {row['acc_std']:8.4f} {row['acc_min']:7.4f} "
                         f"{row['acc_max']:7.4f}")
        print("\n".join(lines), flush=True)

    def output_files(self) -> list[tuple[str, Path]]:
        """The files written, for the CLI's closing lines."""
        return [("Monte Carlo (test)", ", ".join(str(path) for path in self.files))] if self.files else []
