"""The accuracy levers of issue 15, added one at a time to the CIMQ PTQ preset as it was before, in one run.

Every row is ``configs/quant/cimq_ptq.yaml`` (ResNet-20 W4A4 on 128x128 arrays, bit-serial inputs, ``--iters``
reconstruction steps of 32 images per unit) with some levers set, measured by `runner.measure` (the CLI's
fit + test) on the 1,000 ``cifar10_lossless`` test images at each ``--adc-bits``:

* ``before``: the preset before issue 15: the first conv and the classifier on the 4-bit arrays, QDrop's
  learning rates (tuned for 20,000 steps), one weight scale per array;
* ``+ int8 edges``: those two layers at 8-bit weights and inputs, ideal ADC (`CIMSpec.first_layer` /
  ``last_layer: int8``; the bit-sparse code set leaves them uniform);
* ``+ lr x10``: the three reconstruction learning rates (AdaRound logits, input steps, ADC clips) x10;
* ``+ array_channel``: one weight scale per column of each array: today's preset.

Prints a table, writes ``accuracy_levers.csv`` (a stopped run resumes from it).

    python benchmarks/accuracy_levers.py                      # ~15 min on 2 cores (ADC 4, 100 steps)
    python benchmarks/accuracy_levers.py --adc-bits 8 5 4 3 --iters 200 --sets preset
    python benchmarks/accuracy_levers.py --iters 0 50 100 200 400 1000 --sets preset   # accuracy against steps
    python benchmarks/accuracy_levers.py --smoke
"""

from __future__ import annotations

from runner import ResultStore, Setting, base_parser, markdown_table, prepare, run_settings

#: lever set name -> Setting fields (besides model, bits and iters); every set is measured at every ADC width
LEVER_SETS = {
    "before": dict(row="cimq_edges_on_arrays", lr_scale=1.0, weight_granularity="array"),
    "+ int8 edges": dict(row="cimq", lr_scale=1.0, weight_granularity="array"),
    "+ lr x10": dict(row="cimq", lr_scale=10.0, weight_granularity="array"),
    "preset": dict(row="cimq"),  # + array_channel
    # the input code sets of the preset (issue 15, part 4): density against accuracy
    "uniform codes": dict(row="cimq", max_ones=0),
    "5-bit codes, k = 2 (16 levels)": dict(row="cimq", input_bits=5, max_ones=2),
    "uniform codes + sparsity regulariser": dict(row="cimq", max_ones=0, sparsity_weight=0.01),
    "uniform codes + sparsity regulariser x10": dict(row="cimq", max_ones=0, sparsity_weight=0.1),
    # on top of the preset: one ADC range per column (bitline), AdaRound started from GPTQ's rounding
    "+ column ADC clip": dict(row="cimq", psum_granularity="column"),
    "+ AdaRound from GPTQ": dict(row="cimq", rounding_init="gptq"),
}
COLUMNS = ("levers", "adc_bits", "iters", "test/acc", "test/bit_density", "test/hw_efficiency_vs_baseline",
           "fit_seconds")
HEADERS = ("levers", "ADC bits", "steps/unit", "test acc", "bit density", "HW efficiency vs baseline", "fit s")


def grid(adc_bits, iters, sets) -> list[tuple[str, Setting]]:
    """Every lever set at every ADC width and every number of steps per unit in ``iters``."""
    return [(name, Setting("resnet20", **{"weight_bits": 4, "input_bits": 4, **LEVER_SETS[name]}, adc_bits=adc,
                           iters=steps)) for adc in adc_bits for steps in iters for name in sets]


def main(argv=None) -> list[dict]:
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--adc-bits", nargs="+", type=int, default=[4])
    parser.add_argument("--iters", nargs="+", type=int, default=[100],
                        help="reconstruction steps per unit (several: accuracy against steps; 0 = calibration only)")
    parser.add_argument("--sets", nargs="+", default=list(LEVER_SETS), choices=list(LEVER_SETS))
    args = parser.parse_args(argv)
    extra = prepare(args)
    iters = [2] if args.smoke else args.iters
    cells = grid(args.adc_bits, iters, args.sets[:2] if args.smoke else args.sets)
    store = ResultStore(args.out_dir / "accuracy_levers.csv")
    measured = run_settings([(setting, False) for _, setting in cells], store, args.work_dir, extra)
    rows = [{**row, "levers": name} for (name, _), row in zip(cells, measured)]
    print("\n" + markdown_table(rows, COLUMNS, HEADERS))
    return rows


if __name__ == "__main__":
    main()
