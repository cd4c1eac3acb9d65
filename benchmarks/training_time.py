"""Wall time of PTQ and QAT per model on this machine.

* QAT: ``configs/quant/cimq_qat.yaml`` on each model config, through the CLI (`runner.measure` with
  ``--trainer.limit_train_batches``), timing every training step after the first (batch 128, CIM
  simulation forward + backward + optimizer); an epoch of the 4,000 ``cifar10_lossless`` train images and of
  the full 50,000-image CIFAR-10 train set follow from the step time.
* PTQ: the fit time of the CIMQ rows of ``ablation.csv`` (written by ``ablation.py``: calibration on 1,024
  images + reconstruction of every unit, W4A4, ADC 4), when present.

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


def qat_row(model: str, steps: int, work_dir, extra) -> dict:
    timer = StepTimer()
    row = measure(Setting(model, "cimq_qat"), work_dir,
                  extra_args=[*extra, "--trainer.limit_train_batches", str(steps + 1),
                              "--trainer.limit_val_batches", "0"],
                  callbacks=[timer], test=False)
    per_step = timer.seconds_per_step
    return {"model": model, "method": "QAT (cimq_qat.yaml, batch 128)", "budget": f"{timer.steps + 1} steps",
            "seconds": row["fit_seconds"], "seconds_per_step": round(per_step, 3),
            "epoch_4k_seconds": round(per_step * math.ceil(4000 / 128)),
            "epoch_50k_seconds": round(per_step * math.ceil(50000 / 128))}


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
    parser.add_argument("--steps", type=int, default=10, help="timed QAT steps per model")
    args = parser.parse_args(argv)
    extra = prepare(args)
    models = ["resnet20"] if args.smoke else args.models
    steps = 2 if args.smoke else args.steps
    rows = ptq_rows(args.out_dir / "ablation.csv")
    rows += [qat_row(model, steps, args.work_dir, extra) for model in models]
    print("\n" + tables(rows))
    path = write_csv_atomic(args.out_dir / "training_time.csv", rows, COLUMNS)
    print(f"\nwrote {path}")
    return rows


if __name__ == "__main__":
    main()
