"""Wall time of PTQ and QAT per model on this machine.

* QAT: ``configs/quant/cimq_qat.yaml`` on each model config, through the CLI (`runner.measure` with
  ``--trainer.limit_train_batches``), timing every training step after the first (batch 128, CIM
  simulation forward + backward + optimizer); an epoch of the 4,000 ``cifar10_lossless`` train images and of
  the full 50,000-image CIFAR-10 train set follow from the step time.
* PTQ: the fit time of the CIMQ rows of ``ablation.csv`` (written by ``ablation.py``: calibration on 1,024
  images + reconstruction of every unit, W4A4, ADC 4), when present.
* PTQ step rate (``--ptq-steps N``): the preset ``configs/quant/cimq_ptq.yaml`` with N steps per unit on each
  ``--simulations`` path (eager, compiled), through the CLI: reconstruction steps per second, timing every
  step but the first two of each unit (the block's input capture and, compiled, its compilation), and the
  fit's wall time (compilation included).

Writes ``training_time.csv``.

    python benchmarks/training_time.py           # ~4 min on 2 cores
    python benchmarks/training_time.py --smoke
"""

from __future__ import annotations

import csv
import math
import time
from typing import Optional

from lightning.pytorch import Callback

from runner import Setting, base_parser, markdown_table, measure, prepare

COLUMNS = ("model", "method", "budget", "seconds", "seconds_per_step", "epoch_4k_seconds", "epoch_50k_seconds")


class StepTimer(Callback):
    """Seconds per training step, from the end of the first step (warm-up) to the end of the last."""

    def __init__(self):
        self.steps, self.start, self.end = 0, None, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self.start is None:
            self.start = now
        else:
            self.steps += 1
            self.end = now

    @property
    def seconds_per_step(self) -> float:
        return (self.end - self.start) / self.steps if self.steps else float("nan")


def qat_row(model: str, steps: int, work_dir, extra, batch: int = 128) -> dict:
    """QAT's step time at ``batch`` images a step (the config's 128; the smoke run's 16), and the epochs it gives."""
    timer = StepTimer()
    row = measure(Setting(model, "cimq_qat"), work_dir,
                  extra_args=[*extra, "--trainer.limit_train_batches", str(steps + 1),
                              "--trainer.limit_val_batches", "0", "--data.init_args.batch_size", str(batch)],
                  callbacks=[timer], test=False)
    per_step = round(timer.seconds_per_step, 3)  # the epochs follow from the step time the table shows
    return {"model": model, "method": f"QAT (cimq_qat.yaml, batch {batch})", "budget": f"{timer.steps + 1} steps",
            "seconds": row["fit_seconds"], "seconds_per_step": per_step,
            "epoch_4k_seconds": round(per_step * math.ceil(4000 / batch)),
            "epoch_50k_seconds": round(per_step * math.ceil(50000 / batch))}


class UnitStepTimer(Callback):
    """Seconds of the PTQ training steps past the first ``skip`` of each unit of ``steps_per_unit``."""

    def __init__(self, steps_per_unit: int, skip: int = 2):
        self.steps_per_unit, self.skip, self.steps, self.seconds, self._start = steps_per_unit, skip, 0, 0.0, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter() if batch_idx % self.steps_per_unit >= self.skip else None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._start is not None:
            self.steps += 1
            self.seconds += time.perf_counter() - self._start

    @property
    def steps_per_second(self) -> float:
        return self.steps / self.seconds if self.seconds else float("nan")


def ptq_step_row(model: str, simulation: str, steps: int, work_dir, extra) -> dict:
    timer = UnitStepTimer(steps)
    row = measure(Setting(model, "cimq", iters=steps), work_dir,
                  extra_args=[*extra, "--model.simulation", simulation], callbacks=[timer], test=False)
    return {"model": model, "method": f"PTQ step rate (cimq_ptq.yaml, simulation {simulation})",
            "budget": f"{steps} steps x 32 images per unit", "seconds": row["fit_seconds"],
            "seconds_per_step": round(1 / timer.steps_per_second, 4)}


def ptq_rows(ablation_csv) -> list[dict]:
    if not ablation_csv.is_file():
        return []
    with open(ablation_csv, newline="") as stream:
        rows = [r for r in csv.DictReader(stream) if r["row"] == "cimq" and r["adc_bits"] == "4"
                and r["weight_bits"] == "4"]
    return [{"model": r["model"], "method": "PTQ (cimq_ptq.yaml, calibration 1,024 + reconstruction)",
             "budget": f"{r['iters']} steps x 32 images per unit", "seconds": r["fit_seconds"]} for r in rows]


def tables(rows: list[dict]) -> str:
    headers = ["model", "method", "budget", "wall s", "s/step", "epoch of 4k images, s", "epoch of 50k images, s"]
    return markdown_table(rows, COLUMNS, headers)


def main(argv: Optional[list[str]] = None) -> list[dict]:
    from cimq_pl.cost.tables import write_csv_atomic

    parser = base_parser(__doc__.split("\n")[0], models=True)
    parser.add_argument("--steps", type=int, default=10, help="timed QAT steps per model (0: no QAT rows)")
    parser.add_argument("--ptq-steps", type=int, default=0, help="PTQ steps per unit of the step-rate rows (0: none)")
    parser.add_argument("--simulations", default="eager,compiled", help="CIM layer paths of the step-rate rows")
    args = parser.parse_args(argv)
    extra = prepare(args)
    models = ["resnet20"] if args.smoke else args.models
    steps = 2 if args.smoke else args.steps
    rows = ptq_rows(args.out_dir / "ablation.csv")
    if steps:
        rows += [qat_row(model, steps, args.work_dir, extra, batch=16 if args.smoke else 128) for model in models]
    if args.ptq_steps:
        rows += [ptq_step_row(model, simulation, args.ptq_steps, args.work_dir, extra)
                 for model in models for simulation in args.simulations.split(",")]
    print("\n" + tables(rows))
    path = write_csv_atomic(args.out_dir / "training_time.csv", rows, COLUMNS)
    print(f"\nwrote {path}")
    return rows


if __name__ == "__main__":
    main()
