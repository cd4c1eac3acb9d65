"""How much ADC error other range shapes would remove (issue 15, low-resolution ADCs): an analysis, not a fit.

Loads a PTQ checkpoint of the CPU preset, runs ``--images`` train images through it and traces every CIM layer with
an ADC (the partial sums of every input cycle, column and position). For each column it then finds, by grid search,
the range that minimises the ADC's error on those partial sums under five range shapes, and reports the error of
the cycle-summed result, sum_j w_j^2 MSE_j (w_j the cycle's shift-add weight), against the first:

* ``symmetric``: one range per column (bitline), the same for every input cycle: today's `PartialSumClipping`
  (``granularity: column``; signed columns [-2^(b-1), 2^(b-1) - 1] x step, unsigned [0, 2^b - 1] x step);
* ``per cycle``: one such range per column and input cycle (the ADC's reference changed between cycles);
* ``asymmetric``: one range [lo, hi] per column with 2^b levels (an ADC with a programmable offset);
* ``asymmetric per cycle``: both;
* ``symmetric, one bit more``: the first shape on an ADC of one bit more, the yardstick.

A range shape that removes a large share of the error is worth building into the quantizer (a new
``PartialSumClipping`` option, its compiled kernels, the export and the cost model) when it comes near what one bit
more removes (about 75%).

With ``--test-batches K`` (-1: the whole test split) it also tests the network three ways on K test batches of 16
images, eagerly: as the checkpoint learned its ranges; with every column's range chosen again by the same grid
search on the traced images, symmetric (today's shape; the control of the next); and asymmetric. Each chosen range
replaces the layer's ADC conversion for that test only (`swapped_conversions`), nothing is learned.

    python benchmarks/adc_range_shapes.py --checkpoint <ptq.ckpt> --adc-bits 3 [--test-batches -1]
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import torch

from runner import MODEL_CONFIGS, base_parser, cli, machine, markdown_table, prepare

SHAPES = ("symmetric", "per cycle", "asymmetric", "asymmetric per cycle", "symmetric, one bit more")
COLUMNS = ("layer", *SHAPES)


def _search_ranges(values: torch.Tensor, cycle_weights: tuple, bits: int, qmin: torch.Tensor, qmax: torch.Tensor,
                   asymmetric: bool, per_cycle: bool, points: int) -> tuple:
    """The range of least weighted ADC error per channel, over a grid of ranges.

    Args:
        values: (n_cycles, C, M) partial sums of each cycle and channel (column).
        cycle_weights: the cycles' shift-add weights w_j (the error counted is sum_j w_j^2 MSE_j).
        bits: ADC bits (2^b levels).
        qmin, qmax: (C,) the channels' code range, which a symmetric range keeps (alpha = the largest |code| x step,
            as `PsumQuantizer`'s); an asymmetric range [lo, hi] has codes 0 .. 2^b - 1.
        asymmetric: ranges [lo, hi] from fractions of the channel's minimum and maximum; else symmetric ones.
        per_cycle: one range per cycle and channel, each chosen on its own cycle's error; else one per channel.
        points: grid points per range bound.

    Returns:
        ``(error, low, high)``: error (C,) summed over the cycles; low, high (n_cycles or 1, C, 1).
    """
    levels = 2**bits - 1
    reduce = (2,) if per_cycle else (0, 2)
    low, high = values.amin(reduce, keepdim=True), values.amax(reduce, keepdim=True)
    top = torch.maximum(low.abs(), high.abs()).clamp_min(1e-9)
    fractions = torch.linspace(1.0 / points, 1.0, points).tolist()
    if asymmetric:
        candidates = [(low * a, torch.maximum(high * b, low * a + 1e-6)) for a in fractions for b in fractions]
    else:
        qmin, qmax = qmin.to(values.dtype).view(1, -1, 1), qmax.to(values.dtype).view(1, -1, 1)
        candidates = [(qmin * step, qmax * step) for step in (top * f / torch.maximum(-qmin, qmax) for f in fractions)]
    squared = torch.tensor(cycle_weights, dtype=values.dtype).view(-1, 1) ** 2
    best = chosen_low = chosen_high = None
    for lo, hi in candidates:
        step = (hi - lo) / levels
        quantized = torch.clamp(torch.round((values - lo) / step), 0, levels) * step + lo
        error = ((quantized - values) ** 2).mean(2) * squared  # (n_cycles, C)
        if not per_cycle:
            error = error.sum(0, keepdim=True)
        if best is None:
            best, chosen_low, chosen_high = error, lo, hi
        else:
            better = error < best
            best = torch.where(better, error, best)
            mask = better.unsqueeze(-1)
            chosen_low, chosen_high = torch.where(mask, lo, chosen_low), torch.where(mask, hi, chosen_high)
    return best.sum(0), chosen_low, chosen_high


def layer_errors(trace: dict, bits: int, points: int) -> dict:
    """Total weighted ADC error of one traced layer under each range shape (`SHAPES`); a column is signed where
    any of its partial sums is negative."""
    psums = trace["partial_sums"]  # (n_cycles, N, G, row blocks, columns, H, W)
    n_cycles = psums.shape[0]
    values = psums.permute(0, 2, 3, 4, 1, 5, 6).reshape(n_cycles, psums[0, 0, ..., 0, 0].numel(), -1).double()
    signed = (values < 0).any(2).any(0)
    errors = {}
    for shape in SHAPES:
        b = bits + ("one bit more" in shape)
        qmin = torch.where(signed, -(2.0 ** (b - 1)), 0.0)
        qmax = torch.where(signed, 2.0 ** (b - 1) - 1, 2.0**b - 1)
        errors[shape] = float(_search_ranges(values, trace["cycle_weights"], b, qmin, qmax, shape.startswith("asym"),
                                             "per cycle" in shape, points)[0].sum())
    return errors


def _convert_in(low: torch.Tensor, high: torch.Tensor, bits: int):
    """An ADC conversion (`PsumQuantizer.convert_and_sum`'s signature, evaluation only) into 2^b levels over
    [low, high] per channel, shift-added over cycles."""
    levels = 2**bits - 1
    step, low = ((high - low) / levels).view(1, -1, 1, 1), low.view(1, -1, 1, 1)

    def convert(psums, group, signed, cycle_weights, *args, **kwargs):
        values = torch.clamp(torch.round((psums - low) / step), 0, levels) * step + low
        values = values.reshape(len(cycle_weights), -1, *values.shape[1:])
        return sum(weight * values[j] for j, weight in enumerate(cycle_weights)), None, None

    return convert


@contextlib.contextmanager
def swapped_conversions(layers, images: torch.Tensor, model, bits: int, asymmetric: bool, points: int):
    """Within the block, every ADC of ``layers`` converts into the range the grid search chooses per channel on
    the partial sums of ``images`` (through ``model``, eagerly): an instance attribute shadows the quantizer's
    ``convert_and_sum`` and is removed on exit."""
    chosen = {}  # (quantizer, the part's cached channel-group tensor) -> its conversion

    def recording(quantizer):
        original = quantizer.convert_and_sum

        def record(psums, group, signed, cycle_weights, *args, **kwargs):
            _, qmin, qmax = quantizer.channel_params(group, signed)
            channels = psums.shape[1]  # (n_cycles * N, C, H, W) -> (n_cycles, C, N * H * W)
            values = psums.reshape(len(cycle_weights), -1, channels, *psums.shape[2:]).transpose(1, 2)
            _, low, high = _search_ranges(values.reshape(len(cycle_weights), channels, -1).double(), cycle_weights,
                                          bits, qmin, qmax, asymmetric, False, points)
            chosen[quantizer, group.data_ptr()] = _convert_in(low.flatten().float(), high.flatten().float(), bits)
            return original(psums, group, signed, cycle_weights, *args, **kwargs)

        return record

    def swapped(quantizer):
        def convert(psums, group, *args, **kwargs):
            return chosen[quantizer, group.data_ptr()](psums, group, *args, **kwargs)

        return convert

    quantizers = [layer.psum_quantizer for _, layer in layers]
    try:
        for quantizer in quantizers:
            quantizer.convert_and_sum = recording(quantizer)
        with torch.no_grad():
            model(images)
        for quantizer in quantizers:
            quantizer.convert_and_sum = swapped(quantizer)
        yield
    finally:
        for quantizer in quantizers:
            quantizer.__dict__.pop("convert_and_sum", None)


def main(argv: Optional[list[str]] = None) -> list[dict]:
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="a PTQ checkpoint of --config at --adc-bits")
    parser.add_argument("--adc-bits", type=int, required=True, help="the checkpoint's ADC bits")
    parser.add_argument("--config", default="configs/quant/cimq_ptq.yaml", help="its technique config (cimq_ptq.yaml)")
    parser.add_argument("--images", type=int, default=16, help="train images traced (16)")
    parser.add_argument("--points", type=int, default=24, help="grid points per range bound (24)")
    parser.add_argument("--test-batches", type=int, default=0,
                        help="also test as learned / symmetric / asymmetric ranges chosen again on K test batches of "
                             "16 images (-1: the whole test split; 0: no test, the default)")
    args = parser.parse_args(argv)
    if not args.checkpoint.is_file():
        parser.error(f"--checkpoint {args.checkpoint}: no such file")
    if args.images < 1 or args.points < 2:
        parser.error(f"--images {args.images} / --points {args.points}: need >= 1 image and >= 2 points")
    if args.test_batches < -1 or args.test_batches == 1:
        parser.error(f"--test-batches {args.test_batches}: expected -1 (all), 0 (none) or >= 2 (1 would read as "
                     "the whole split)")
    prepare(args)
    from cimq_pl.quant.layers import cim_layers

    built = cli(["--config", MODEL_CONFIGS["resnet20"], "--config", args.config, "--model.cim.adc_bits",
                 str(args.adc_bits), "--trainer.limit_test_batches", "2", "--trainer.enable_progress_bar", "false",
                 "--model.simulation", "eager",
                 "--trainer.logger.init_args.save_dir", str(args.work_dir / "adc_range_shapes"),
                 "--data.init_args.eval_batch_size", "16"])
    built.trainer.test(built.model, datamodule=built.datamodule, ckpt_path=str(args.checkpoint), verbose=False)
    built.datamodule.setup("fit")
    images = torch.cat([batch[0] for _, batch in zip(range(64), built.datamodule.train_dataloader())])[: args.images]
    inputs = {}
    layers = [(name, layer) for name, layer in cim_layers(built.model.model) if layer.psum_quantizer is not None]
    hooks = [layer.register_forward_pre_hook(lambda _, a, name=name: inputs.__setitem__(name, a[0].detach()))
             for name, layer in layers]
    built.model.eval()
    with torch.no_grad():
        built.model.model(images)
        for hook in hooks:
            hook.remove()
        rows, totals = [], dict.fromkeys(SHAPES, 0.0)
        for name, layer in layers:
            errors = layer_errors(layer.simulate(inputs[name], trace=True)[1], args.adc_bits, args.points)
            for shape in SHAPES:
                totals[shape] += errors[shape]
            rows.append({"layer": name, **{shape: round(errors[shape] / errors["symmetric"], 3) for shape in SHAPES}})
            print(f"[bench] {name}: " + ", ".join(f"{s} {rows[-1][s]}" for s in SHAPES), flush=True)
    rows.append({"layer": "all layers (sum of errors)",
                 **{shape: round(totals[shape] / totals["symmetric"], 3) for shape in SHAPES}})
    print(f"\n**ADC error of other range shapes, relative to one symmetric range per column** (ADC {args.adc_bits}, "
          f"{args.images} train images, {args.checkpoint.name}); {machine()}\n")
    print(markdown_table(rows, list(COLUMNS), ["layer", *SHAPES]))
    path = args.out_dir / f"adc_range_shapes-adc{args.adc_bits}.csv"
    from cimq_pl.cost.tables import write_csv_atomic

    write_csv_atomic(path, rows, COLUMNS)
    print(f"\nwrote {path}")
    if args.test_batches:
        rows += accuracy_with_rechosen_ranges(built, layers, images, args)
    return rows


def accuracy_with_rechosen_ranges(built, layers, images: torch.Tensor, args) -> list[dict]:
    """Top-1 of the network with its learned ranges and with every column's range chosen again, symmetric and
    asymmetric (`swapped_conversions`), on ``--test-batches`` test batches; one table row each."""
    built.trainer.limit_test_batches = 1.0 if args.test_batches == -1 else args.test_batches

    def accuracy() -> float:
        built.trainer.test(built.model, datamodule=built.datamodule, verbose=False)
        return round(float(built.trainer.callback_metrics["test/acc"]), 4)

    rows = [{"ranges": "as the checkpoint learned them", "test/acc": accuracy()}]
    for shape, asymmetric in (("symmetric", False), ("asymmetric", True)):
        with swapped_conversions(layers, images, built.model.model, args.adc_bits, asymmetric, args.points):
            rows.append({"ranges": f"chosen again per column on the traced images, {shape}", "test/acc": accuracy()})
        print(f"[bench] {rows[-1]['ranges']}: {rows[-1]['test/acc']}", flush=True)
    print(f"\n**Test accuracy with ADC ranges chosen again** (ADC {args.adc_bits}, "
          f"{'all' if args.test_batches == -1 else args.test_batches * 16} test images)\n")
    print(markdown_table(rows, ["ranges", "test/acc"], ["ADC ranges", "test top-1"]))
    from cimq_pl.cost.tables import write_csv_atomic

    path = args.out_dir / f"adc_range_shapes-adc{args.adc_bits}-test.csv"
    write_csv_atomic(path, rows, ("ranges", "test/acc"))
    print(f"\nwrote {path}")
    return rows


if __name__ == "__main__":
    main()
