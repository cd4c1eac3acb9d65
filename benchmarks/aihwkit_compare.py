"""Side by side with IBM's analog simulator aihwkit: whole-network evaluation speed on the same network and images.

IBM aihwkit (https://github.com/IBM/aihwkit) is an *optional* benchmark dependency, never needed by the
package or its tests: install it in a separate environment (its wheel pins its own torch)::

    python3 -m venv /work/aihwkit-venv
    /work/aihwkit-venv/bin/pip install aihwkit==1.1.0 timm     # 1.1.0: the Python 3.11 wheel
    PYTHONPATH=. /work/aihwkit-venv/bin/python benchmarks/aihwkit_compare.py [--threads 1] [--batch 128]

(``pip install aihwkit`` alone picks the 1.2.0 source release, whose build needs OpenBLAS.) Without aihwkit the
script exits with a message saying so.

The network is the CIFAR ResNet-20 of `cimq_pl.models` (random weights, BN folded into the convs; speed does
not depend on the weights) on random 32x32 images, in eval mode under ``torch.no_grad``; every conv and the
classifier are simulated. What each simulator computes per layer:

* cimq-pl (this project), W4, A4 bit-serial (4 input cycles of 1 bit), 4-bit ADC, 128x128 arrays: the
  integer partial sum of every array column in every input cycle (and weight slice), a 4-bit ADC conversion
  of each (clip, round, code), the shift-add over cycles, per-array digital weight scales, the sum over row
  blocks; ``eager`` and ``compiled`` (`cimq_pl.quant.fused`) paths.
* aihwkit 1.1, ``TorchInferenceRPUConfig`` (the pure-PyTorch tile), 128x128 tiles (``mapping.max_input_size``
  = ``max_output_size`` = 128): one analog matrix-vector pass per tile with a float input vector quantized to
  4 bits (``forward.inp_res = 1/(2^4 - 2)``), additive output noise (its default 0.06), output quantized to
  4 bits (``forward.out_res = 1/(2^4 - 2)``, bound 12), abs-max noise management, no bound management
  (``NONE``: one pass), weights with its default PCM-like programming noise model (applied once, not timed).

Columns: eval img/s (best of ``--repeats`` batches after warm-up), time per image relative to the float model
and to aihwkit. Writes ``aihwkit_compare_<device>.csv``.
"""

from __future__ import annotations

import argparse
import csv
import platform
import sys
import time
from pathlib import Path

MISSING = ("benchmarks/aihwkit_compare.py needs IBM aihwkit, an optional benchmark dependency that cimq-pl never "
           "installs: python3 -m venv /work/aihwkit-venv && /work/aihwkit-venv/bin/pip install aihwkit==1.1.0 timm, "
           "then run PYTHONPATH=. /work/aihwkit-venv/bin/python benchmarks/aihwkit_compare.py")
COLUMNS = ("simulator", "path", "simulates", "batch", "eval_img_per_s", "time_vs_fp", "time_vs_aihwkit",
           "first_batch_s")


def _time(model, images, repeats: int) -> tuple:
    import torch

    times = []
    with torch.no_grad():
        for _ in range(repeats + 2):
            start = time.perf_counter()
            model(images)
            times.append(time.perf_counter() - start)
    return times[0], min(times[2:])


def _float_model():
    import torch

    from cimq_pl.models import create_model
    from cimq_pl.quant import fold_batchnorm_

    torch.manual_seed(0)
    model = create_model("cifar_resnet20", 10, False).eval()
    fold_batchnorm_(model)
    return model


def cimq_model(path: str, calibration):
    import torch

    from cimq_pl.quant import CIMSpec, QuantizerOptions, convert_to_cim
    from cimq_pl.quant.fused import set_simulation

    model = _float_model()
    convert_to_cim(model, CIMSpec(rows=128, cols=128, weight_bits=4, input_bits=4, dac_bits=1, adc_bits=4),
                   options=QuantizerOptions())
    set_simulation(model, path)
    with torch.no_grad():
        model(calibration)  # lazy quantizer initialisation
    return model


def aihwkit_model(calibration):
    import torch
    from aihwkit.nn.conversion import convert_to_analog
    from aihwkit.simulator.configs import TorchInferenceRPUConfig
    from aihwkit.simulator.parameters.enums import BoundManagementType, NoiseManagementType

    config = TorchInferenceRPUConfig()
    config.mapping.max_input_size = 128
    config.mapping.max_output_size = 128
    config.forward.inp_res = 1 / (2**4 - 2)
    config.forward.out_res = 1 / (2**4 - 2)
    config.forward.bound_management = BoundManagementType.NONE
    config.forward.noise_management = NoiseManagementType.ABS_MAX
    model = convert_to_analog(_float_model(), config).eval()
    with torch.no_grad():
        model(calibration)
    return model


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--paths", default="eager,compiled", help="cimq-pl simulation paths to time")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    try:
        import aihwkit
    except ImportError:
        sys.exit(MISSING)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(args.batch, 3, 32, 32, generator=generator)
    calibration = images[:8]
    print(f"# aihwkit {aihwkit.__version__} vs cimq-pl, ResNet-20 CIFAR, batch {args.batch}, torch "
          f"{torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    rows = []
    _, fp = _time(_float_model(), images, args.repeats)
    rows.append({"simulator": "float (PyTorch)", "path": "", "simulates": "float convs, BN folded",
                 "batch": args.batch, "_s": fp, "first_batch_s": ""})
    what = "W4 A4 bit-serial (4 cycles), ADC 4 bits per column and cycle, 128x128 arrays"
    for path in args.paths.split(","):
        first, best = _time(cimq_model(path, calibration), images, args.repeats)
        rows.append({"simulator": "cimq-pl", "path": path, "simulates": what, "batch": args.batch, "_s": best,
                     "first_batch_s": round(first, 2)})
        print(rows[-1], flush=True)
    first, best = _time(aihwkit_model(calibration), images, args.repeats)
    rows.append({"simulator": f"aihwkit {aihwkit.__version__}", "path": "TorchInferenceRPUConfig",
                 "simulates": "one pass per 128x128 tile, float input quantized to 4 bits, output noise, 4-bit output",
                 "batch": args.batch, "_s": best, "first_batch_s": round(first, 2)})
    print(rows[-1], flush=True)
    for row in rows:
        row["eval_img_per_s"] = round(args.batch / row["_s"], 1)
        row["time_vs_fp"] = round(row["_s"] / fp, 1)
        row["time_vs_aihwkit"] = round(row["_s"] / best, 2)
    print("\n| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS))
    for row in rows:
        print("| " + " | ".join(str(row.get(c, "")) for c in COLUMNS) + " |")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / "aihwkit_compare_cpu.csv"
    with open(out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    print(f"\nwrote {out}")
    return rows


if __name__ == "__main__":
    main()
