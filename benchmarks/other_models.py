"""Beyond CIFAR-10: the CIFAR-100 ResNet-56 on the 100-image sample, and a timm ImageNet model (ResNet-18).

* CIFAR-100: ``python -m cimq_pl test --config configs/resnet_cifar100.yaml --model.cim null --trainer.callbacks null`` on
  ``../shared/data/cifar100_sample.npz`` (a path check of the user's config: 100 images, FP accuracy), then the
  hardware cost of the config's macro (W4A4, 128x128, ADC 4) through `cimq_pl.cost.cost_report`, calibrated
  on the same 100 images (the sample has no train split: a sizing estimate, not an accuracy figure).
* ImageNet: timm ``resnet18`` with random weights (no ImageNet data or weights here) on seeded random
  224x224 images: cost report on the same macro and forward time of the CIM simulation against the float
  model (ratio, same images, same process).

* ``--ptq``: the CIFAR-100 ResNet-56 through the CPU PTQ preset as ``configs/resnet_cifar100.yaml`` states it
  (all four techniques, 1,024 calibration images, 400 steps per unit), tested on the 100-image sample. There is
  no CIFAR-100 train split in ``../shared``, and calibration never reads the evaluated images, so PTQ calibrates
  and reconstructs on the 4,000 ``cifar10_lossless`` train images (natural 32x32 photographs of other classes;
  PTQ's objective reads no labels). Writes ``cifar100_ptq.csv``; 100 test images carry a standard error of about
  5 points.

Writes ``other_models.csv`` and ``other_models.png`` (energy per image beside the baseline's).

    python benchmarks/other_models.py            # ~3 min on 2 cores
    python benchmarks/other_models.py --ptq      # the PTQ row only, ~14 min on 2 cores
    python benchmarks/other_models.py --smoke [--ptq]
"""

from __future__ import annotations

import time
from typing import Optional

import torch

from runner import LOSSLESS, SHARED, base_parser, cli, markdown_table, prepare

CIFAR100_SAMPLE = SHARED / "data" / "cifar100_sample.npz"
COLUMNS = ("model", "data", "images", "fp_acc", "energy_per_image_uj", "baseline_energy_per_image_uj",
           "hw_efficiency_vs_baseline", "tops_per_w", "bit_density", "fp_ms_per_image", "cim_ms_per_image",
           "cim_vs_fp_time")


def _spec():
    from cimq_pl.quant import CIMSpec

    return CIMSpec(rows=128, cols=128, weight_bits=4, input_bits=4, dac_bits=1, adc_bits=4)


