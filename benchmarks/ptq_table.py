"""Accuracy (and hardware cost) of quantization settings on a CIFAR ResNet, through the same CLI users run.

Each row is `python -m cimq_pl fit --config <model> --config <technique>` followed by
`python -m cimq_pl test ... --ckpt_path <ptq.ckpt>` (run in-process), at every ADC resolution asked for.
Prints a markdown table and writes a CSV.

    python benchmarks/ptq_table.py --rows fp conventional cimq --adc-bits 8 4 3 --out benchmarks/results/resnet20_ptq.csv

Rows: fp (no quantization), conventional, cimq (all four techniques, CPU preset), and the ablations
arraywise, bit_sparse, psum_clipping, qdrop, brecq (configs/quant/ablation/). Extra CLI flags after `--`
are passed to every run (e.g. `-- --trainer.callbacks.init_args.iters_per_block 50`).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROWS = {
    "fp": None,
    "conventional": "configs/quant/conventional.yaml",
    "cimq": "configs/quant/cimq_ptq.yaml",
    "arraywise": "configs/quant/ablation/arraywise.yaml",
    "bit_sparse": "configs/quant/ablation/bit_sparse.yaml",
    "psum_clipping": "configs/quant/ablation/psum_clipping.yaml",
    "qdrop": "configs/quant/ablation/qdrop.yaml",
    "brecq": "configs/quant/ablation/brecq.yaml",
    "cimq_uniform_codes": "configs/quant/ablation/cimq_uniform_codes.yaml",
}
METRICS = (
    "test/acc",
    "test/bit_density",
    "test/energy_per_image_uj",
    "test/tops_per_w",
    "test/adc_energy_share",
    "test/hw_efficiency_vs_baseline",
)


def _run_cli(args: list[str]):
    import wandb

    from cimq_pl.cli import CIMQCLI

    wandb.finish()
    return CIMQCLI(args=args)


def run_row(row: str, adc_bits: int | None, model_config: str, data_root: str | None, extra: list[str], save_dir: str) -> dict:
    """Fit (PTQ) and test one setting; returns its measured numbers."""
    base = ["--config", model_config]
    if ROWS[row] is not None:
        base += ["--config", ROWS[row]]
    if adc_bits is not None and ROWS[row] is not None:
        base += ["--model.cim.adc_bits", str(adc_bits)]
    if data_root:
        base += ["--data.root", data_root]
    common = ["--trainer.logger.init_args.save_dir", save_dir, "--trainer.enable_progress_bar", "false", *extra]
    result = {"row": row, "adc_bits": adc_bits if ROWS[row] else "", "fit_seconds": 0.0}
    ckpt = []
    if ROWS[row] is not None:
        start = time.perf_counter()
        fit = _run_cli(["fit", *base, *common])
        result["fit_seconds"] = round(time.perf_counter() - start, 1)
        ptq = next(cb for cb in fit.trainer.callbacks if type(cb).__name__ == "PostTrainingQuantization")
        ckpt = ["--ckpt_path", str(ptq.checkpoint_path)]
    test = _run_cli(["test", *base, *common, *ckpt])
    for name in METRICS:
        value = test.trainer.callback_metrics.get(name)
        result[name] = round(float(value), 4) if value is not None else ""
    return result


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", nargs="+", default=["fp", "conventional", "cimq"], choices=list(ROWS))
    parser.add_argument("--adc-bits", nargs="+", type=int, default=[4])
    parser.add_argument("--model-config", default="configs/resnet20_cifar10.yaml")
    parser.add_argument("--data-root", default=None, help="override data.root of the model config")
    parser.add_argument("--out", default=None, help="CSV file to write")
    args = parser.parse_args(argv)
    os.chdir(REPO)
    os.environ.setdefault("WANDB_MODE", "offline")
    results = []
    with tempfile.TemporaryDirectory(prefix="cimq-bench-") as save_dir:
        for row in args.rows:
            for adc_bits in ([None] if ROWS[row] is None else args.adc_bits):
                results.append(run_row(row, adc_bits, args.model_config, args.data_root, extra, save_dir))
                print(f"[bench] {results[-1]}", flush=True)
    columns = ["row", "adc_bits", *METRICS, "fit_seconds"]
    print("\n| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for result in results:
        print("| " + " | ".join(str(result.get(c, "")) for c in columns) + " |")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_suffix(".partial")
        with open(partial, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(results)
        os.replace(partial, out)


if __name__ == "__main__":
    main()
