"""The PTQ presets a user starts from: the quick look (``cimq_ptq_quick.yaml``) beside the CPU preset (``cimq_ptq.yaml``).

Each row is what ``python -m cimq_pl fit --config configs/resnet20_cifar10.yaml --config configs/quant/<preset>``
then ``test --ckpt_path ptq.ckpt`` gives (`runner.measure`: 1,000 ``cifar10_lossless`` test images), each preset at
its own budget (calibration images, reconstruction steps per unit). Prints the accuracy, what the quick preset
costs against the full one, and the fit wall time as a ratio to the full preset's, measured in the same run;
writes ``presets.csv``.

    python benchmarks/presets.py          # ~15 min on 2 cores
    python benchmarks/presets.py --smoke  # seconds: tiny data, 1 step per unit
"""

from __future__ import annotations

from typing import Optional

import yaml

from runner import (MODEL_CONFIGS, REPO, ROWS, Setting, base_parser, derived_config, iters_per_block, machine,
                    markdown_table, measure, prepare)

PRESETS = ("cimq_quick", "cimq")
COLUMNS = ("preset", "config", "calibration_images", "steps_per_unit", "test/acc", "points_below_full",
           "test/bit_density", "fit_seconds", "fit_time_vs_full")


def budget(setting: Setting) -> tuple[int, int]:
    """(calibration images, PTQ steps per unit) that the model config and the preset of ``setting`` set."""
    config = derived_config(setting)
    model_config = yaml.safe_load((REPO / MODEL_CONFIGS[setting.model]).read_text())
    calibration = {**model_config["data"]["init_args"], **config.get("data", {}).get("init_args", {})}["calibration_size"]
    return calibration, iters_per_block(config)


def rows_of(results: dict[str, dict]) -> list[dict]:
    """The table rows: each preset's accuracy and time against the full preset's (``cimq``)."""
    full = results["cimq"]
    rows = []
    for name in PRESETS:
        row, setting = results[name], Setting("resnet20", name)
        calibration, steps = budget(setting)
        rows.append({
            "preset": name, "config": ROWS[name][0], "calibration_images": calibration,
            "steps_per_unit": row.get("iters") or steps, "test/acc": row["test/acc"],
            "points_below_full": round(100 * (float(full["test/acc"]) - float(row["test/acc"])), 1),
            "test/bit_density": row["test/bit_density"], "fit_seconds": row["fit_seconds"],
            "fit_time_vs_full": round(float(row["fit_seconds"]) / float(full["fit_seconds"]), 2),
        })
    return rows


def main(argv: Optional[list[str]] = None) -> list[dict]:
    from cimq_pl.cost.tables import write_csv_atomic

    args = base_parser(__doc__.split("\n")[0]).parse_args(argv)
    extra = prepare(args) + (["--without", "HardwareReport"] if args.smoke else [])  # smoke: accuracy and time only
    results = {}
    for name in PRESETS:
        setting = Setting("resnet20", name, iters=1 if args.smoke else None)
        print(f"[bench] {setting.key}", flush=True)
        results[name] = measure(setting, args.work_dir, extra_args=extra)
        print(f"[bench]   test/acc={results[name]['test/acc']} fit {results[name]['fit_seconds']} s", flush=True)
    rows = rows_of(results)
    headers = ["preset", "config", "calibration images", "steps per unit", "test acc", "points below full",
               "input bit density", "fit s", "fit time / full preset's"]
    print(f"\nResNet-20, W4A4, 128x128 arrays, 4-bit ADC; {machine()}\n")
    print(markdown_table(rows, COLUMNS, headers))
    path = write_csv_atomic(args.out_dir / "presets.csv", rows, COLUMNS)
    print(f"\nwrote {path}")
    return rows


if __name__ == "__main__":
    main()