def _best_time(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _cost_row(name: str, data: str, model, batches, fp_acc, repeats: int) -> dict:
    """Cost report of ``model`` on the macro, and forward times of the CIM model and the float model."""
    from cimq_pl.cost import cost_report

    converted = _converted(model, batches)
    report = cost_report(converted, None, batches, print_fn=None)
    images = torch.cat([b[0] if isinstance(b, (tuple, list)) else b for b in batches])
    with torch.no_grad():
        fp_time = _best_time(lambda: model(images), repeats)
        cim_time = _best_time(lambda: converted(images), repeats)
    n = images.shape[0]
    return {
        "model": name, "data": data, "images": n, "fp_acc": "" if fp_acc is None else round(fp_acc, 4),
        "energy_per_image_uj": round(report.cost.energy_per_image_uj, 4),
        "baseline_energy_per_image_uj": round(report.baseline.energy_per_image_uj, 4),
        "hw_efficiency_vs_baseline": round(report.efficiency, 3), "tops_per_w": round(report.cost.tops_per_w, 1),
        "bit_density": round(report.cost.bit_density, 4), "fp_ms_per_image": round(1e3 * fp_time / n, 2),
        "cim_ms_per_image": round(1e3 * cim_time / n, 2), "cim_vs_fp_time": round(cim_time / fp_time, 1),
    }


def _converted(model, batches):
    """A calibrated CIM copy of ``model`` on the macro (BN folded; CIMQ default quantizers)."""
    import copy

    from cimq_pl.quant.convert import calibrate_, convert_to_cim, fold_batchnorm_

    converted = copy.deepcopy(model).eval()
    fold_batchnorm_(converted)
    convert_to_cim(converted, _spec())
    calibrate_(converted, batches)
    return converted


def _fp_test(args: list[str]):
    """``test`` of ``configs/resnet_cifar100.yaml`` without the macro or its callbacks: (the CLI's objects, top-1)."""
    built = cli(["--config", "configs/resnet_cifar100.yaml", "--model.cim", "null", "--trainer.callbacks", "null", *args])
    built.trainer.test(built.model, datamodule=built.datamodule, verbose=False)
    return built, float(built.trainer.callback_metrics["test/acc"])


def cifar100(images: int, repeats: int) -> dict:
    """FP accuracy through the CLI on the sample, then cost and speed of the config's macro."""
    built, fp_acc = _fp_test(["--data.init_args.root", str(CIFAR100_SAMPLE), "--data.init_args.num_workers", "0",
                              "--trainer.logger.init_args.save_dir", "runs/benchmarks",
                              "--trainer.enable_progress_bar", "false"])
    model = built.model.model.eval()
    batches = [(x, y) for x, y in built.datamodule.test_dataloader()]
    sample = torch.cat([x for x, _ in batches])[:images]
    labels = torch.cat([y for _, y in batches])[:images]
    return _cost_row("cifar_resnet56_b (CIFAR-100)", "cifar100_sample.npz", model,
                     [(sample, labels)], fp_acc, repeats)


PTQ_COLUMNS = ("model", "calibration", "test", "test_images", "iters", "fp_acc", "ptq_acc", "bit_density",
               "hw_efficiency_vs_baseline", "fit_seconds")


def _calibration_archive(work_dir, limit: Optional[int] = None):
    """An .npz of the 4,000 ``cifar10_lossless`` train images as the train split (labels 0: PTQ reads none) and
    the CIFAR-100 sample as the test split; ``limit`` keeps the first images of each (smoke runs)."""
    import numpy as np
    from PIL import Image

    files = sorted((LOSSLESS / "train").glob("*/*.png"))[:limit]
    train = np.stack([np.asarray(Image.open(path).convert("RGB")) for path in files])
    with np.load(CIFAR100_SAMPLE) as sample:
        test_images, test_labels, classes = sample["images"][:limit], sample["labels"][:limit], sample["classes"]
    path = work_dir / "cifar10_train_cifar100_test.npz"
    work_dir.mkdir(parents=True, exist_ok=True)
    np.savez(path, train_images=train, train_labels=np.zeros(len(train), dtype=np.int64), test_images=test_images,
             test_labels=test_labels, classes=classes)
    return path, len(train), len(test_images)


def cifar100_ptq(work_dir, smoke: bool = False) -> dict:
    """``fit`` then ``test`` of ``configs/resnet_cifar100.yaml`` as written (PTQ calibrated on CIFAR-10 train images)."""
    archive, n_train, n_test = _calibration_archive(work_dir, 64 if smoke else None)
    small = (["--data.init_args.calibration_size", "32", "--model.objective.init_args.iters_per_block", "2",
              "--model.objective.init_args.batch_size", "8"] if smoke else [])
    common = ["--data.init_args.root", str(archive), "--data.init_args.num_workers", "0",
              "--trainer.logger.init_args.save_dir", str(work_dir), "--trainer.enable_progress_bar", "false",
              "--trainer.limit_val_batches", "0"]
    _, fp_acc = _fp_test(common)
    built = cli(["--config", "configs/resnet_cifar100.yaml", *common, *small,
                 "--trainer.callbacks+=cimq_pl.callbacks.HardwareReport"])  # density and cost beside the baseline
    start = time.perf_counter()
    built.trainer.fit(built.model, datamodule=built.datamodule)
    fit_seconds = time.perf_counter() - start
    built.trainer.test(built.model, datamodule=built.datamodule, verbose=False)
    metrics = built.trainer.callback_metrics
    return {"model": "cifar_resnet56_b (CIFAR-100)", "calibration": f"cifar10_lossless train ({n_train} images)",
            "test": "cifar100_sample.npz", "test_images": n_test,
            "iters": built.model.objective.iters_per_block, "fp_acc": round(fp_acc, 4),
            "ptq_acc": round(float(metrics["test/acc"]), 4), "bit_density": round(float(metrics["test/bit_density"]), 4),
            "hw_efficiency_vs_baseline": round(float(metrics["test/hw_efficiency_vs_baseline"]), 3),
            "fit_seconds": round(fit_seconds, 1)}


def imagenet_resnet18(images: int, repeats: int) -> dict:
    """Cost and speed of timm resnet18 (random weights) on seeded random 224x224 images."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=1000).eval()
    batch = torch.randn(images, 3, 224, 224)
    return _cost_row("timm resnet18 (random weights)", "random 224x224", model, [batch], None, repeats)


def tables(rows: list[dict]) -> str:
    headers = ["model", "data", "images", "FP acc", "uJ/image", "baseline uJ/image", "efficiency vs baseline",
               "TOPS/W", "bit density", "FP ms/image", "CIM sim ms/image", "CIM/FP time"]
    return markdown_table(rows, COLUMNS, headers)


def plot(rows: list[dict], path):
    from cimq_pl.cost.plots import finish_figure, new_figure

    figure = new_figure(6.0, 3.5)
    axes = figure.add_subplot(1, 1, 1)
    positions = range(len(rows))
    axes.bar([p - 0.2 for p in positions], [r["energy_per_image_uj"] for r in rows], 0.4, label="CIM macro (W4A4, ADC 4)")
    axes.bar([p + 0.2 for p in positions], [r["baseline_energy_per_image_uj"] for r in rows], 0.4,
             label="conventional baseline (8-bit ADC)")
    axes.set_xticks(list(positions))
    axes.set_xticklabels([r["model"] for r in rows], fontsize=7)
    axes.set_yscale("log")
    return finish_figure(figure, axes, path, "", "energy per image (uJ)", "CIM macro vs conventional baseline")


def main(argv: Optional[list[str]] = None) -> list[dict]:
    from cimq_pl.cost.tables import write_csv_atomic

    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--ptq", action="store_true",
                        help="only the CIFAR-100 ResNet-56 through the PTQ preset (cifar100_ptq.csv)")
    args = parser.parse_args(argv)
    prepare(args)
    if args.ptq:
        rows = [cifar100_ptq(args.work_dir, args.smoke)]
        print("\n" + markdown_table(rows, PTQ_COLUMNS, list(PTQ_COLUMNS)))
        print(f"\nwrote {write_csv_atomic(args.out_dir / 'cifar100_ptq.csv', rows, PTQ_COLUMNS)}")
        return rows
    images, repeats = (8, 1) if args.smoke else (100, 3)
    rows = [cifar100(images, repeats), imagenet_resnet18(1 if args.smoke else 8, repeats)]
    print("\n" + tables(rows))
    csv_path = write_csv_atomic(args.out_dir / "other_models.csv", rows, COLUMNS)
    picture = plot(rows, args.out_dir / "other_models.png")
    print(f"\nwrote {csv_path} and {picture}")
    return rows


if __name__ == "__main__":
    main()
