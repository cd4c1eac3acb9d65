"""What asymmetric ADC ranges cost the compiled CIM layer: forward + backward against symmetric ranges.

For every distinct 3x3 conv shape of ResNet-20 (`cim_layer_speed.RESNET20_CONV_SHAPES`), a CIM layer on the
compiled path (`cimq_pl.quant.fused`) with per-column ADC ranges at ``--adc-bits`` (2), 128x128 arrays, W4A4,
is timed for forward + backward at ``--batch`` images (128, QAT's) in three variants:

* ``symmetric``: `PsumQuantizer` ranges without offsets (the reference of the ratios);
* ``asymmetric``: with a learned offset per range (``PartialSumClipping(asymmetric: true)``);
* ``asymmetric, Inductor defaults``: the same, its backward kernel compiled without
  `fused._ASYMMETRIC_BACKWARD_OPTIONS` (Inductor's default ``realize_reads_threshold`` of 4, under which the ADC
  codes, read from five tensors, are stored and read back instead of recomputed: the kernel before session 36).

``--frozen-weights`` leaves the weights out of the backward pass, as QAT that learns only the quantizers does
(`low_adc_qat.py --objective distill-quantizers`). The variants alternate within each of ``--rounds`` rounds and
each keeps its fastest of ``--repeats`` timed calls per round, then its median over the rounds, so that a slow
spell of a shared machine falls on every variant alike. Prints one table (ms, ratios to symmetric, and whether the two asymmetric variants give the same output and
gradients, to float32 rounding: rtol 1e-5).

    python benchmarks/adc_range_speed.py                    # ~2 min on 2 cores
    python benchmarks/adc_range_speed.py --frozen-weights   # QAT of the quantizers alone
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from torch import nn

from cim_layer_speed import RESNET20_CONV_SHAPES
from cimq_pl.quant import CIMConv2d, CIMSpec, QuantizerOptions, fused
from runner import machine, markdown_table

VARIANTS = ("symmetric", "asymmetric", "asymmetric, Inductor defaults")


def build(shape, adc_bits: int, asymmetric: bool, frozen_weights: bool, batch: int):
    """A calibrated compiled CIM layer of ``shape`` (in, out, stride, size) in training mode and its input."""
    c_in, c_out, stride, size = shape
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
    spec = CIMSpec(rows=128, cols=128, weight_bits=4, input_bits=4, adc_bits=adc_bits)
    layer = CIMConv2d.from_conv(conv, spec, QuantizerOptions(psum_granularity="column",
                                                             weight_granularity="array_channel",
                                                             psum_asymmetric=asymmetric))
    x = torch.rand(batch, c_in, size, size)
    with torch.no_grad():
        layer(x)  # calibration
    layer.simulation = "compiled"
    layer.train()
    layer.weight.requires_grad_(not frozen_weights)
    return layer, x


def step_ms(layer, x, repeats: int) -> float:
    """Fastest forward + backward of ``repeats`` calls, ms."""
    best = float("inf")
    for _ in range(repeats):
        inputs = x.clone().requires_grad_(True)
        start = time.perf_counter()
        layer(inputs).sum().backward()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


@contextlib.contextmanager
def backward_options(variant: str):
    """The asymmetric backward kernel's compile options of ``variant`` (Inductor's defaults for the last one),
    put back afterwards."""
    options = fused._ASYMMETRIC_BACKWARD_OPTIONS
    fused._ASYMMETRIC_BACKWARD_OPTIONS = None if variant == VARIANTS[-1] else options
    try:
        yield
    finally:
        fused._ASYMMETRIC_BACKWARD_OPTIONS = options


def outputs_and_gradients(layer, x) -> tuple:
    """(output, input gradient, ADC offset gradient) of one forward + backward on ``x``."""
    layer.zero_grad()
    inputs = x.clone().requires_grad_(True)
    out = layer(inputs)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    return out.detach(), inputs.grad, layer.psum_quantizer.offset.grad.clone()


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adc-bits", type=int, default=2, help="ADC resolution (2)")
    parser.add_argument("--batch", type=int, default=128, help="images per call (128, QAT's)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over the variants (3)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per variant and round (5)")
    parser.add_argument("--frozen-weights", action="store_true", help="no weight gradients (QAT of the quantizers)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--smoke", action="store_true", help="one small shape, batch 4, one round of one call")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = RESNET20_CONV_SHAPES[:1] if args.smoke else RESNET20_CONV_SHAPES
    if args.smoke:
        args.batch, args.rounds, args.repeats = 4, 1, 1
    rows = []
    for shape in shapes:
        layers = {variant: build(shape, args.adc_bits, variant != "symmetric", args.frozen_weights, args.batch)
                  for variant in VARIANTS}
        times = {variant: [] for variant in VARIANTS}
        for round_index in range(args.rounds):
            order = VARIANTS if round_index % 2 == 0 else VARIANTS[::-1]
            for variant in order:
                with backward_options(variant):
                    layer, x = layers[variant]
                    step_ms(layer, x, 2)  # compilation and warm-up
                    times[variant].append(step_ms(layer, x, args.repeats))
        medians = {variant: statistics.median(values) for variant, values in times.items()}
        results = []
        for variant in VARIANTS[1:]:  # the compile option changes where values are stored, never a value
            with backward_options(variant):
                results.append(outputs_and_gradients(*layers[variant]))
        row = {"shape": "{}->{} s{} {}x{}".format(*shape[:3], shape[3], shape[3]),
               "same values": all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(*results))}
        for variant in VARIANTS:
            row[f"{variant} ms"] = round(medians[variant], 1)
        for variant in VARIANTS[1:]:
            row[f"{variant} / symmetric"] = round(medians[variant] / medians["symmetric"], 2)
        rows.append(row)
        print(row, flush=True)
    weights = "frozen weights" if args.frozen_weights else "weights learning"
    print(f"\n**Compiled CIM layer forward + backward, ADC {args.adc_bits}, per-column ranges, batch {args.batch}, "
          f"{weights}** ({args.rounds} rounds, median of each variant's fastest of {args.repeats}); {machine()}\n")
    columns = list(rows[0])
    print(markdown_table(rows, columns, columns))
    return rows


if __name__ == "__main__":
    main()
