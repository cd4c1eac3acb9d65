"""What compiling the weight side of a CIM layer would give a PTQ step: measured, per ResNet-20 layer shape.

In a compiled PTQ step (README, "Simulation paths") the kernels after the array convolutions are compiled, but the
weight side runs eagerly: the AdaRound soft codes (``w / s``, the rectified sigmoid, floor, clamp), the cut into cell
slices, each row-block part's array weight and the shift-add coefficients, forward and backward. For every
ResNet-20 CIM layer shape on 128x128 arrays (W4A4, the preset's ``array_channel`` weight scales, AdaRound, per-column
ADC ranges) this prints, at the PTQ batch:

- ``layer step``: the whole layer's forward + backward on the compiled path (weight side included);
- ``weight side eager`` / ``compiled``: the weight side alone, forward + backward, as the layer runs it and under
  ``torch.compile`` (Inductor), and the compiled result's largest difference from the eager one;
- ``compile s``: the first compiled call (Dynamo + Inductor), the cost a fit pays once per kernel.

    python benchmarks/weight_side.py          # ~1.5 min on 2 cores
"""

from __future__ import annotations

import time
from typing import Optional

import torch
from torch import nn

from runner import base_parser, machine, markdown_table, mean_ms

from cimq_pl.quant import CIMSpec, QuantizerOptions
from cimq_pl.quant.calibrate import calibrate_
from cimq_pl.quant.layers import CIMConv2d

# (input channels, output channels, input H = W, stride) of ResNet-20's CIM convolutions (the int8 first conv and
# classifier are not on the 4-bit arrays)
SHAPES = [(16, 16, 32, 1), (16, 32, 32, 2), (32, 32, 16, 1), (32, 64, 16, 2), (64, 64, 8, 1)]
OPTIONS = QuantizerOptions(weight_granularity="array_channel", weight_rounding="adaround", psum_granularity="column")
COLUMNS = ["shape", "layer_ms", "eager_ms", "compiled_ms", "share", "saved_share", "compile_s", "max_diff"]
HEADERS = ["layer (C_in->C_out, H, stride)", "layer step ms", "weight side eager ms", "compiled ms",
           "weight side / layer step", "saved / layer step", "compile s", "max |compiled - eager|"]


def weight_side(layer: CIMConv2d) -> list:
    """The layer's array weights of every row-block part and their shift-add coefficients, as `simulate` builds
    them in training (soft AdaRound codes)."""
    step, codes, slices, slice_weights, ref_digit, _ = layer.weight_cells(exact=False)
    n_ref = layer.geometry.n_col_blocks if ref_digit else 0
    outputs = []
    for index in range(len(layer.parts)):
        coefficients = layer._shift_add_coefficients(index, step, slice_weights, n_ref, codes.dtype, codes.device)
        outputs += [layer._part_weight(slices, index, ref_digit), *(c for c in coefficients if c is not None)]
    return outputs


def _backward(outputs: list) -> None:
    sum(output.sum() for output in outputs).backward()


def shape_row(shape: tuple, batch: int, repeats: int) -> dict:
    """One layer shape's timings (module docstring)."""
    c_in, c_out, size, stride = shape
    torch.manual_seed(0)
    layer = CIMConv2d.from_conv(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1),
                                CIMSpec(rows=128, cols=128, weight_bits=4, input_bits=4, adc_bits=4), OPTIONS)
    inputs = torch.relu(torch.randn(batch, c_in, size, size))
    calibrate_(layer, [(inputs,)])
    layer.train()
    layer.simulation = "compiled"

    def layer_step():
        layer(inputs.clone().requires_grad_()).sum().backward()

    torch._dynamo.reset()  # the compile column counts this shape's own compilation
    compiled = torch.compile(weight_side, fullgraph=True)
    start = time.perf_counter()
    _backward(compiled(layer))
    compile_seconds = time.perf_counter() - start
    with torch.no_grad():
        difference = max((a - b).abs().max().item() for a, b in zip(compiled(layer), weight_side(layer)))
    layer_ms = mean_ms(layer_step, repeats)
    eager_ms = mean_ms(lambda: _backward(weight_side(layer)), repeats)
    compiled_ms = mean_ms(lambda: _backward(compiled(layer)), repeats)
    return {"shape": f"{c_in}->{c_out}, {size}, {stride}", "layer_ms": f"{layer_ms:.2f}", "eager_ms": f"{eager_ms:.3f}",
            "compiled_ms": f"{compiled_ms:.3f}", "share": f"{eager_ms / layer_ms:.1%}",
            "saved_share": f"{(eager_ms - compiled_ms) / layer_ms:.1%}", "compile_s": f"{compile_seconds:.1f}",
            "max_diff": f"{difference:.1e}", "difference": difference}


def main(argv: Optional[list[str]] = None) -> list[dict]:
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32, help="images per PTQ step (32: the preset's)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per number (their mean; 20)")
    args = parser.parse_args(argv)
    shapes = SHAPES[:1] if args.smoke else SHAPES
    batch, repeats = (2, 1) if args.smoke else (args.batch, args.repeats)
    rows = [shape_row(shape, batch, repeats) for shape in shapes]
    print(f"\nWeight side of a CIM layer's PTQ step ({batch} images, forward + backward), {machine()}\n")
    print(markdown_table(rows, COLUMNS, HEADERS))
    return rows


if __name__ == "__main__":
    main()
