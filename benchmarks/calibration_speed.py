"""Calibration time of whole networks with the MSE clip search in blocks of items, against one pass per candidate.

`cimq_pl.quant.observers.mse_clip` tries 80 clip candidates on every observer's samples (up to 4,096 per item:
a weight's column, an ADC column). It used to make one pass per candidate over all items (``block_elements=None``);
it now tries every candidate on one cache-sized block of items before the next (the default): the same
operations on each item, so the same clips bit for bit, which this script checks on every network before it
prints the times. For each network (ResNet-20 on CIFAR-sized inputs, timm ResNet-18 on 224x224 inputs; random
weights and seeded random images: time does not depend on them), `calibrate_` on the CIMQ default quantizers
(every conv and linear on 128x128 arrays, W4A4, ADC 4, MSE observers), each way in turn, best of ``--repeats``:

    python benchmarks/calibration_speed.py [--models resnet20 resnet18] [--repeats 3] [--threads 2]
    python benchmarks/calibration_speed.py --smoke       # ResNet-20 on 4 images, one repeat
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from functools import partial
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runner import machine, markdown_table  # noqa: E402

# name -> (model name, classes, image size, calibration images)
NETWORKS = {"resnet20": ("cifar_resnet20", 10, 32, 64), "resnet18": ("resnet18", 1000, 224, 2)}
COLUMNS = ("model", "images", "one_pass_s", "block_elements", "blocked_s", "speedup", "same_clips")
HEADERS = ("model", "calibration images", "one pass per candidate, s", "samples per block", "blocks of items, s",
           "speedup", "same clips bit for bit")


def _calibrated(model, images, block_elements):
    """A calibrated CIM copy of ``model`` with the MSE search's ``block_elements``, and the seconds it took."""
    from cimq_pl.quant import CIMSpec, observers
    from cimq_pl.quant.convert import calibrate_, convert_to_cim, fold_batchnorm_

    converted = copy.deepcopy(model).eval()
    fold_batchnorm_(converted)
    convert_to_cim(converted, CIMSpec(rows=128, cols=128, weight_bits=4, input_bits=4, dac_bits=1, adc_bits=4))
    search, observers.mse_clip = observers.mse_clip, partial(observers.mse_clip, block_elements=block_elements)
    try:
        torch.manual_seed(0)  # the observers' subsampling draws
        start = time.perf_counter()
        calibrate_(converted, [images])
        return converted, time.perf_counter() - start
    finally:
        observers.mse_clip = search


def measure(name: str, images: int, repeats: int, block_elements: Optional[int] = None) -> dict:
    import timm

    from cimq_pl.quant.observers import _MSE_BLOCK_ELEMENTS

    model_name, classes, size, _ = NETWORKS[name]
    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False, num_classes=classes).eval()
    batch = torch.randn(images, 3, size, size)
    block = block_elements or _MSE_BLOCK_ELEMENTS
    times = {None: [], block: []}
    states = {}
    for _ in range(repeats):
        for block_elements in times:  # interleaved, so that a busy machine slows both alike
            converted, seconds = _calibrated(model, batch, block_elements)
            times[block_elements].append(seconds)
            states[block_elements] = converted.state_dict()
    one_pass, blocked = states.values()
    same = one_pass.keys() == blocked.keys() and all(
        torch.equal(one_pass[k], blocked[k]) if torch.is_tensor(one_pass[k]) else one_pass[k] == blocked[k]
        for k in one_pass)  # tensors bit for bit; extra states (quantizer settings) equal
    best = {key: min(values) for key, values in times.items()}
    return {"model": name, "images": images, "one_pass_s": round(best[None], 2),
            "block_elements": block, "blocked_s": round(best[block], 2), "speedup": round(best[None] / best[block], 2),
            "same_clips": "yes" if same else "**no**"}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    parser.add_argument("--repeats", type=int, default=3, help="calibrations each way (the best is shown)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--block-elements", type=int, nargs="+", default=[None],
                        help="samples per block of the blocked search (default: mse_clip's own)")
    parser.add_argument("--smoke", action="store_true", help="ResNet-20 on 4 images, one repeat")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    plan = [("resnet20", 4)] if args.smoke else [(name, NETWORKS[name][3]) for name in args.models]
    rows = [measure(name, images, 1 if args.smoke else args.repeats, block)
            for name, images in plan for block in args.block_elements]
    print(f"\n# Calibration with MSE observers: {machine()}\n")
    print(markdown_table(rows, COLUMNS, HEADERS))
    if any(row["same_clips"] != "yes" for row in rows):
        raise SystemExit("the blocked MSE search gave other clips than one pass per candidate")
    return rows


if __name__ == "__main__":
    main()
