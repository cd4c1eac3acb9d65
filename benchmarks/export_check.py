"""Export check: ResNet-20 after the full CIMQ PTQ, exported, run by the integer executor on all test images.

Fits ``configs/quant/cimq_ptq.yaml`` on ``configs/resnet20_cifar10.yaml`` (all four techniques, W4A4,
128x128 arrays, 4-bit ADC) with ``--iters`` reconstruction steps per unit, then runs what a user runs:
``export --ckpt_path ptq.ckpt`` (which tests the fake-quant model), the executor against the fake-quant model
image by image on the 1,000 ``cifar10_lossless`` test images, and ``test --model.export`` (the round trip).
Prints a table and writes ``export_check.csv``.

    python benchmarks/export_check.py            # ~7 min on 2 cores (100 steps per unit, as the suite)
    python benchmarks/export_check.py --smoke
"""

from __future__ import annotations

import time
from itertools import islice
from pathlib import Path
from typing import Optional

from runner import LOSSLESS, MODEL_CONFIGS, base_parser, cli, machine, markdown_table, prepare

COLUMNS = ("model", "ptq_steps_per_unit", "images", "fake_quant_acc", "export_test_acc", "same_predictions",
           "max_relative_logit_error", "max_absolute_logit_error", "tensor_bytes", "manifest_bytes",
           "fake_quant_seconds", "executor_seconds", "executor_vs_fake_quant_time")


def run(iters: int, work_dir: Path, extra: list[str]) -> dict:
    from cimq_pl.callbacks import PostTrainingQuantization
    from cimq_pl.export import IntegerExecutor, compare_with_model

    common = ["--config", MODEL_CONFIGS["resnet20"], "--data.init_args.root", str(LOSSLESS),
              "--trainer.logger.init_args.save_dir", str(work_dir), "--trainer.enable_progress_bar", "false", *extra]
    quantized = [*common, "--config", "configs/quant/cimq_ptq.yaml",
                 "--model.objective.init_args.iters_per_block", str(iters)]
    built = cli(quantized)
    built.trainer.fit(built.model, datamodule=built.datamodule)
    ckpt = next(cb for cb in built.trainer.callbacks if isinstance(cb, PostTrainingQuantization)).checkpoint_path

    export_dir = work_dir / f"export_resnet20_cimq_{iters}"
    exporter = cli(quantized)
    exporter.trainer.export(exporter.model, datamodule=exporter.datamodule, ckpt_path=str(ckpt),
                            dirpath=str(export_dir), overwrite=True)
    fake_acc = float(exporter.trainer.callback_metrics["test/acc"])
    tested_batches = islice(exporter.datamodule.test_dataloader(), int(exporter.trainer.num_test_batches[0]))
    agreement = compare_with_model(exporter.model.model, IntegerExecutor(export_dir), tested_batches)

    reloaded = cli([*common, "--model.export", str(export_dir)])
    reloaded.trainer.test(reloaded.model, datamodule=reloaded.datamodule, verbose=False)
    return {
        "model": "resnet20", "ptq_steps_per_unit": iters, "images": agreement.images,
        "fake_quant_acc": round(fake_acc, 4),
        "export_test_acc": round(float(reloaded.trainer.callback_metrics["test/acc"]), 4),
        "same_predictions": agreement.same_predictions,
        "max_relative_logit_error": f"{agreement.max_relative_logit_error:.2e}",
        "max_absolute_logit_error": f"{agreement.max_absolute_logit_error:.2e}",
        "tensor_bytes": (export_dir / "model.safetensors").stat().st_size,
        "manifest_bytes": (export_dir / "manifest.json").stat().st_size,
        "fake_quant_seconds": round(agreement.model_seconds, 1),
        "executor_seconds": round(agreement.executor_seconds, 1),
        "executor_vs_fake_quant_time": round(agreement.executor_seconds / agreement.model_seconds, 2),
    }


def main(argv: Optional[list[str]] = None) -> dict:
    from cimq_pl.cost.tables import write_csv_atomic

    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=100, help="reconstruction steps per unit (the suite's 100)")
    args = parser.parse_args(argv)
    extra = prepare(args)
    start = time.perf_counter()
    row = run(1 if args.smoke else args.iters, args.work_dir, extra)
    print(f"\n{machine()}; {time.perf_counter() - start:.0f} s in all\n")
    print(markdown_table([row], COLUMNS))
    path = write_csv_atomic(args.out_dir / "export_check.csv", [row], COLUMNS)
    print(f"\nwrote {path}")
    return row


if __name__ == "__main__":
    main()
