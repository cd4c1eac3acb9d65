"""GPU path check: CIM layer exactness on CUDA, layer speed and a short PTQ, each against the CPU.

Run on a machine with a GPU (it needs only torch, lightning, timm and this package: no W&B, no jsonargparse):

    python benchmarks/gpu_check.py --data ../shared/data/cifar10_lossless --weights ../shared/weights/resnet20-12fca82f.th

1. ``pytest tests/quant/test_cuda.py``: a quantized CIM layer gives the same integer partial sums, ADC codes
   and counters on CUDA as on the CPU, and its backward runs.
2. CIM layer forward time on every ResNet-20 conv shape, CPU and GPU (`cim_layer_speed.measure`).
3. A short CIMQ PTQ of ResNet-20 (``--iters`` steps per unit) on each device (`gpu_ptq.run`): fit time and
   test accuracy (close, not bit-identical: float reductions differ between devices).

Prints a table and writes ``gpu_check.csv``. ``--device cpu`` runs everything on the CPU twice (the test
suite's smoke check of the script on machines without a GPU).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import cim_layer_speed  # noqa: E402
import gpu_ptq  # noqa: E402
from runner import markdown_table  # noqa: E402

COLUMNS = ("check", "cpu", "device", "ratio cpu/device")


def main(argv=None) -> list[dict]:
    from cimq_pl.cost.tables import write_csv_atomic

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="cifar10_lossless folder")
    parser.add_argument("--weights", required=True, help="ResNet-20 weights file")
    parser.add_argument("--device", default="cuda", help="device to check against the CPU (default cuda)")
    parser.add_argument("--iters", type=int, default=50, help="PTQ steps per unit")
    parser.add_argument("--calibration-size", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=128, help="layer timing batch")
    parser.add_argument("--test-images", type=int, default=None,
                        help="test the PTQ on the first N test images (even; default: all 1,000)")
    parser.add_argument("--out-dir", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here: run this on a GPU machine (or --device cpu for a dry run)")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rows = []
    if device.type == "cuda":
        tests = subprocess.run([sys.executable, "-m", "pytest", "-q", str(HERE.parent / "tests/quant/test_cuda.py")],
                               capture_output=True, text=True)
        print(tests.stdout[-2000:])
        rows.append({"check": "CIM layer exactness on CUDA (tests/quant/test_cuda.py)", "cpu": "",
                     "device": "passed" if tests.returncode == 0 else "FAILED", "ratio cpu/device": ""})
    for shape in cim_layer_speed.RESNET20_CONV_SHAPES:
        cpu = cim_layer_speed.measure(shape, args.batch, torch.device("cpu"), repeats=3)["cim_fwd_ms"]
        other = cim_layer_speed.measure(shape, args.batch, device, repeats=10)["cim_fwd_ms"]
        rows.append({"check": f"CIM conv {shape[0]}->{shape[1]}, s{shape[2]}, {shape[3]}x{shape[3]}, fwd ms "
                              f"(batch {args.batch})", "cpu": round(cpu, 2), "device": round(other, 2),
                     "ratio cpu/device": round(cpu / other, 1)})
        print(rows[-1], flush=True)
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    results = {}
    for label, acc in (("cpu", "cpu"), ("device", accelerator)):
        results[label] = gpu_ptq.run("cimq", 4, args.iters, args.data, args.weights, accelerator=acc,
                                     calibration_size=args.calibration_size, num_workers=2,
                                     test_images=args.test_images)
        print(results[label], flush=True)
    rows.append({"check": f"PTQ fit seconds (CIMQ, {args.iters} steps/unit)", "cpu": results["cpu"]["fit_seconds"],
                 "device": results["device"]["fit_seconds"],
                 "ratio cpu/device": round(results["cpu"]["fit_seconds"] / results["device"]["fit_seconds"], 1)})
    rows.append({"check": "PTQ test/acc", "cpu": results["cpu"]["test/acc"], "device": results["device"]["test/acc"],
                 "ratio cpu/device": ""})
    print(f"\n# GPU check: {name}, torch {torch.__version__}\n")
    print(markdown_table(rows, COLUMNS))
    path = write_csv_atomic(args.out_dir / f"gpu_check_{device.type}.csv", rows, COLUMNS)
    print(f"\nwrote {path}")
    return rows


if __name__ == "__main__":
    main()
