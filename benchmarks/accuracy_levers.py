"""The accuracy levers of issue 15, added one at a time to the CIMQ PTQ preset, in one run.

Every row is ``configs/quant/cimq_ptq.yaml`` (ResNet-20 W4A4 on 128x128 arrays, bit-serial inputs, ``--iters``
reconstruction steps of 32 images per unit) with some levers set, measured by `runner.measure` (the CLI's
fit + test) on the 1,000 ``cifar10_lossless`` test images at each ``--adc-bits``:

* ``before``: the preset before issue 15: the first conv and the classifier on the 4-bit arrays, QDrop's
  learning rates (tuned for 20,000 steps), one weight scale per array, codes with at most 2 ones (k = 2);
* ``+ int8 edges``: those two layers at 8-bit weights and inputs, ideal ADC (`CIMSpec.first_layer` /
  ``last_layer: int8``; the input code sets leave them uniform);
* ``+ lr x10``: the three reconstruction learning rates (AdaRound logits, input steps, ADC clips) x10;
* ``+ array_channel``: one weight scale per column of each array; ``+ column ADC clip``: one ADC range per
  column (the preset of the session before the step lever); ``+ AdaRound from GPTQ``;
* ``preset``: ``cimq_ptq.yaml`` as it is (uniform codes at twice the calibrated input step);
* the input code sets and density levers: uniform codes, 5-bit codes with k = 2, the sparsity regulariser,
  the input step x1.5 ... x3, x2 / x2.5 with the steps frozen at calibration (``lr_step`` 0), and x2 with the
  steps learning against the regulariser at lambda 0.3 and 1 (x30 and x100 of the QAT config's);
* ``calibration on 4,000 images``: every lossless train image in the calibration subset (1,024 in the configs),
  which reconstruction also draws its batches from;
* ``GPTQ rounding, calibration only`` (``--iters 0``): the preset with the weights rounded by GPTQ at calibration
  and nothing reconstructed, to set against the preset at a few AdaRound steps of the same wall time.

Prints a table, writes ``accuracy_levers.csv`` (a stopped run resumes from it).

    python benchmarks/accuracy_levers.py                      # ~15 min on 2 cores (ADC 4, 100 steps)
    python benchmarks/accuracy_levers.py --adc-bits 8 5 4 3 --iters 200 --sets preset
    python benchmarks/accuracy_levers.py --iters 0 50 100 200 400 1000 --sets preset   # accuracy against steps
    python benchmarks/accuracy_levers.py --model resnet32 --iters 200 --sets preset
    python benchmarks/accuracy_levers.py --iters 0 --sets "GPTQ rounding, calibration only"   # then preset, few steps
    python benchmarks/accuracy_levers.py --adc-bits 8 --iters 400 --sets preset --seeds 0 1 2   # the spread of fits
    python benchmarks/accuracy_levers.py --smoke
"""

from __future__ import annotations

from runner import (CONFIG_SEED, ResultStore, Setting, base_parser, markdown_table, prepare, run_settings, seed_spread,
                    seeded)

#: the bit-sparse code set of the presets before this round: at most 2 ones per 4-bit code, the calibrated step
_K2 = dict(max_ones=2, step_scale=1.0)

