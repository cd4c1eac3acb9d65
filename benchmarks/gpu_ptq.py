"""CIMQ PTQ of ResNet-20 with a larger reconstruction budget, on whatever device is there (a GPU if any).

Same objective and callbacks as configs/quant/cimq_ptq.yaml (W4A4, 128x128 arrays, bit-serial inputs), driven
through `CIMQTrainer` (Lightning's Trainer; no W&B, no CLI), so it runs where only torch/lightning/timm are installed:

    python benchmarks/gpu_ptq.py --data ../shared/data/cifar10_lossless --weights ../shared/weights/resnet20-12fca82f.th \
        --iters 2000 --rows cimq cimq_uniform_codes --adc-bits 4

Prints one line per row (test accuracy on the data's test split, fit seconds) and a markdown table.
"""

from __future__ import annotations

import argparse
import time

import torch
from lightning.pytorch import seed_everything

from cimq_pl.callbacks import ArraywiseWeights, BitSparseActivations, PartialSumClipping, PostTrainingQuantization, QuantDropping
from cimq_pl.datamodules import CIFAR10DataModule
from cimq_pl.module import CIMQModule
from cimq_pl.objectives import BlockReconstruction
from cimq_pl.quant import CIMSpec
from cimq_pl.trainer import CIMQTrainer

ROWS = {"cimq": 2, "cimq_uniform_codes": None}  # max_ones of the input code set


def run(row: str, adc_bits: int, iters: int, data: str, weights: str, accelerator: str = "auto",
        calibration_size: int = 1024, num_workers: int = 4, simulation: str = "eager", lr_scale: float = 1.0,
        test_images: int | None = None) -> dict:
    """Fit (PTQ) and test one row on ``accelerator``; returns accuracy, fit seconds and the device.
    ``lr_scale`` multiplies the three reconstruction learning rates (AdaRound logits, input steps, ADC clips);
    ``test_images`` (even, >= 2) tests on the first that many test images instead of all 1,000."""
    if test_images is not None and (test_images < 2 or test_images % 2):
        raise ValueError(f"test_images={test_images} is invalid: expected an even number >= 2 (two test batches)")
    seed_everything(0)
    lrs = BlockReconstruction.scaled_learning_rates(lr_scale)
    module = CIMQModule("cifar_resnet20", 10, weights, cim=CIMSpec(adc_bits=adc_bits), simulation=simulation,
                        objective=BlockReconstruction(iters_per_block=iters, batch_size=32, **lrs))
    datamodule = CIFAR10DataModule(root=data, num_workers=num_workers, eval_batch_size=(test_images or 1000) // 2,
                                   calibration_size=calibration_size)
    callbacks = [BitSparseActivations(max_ones=ROWS[row]), ArraywiseWeights(), PartialSumClipping(),
                 QuantDropping(0.5, ("block_input", "activations")),
                 PostTrainingQuantization()]
    trainer = CIMQTrainer(accelerator=accelerator, devices=1, max_epochs=1, logger=False, enable_progress_bar=False,
                          enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, limit_test_batches=2,
                          callbacks=callbacks,
                          default_root_dir="/tmp/cimq-gpu-ptq")
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    fit_seconds = time.perf_counter() - start
    accuracy = trainer.test(module, datamodule=datamodule, verbose=False)[0]["test/acc"]
    root = trainer.strategy.root_device
    device = torch.cuda.get_device_name(root) if root.type == "cuda" else "cpu"
    return {"row": row, "adc_bits": adc_bits, "iters_per_block": iters, "lr_scale": lr_scale,
            "simulation": simulation, "test/acc": round(accuracy, 4), "fit_seconds": round(fit_seconds, 1),
            "device": device}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--iters", type=int, default=2000)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--adc-bits", nargs="+", type=int, default=[4])
    parser.add_argument("--simulation", default="eager", choices=["eager", "compiled"], help="CIM layer path")
    parser.add_argument("--lr-scales", nargs="+", type=float, default=[1.0],
                        help="multipliers of the three reconstruction learning rates, one row each")
    args = parser.parse_args()
    results = []
    for row in args.rows:
        for adc_bits in args.adc_bits:
            for lr_scale in args.lr_scales:
                results.append(run(row, adc_bits, args.iters, args.data, args.weights, simulation=args.simulation,
                                   lr_scale=lr_scale))
                print(f"[gpu_ptq] {results[-1]}", flush=True)
    print("\n| row | ADC bits | steps/unit | LR x | path | test/acc | fit s | device |\n|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['row']} | {r['adc_bits']} | {r['iters_per_block']} | {r['lr_scale']} | {r['simulation']} "
              f"| {r['test/acc']} | {r['fit_seconds']} | {r['device']} |")


if __name__ == "__main__":
    main()