#: lever set name -> Setting fields (besides model, bits and iters); every set is measured at every ADC width
LEVER_SETS = {
    # the history of issue 15 (input codes with at most 2 ones at the calibrated step, as the preset had then)
    "before": dict(row="cimq_edges_on_arrays", lr_scale=1.0, weight_granularity="array", **_K2),
    "+ int8 edges": dict(row="cimq", lr_scale=1.0, weight_granularity="array", **_K2),
    "+ lr x10": dict(row="cimq", lr_scale=10.0, weight_granularity="array", **_K2),
    "+ array_channel": dict(row="cimq", psum_granularity="array", **_K2),
    "+ column ADC clip": dict(row="cimq", **_K2),
    "+ AdaRound from GPTQ": dict(row="cimq", rounding_init="gptq", **_K2),
    # today's preset: uniform input codes at twice the calibrated step (cimq_ptq.yaml as it is)
    "preset": dict(row="cimq"),
    # the input code sets (issue 15, part 4): density against accuracy
    "uniform codes": dict(row="cimq", max_ones=0, step_scale=1.0),
    "5-bit codes, k = 2 (16 levels)": dict(row="cimq", input_bits=5, **_K2),
    "uniform codes + sparsity regulariser": dict(row="cimq", max_ones=0, step_scale=1.0, sparsity_weight=0.01),
    "uniform codes + sparsity regulariser x10": dict(row="cimq", max_ones=0, step_scale=1.0, sparsity_weight=0.1),
    # the activation step as a density lever: the calibrated input steps x1.5 ... x3 (smaller codes, fewer 1 bits)
    "uniform codes, input steps x1.5": dict(row="cimq", max_ones=0, step_scale=1.5),
    "uniform codes, input steps x2": dict(row="cimq", max_ones=0, step_scale=2.0),
    "uniform codes, input steps x2.5": dict(row="cimq", max_ones=0, step_scale=2.5),
    "uniform codes, input steps x3": dict(row="cimq", max_ones=0, step_scale=3.0),
    "k = 2, input steps x1.5": dict(row="cimq", max_ones=2, step_scale=1.5),
    # the input steps frozen at calibration (no step learning: reconstruction cannot undo the step lever)
    "uniform codes, input steps x2, frozen": dict(row="cimq", max_ones=0, step_scale=2.0, lr_step=0.0),
    "uniform codes, input steps x2.5, frozen": dict(row="cimq", max_ones=0, step_scale=2.5, lr_step=0.0),
    # the steps learn, but against the bit-sparsity regulariser: each layer trades its density for its error
    "uniform codes, input steps x2 + sparsity regulariser x30": dict(row="cimq", max_ones=0, step_scale=2.0,
                                                                    sparsity_weight=0.3),
    "uniform codes, input steps x2 + sparsity regulariser x100": dict(row="cimq", max_ones=0, step_scale=2.0,
                                                                     sparsity_weight=1.0),
    # (session 39) the density the efficiency target needs: ~0.06 on the array layers at ADC 4 (README)
    "uniform codes, input steps x2 + sparsity regulariser x300": dict(row="cimq", max_ones=0, step_scale=2.0,
                                                                     sparsity_weight=3.0),
    "uniform codes, input steps x2 + sparsity regulariser x1000": dict(row="cimq", max_ones=0, step_scale=2.0,
                                                                      sparsity_weight=10.0),
    # GPTQ against AdaRound at equal wall time (part 3): the preset with GPTQ's rounding and no reconstruction
    # (run with --iters 0), beside the preset at as many AdaRound steps as take the same time
    "GPTQ rounding, calibration only": dict(row="cimq", weight_rounding="gptq"),
    # a digital offset per output channel after the ADC, learned by reconstruction (the ADC's systematic error)
    "+ ADC offsets": dict(row="cimq", lr_offset=1e-3),
    "+ ADC offsets, lr 1e-2": dict(row="cimq", lr_offset=1e-2),
    # QDrop's keep probability (the sweep at ADC 4 and 100 steps: p = 1, no dropping, 1.2 points above p = 0.5)
    "QDrop keep 0.75": dict(row="cimq", keep_prob=0.75),
    "QDrop off (keep 1)": dict(row="cimq", keep_prob=1.0),
    # the calibration subset: every one of the 4,000 lossless train images instead of 1,024 (reconstruction draws
    # its batches from it, so 800 steps of 32 see each image 6 times instead of 25)
    "calibration on 4,000 images": dict(row="cimq", calibration_size=4000),
    # the same at the calibrated input step (x1 instead of the preset's x2): more 1 bits, finer input codes
    "calibration on 4,000 images, input steps x1": dict(row="cimq", calibration_size=4000, step_scale=1.0),
    "calibration on 4,000 images, QDrop keep 0.75": dict(row="cimq", calibration_size=4000, keep_prob=0.75),
    # twice the reconstruction's images per step (64 instead of the preset's 32)
    "calibration on 4,000 images, 64 images per step": dict(row="cimq", calibration_size=4000, batch_size=64),
    # the ADC ranges start at the min-max of the calibration partial sums instead of the MSE-optimal clip
    "ADC ranges from min-max": dict(row="cimq", psum_observer="minmax"),
    "ADC ranges from the MSE clip": dict(row="cimq", psum_observer="mse"),  # the presets' choice before session 33
    # session 34: QDrop on the ADC too (the CIMQ paper's partial-sum dropping), first on the preset's 1,024 images
    "QDrop on the partial sums too": dict(row="cimq", drop_psums=True),
    "calibration on 4,000 images, QDrop on the partial sums too": dict(row="cimq", calibration_size=4000, drop_psums=True),
    # an ADC range [lo, hi] per column placed by a learned offset (issue 15, low-resolution ADCs)
    "asymmetric ADC ranges": dict(row="cimq", asymmetric_adc=True),
    "calibration on 4,000 images, asymmetric ADC ranges": dict(row="cimq", calibration_size=4000, asymmetric_adc=True),
}
COLUMNS = ("levers", "adc_bits", "iters", "seed", "test/acc", "test/bit_density", "test/hw_efficiency_vs_baseline",
           "test/energy_per_image_uj", "fit_seconds")
HEADERS = ("levers", "ADC bits", "steps/unit", "seed", "test acc", "bit density", "HW efficiency vs baseline",
           "energy uJ/image", "fit s")


def grid(adc_bits, iters, sets, model: str = "resnet20", seeds=(CONFIG_SEED,),
         input_bits: int = 4) -> list[tuple[str, Setting]]:
    """Every lever set at every ADC width, every number of steps per unit in ``iters`` and every fit seed, with
    ``input_bits``-bit inputs on every CIM layer."""
    return [(name, seeded(Setting(model, **{"weight_bits": 4, "input_bits": input_bits, **LEVER_SETS[name]},
                                  adc_bits=adc, iters=steps), seed))
            for adc in adc_bits for steps in iters for name in sets for seed in seeds]


def main(argv=None) -> list[dict]:
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--adc-bits", nargs="+", type=int, default=[4])
    parser.add_argument("--iters", nargs="+", type=int, default=[100],
                        help="reconstruction steps per unit (several: accuracy against steps; 0 = calibration only)")
    parser.add_argument("--sets", nargs="+", default=list(LEVER_SETS), choices=list(LEVER_SETS))
    parser.add_argument("--model", default="resnet20", choices=["resnet20", "resnet32"],
                        help="the CIFAR-10 network (the issue's targets are for ResNet-20; ResNet-32 at ADC 4 too)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[CONFIG_SEED],
                        help=f"fit every setting once per seed (the data seed: calibration images and PTQ draws; "
                             f"default {CONFIG_SEED}, the config's); with several, a second table gives each "
                             "setting's mean, spread and range")
    parser.add_argument("--input-bits", type=int, default=4,
                        help="input bits of every CIM layer (4, the issue's W4A4; 3: one bit-serial cycle fewer)")
    args = parser.parse_args(argv)
    extra = prepare(args)
    iters = [2] if args.smoke else args.iters
    cells = grid(args.adc_bits, iters, args.sets[:2] if args.smoke else args.sets, args.model, args.seeds,
                 args.input_bits)
    store = ResultStore(args.out_dir / "accuracy_levers.csv")
    measured = run_settings([(setting, False) for _, setting in cells], store, args.work_dir, extra)
    inputs = "" if args.input_bits == 4 else f", A{args.input_bits}"
    rows = [{**row, "levers": f"{name}{inputs}" if args.model == "resnet20" else f"{args.model}: {name}{inputs}"}
            for (name, _), row in zip(cells, measured)]
    print("\n" + markdown_table(rows, COLUMNS, HEADERS))
    if len(args.seeds) > 1:
        group = ("levers", "adc_bits", "iters")
        print("\n" + markdown_table(seed_spread(rows, group), (*group, "fits", "mean", "std", "range"),
                                     ("levers", "ADC bits", "steps/unit", "fits", "mean test acc", "std", "range")))
    return rows


if __name__ == "__main__":
    main()
