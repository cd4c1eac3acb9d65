"""How close the PTQ step's array convolutions are to this CPU's limit, and what one idea to shrink them costs.

A compiled PTQ step is mostly array convolutions (README, "Simulation paths"). For the convolutions of ResNet-20's
row-block parts at the PTQ batch (32 images x 4 input cycles), this prints per layout (channels-last, NCHW):
the forward of the 128 digit images, the weight gradient over them, the input gradient of the 32 images, each in
ms and GFLOP/s, beside the GFLOP/s of a large ``torch.mm`` (the machine's practical peak) measured in the same run.

It also times the weight gradient written as "codes plus a sparse clipping correction": with a straight-through
ADC the gradient of cycle j is ``w_j g`` where the ADC does not clip, so

    dW = conv_wgrad(codes, g) - sum_j w_j conv_wgrad(d_j, g * clipped_j)

(`sparse_weight_gradient`, checked against the per-cycle gradient by ``tests/benchmark_scripts``), whose dense part
is one image batch instead of four, and whose correction is a gather over the clipped partial sums only (here in
PyTorch operators; the compiled path uses the split only where the ADC is ideal and nothing clips, README).

    python benchmarks/conv_work.py                 # ~1 min on 2 cores
    python benchmarks/conv_work.py --clip 0.015    # fraction of partial sums the ADC clips (1.1-1.8% seen in a PTQ fit)
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from runner import base_parser, machine, markdown_table, mean_ms

# (input channels, output columns, H = W, groups, stride) of the row-block parts of ResNet-20 on 128x128 arrays,
# W4A4 (the shapes the compiled PTQ step convolves; groups = row blocks of the part)
SHAPES = [(14, 16, 32, 1, 1), (2, 16, 32, 1, 1), (14, 32, 32, 1, 2), (28, 64, 16, 2, 1), (4, 32, 16, 1, 1),
          (28, 128, 16, 2, 2), (56, 256, 8, 4, 1), (8, 64, 8, 1, 1)]
CYCLE_WEIGHTS = (8.0, 4.0, 2.0, 1.0)


def matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of a ``size``-square float32 ``torch.mm``."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    return 2 * size**3 / mean_ms(lambda: a @ b, repeats) / 1e6


def _conv_backward(grad, digits, weight, stride: int, groups: int, which: int):
    """One gradient of a padding-1 convolution: ``which`` 0 = input, 1 = weight."""
    args = (None, [stride, stride], [1, 1], [1, 1], False, [0, 0], groups)
    return torch.ops.aten.convolution_backward(grad, digits, weight, *args, [which == 0, which == 1, False])[which]


def _wgrad(grad, digits, weight, stride: int, groups: int):
    return _conv_backward(grad, digits, weight, stride, groups, 1)


def cycle_codes(digits: torch.Tensor) -> torch.Tensor:
    """The codes ``sum_j w_j d_j`` of per-cycle digits (n_cycles, N, C, H, W)."""
    weights = torch.tensor(CYCLE_WEIGHTS[: digits.shape[0]], dtype=digits.dtype)
    return (digits * weights.view(-1, 1, 1, 1, 1)).sum(0)


def sparse_weight_gradient(digits, grad_u, clipped, weight, stride: int = 1):
    """The weight gradient of a stride-``stride``, padding-1, 3x3 array convolution under a straight-through ADC,
    from the codes plus a correction at the clipped partial sums (ungrouped).

    Args:
        digits: (n_cycles, N, C, H, W) input digits of each cycle.
        grad_u: (N, K, H_out, W_out) gradient of the cycle-summed partial sums.
        clipped: (n_cycles, N, K, H_out, W_out) where the ADC clipped.
        weight: (K, C, 3, 3), for the layout only.
    """
    n_cycles, n, c, h, w = digits.shape
    k, h_out, w_out = grad_u.shape[1], grad_u.shape[2], grad_u.shape[3]
    cycle_w = torch.tensor(CYCLE_WEIGHTS[:n_cycles], dtype=digits.dtype)
    dense = _wgrad(grad_u, cycle_codes(digits), weight, stride, 1)
    index = clipped.permute(0, 1, 3, 4, 2).reshape(-1).nonzero().squeeze(1)  # (cycle, image, y, x, column)
    column = index % k
    rest = index // k
    x_out, rest = rest % w_out, rest // w_out
    y_out, cycle_image = rest % h_out, rest // h_out
    values = grad_u.permute(0, 2, 3, 1).reshape(-1)[((cycle_image % n) * h_out + y_out) * w_out * k + x_out * k + column]
    values = values * cycle_w[cycle_image // n]
    ky, kx = torch.arange(3).repeat_interleave(3), torch.arange(3).repeat(3)
    y_in, x_in = y_out[:, None] * stride - 1 + ky, x_out[:, None] * stride - 1 + kx
    inside = (y_in >= 0) & (y_in < h) & (x_in >= 0) & (x_in < w)
    rows = (cycle_image[:, None] * h + y_in.clamp(0, h - 1)) * w + x_in.clamp(0, w - 1)
    patches = digits.permute(0, 1, 3, 4, 2).reshape(-1, c)[rows] * (inside * values[:, None]).unsqueeze(-1)
    one_hot = F.one_hot(column, k).T.to(patches.dtype)
    correction = (one_hot @ patches.reshape(len(column), -1)).view(k, 3, 3, c).permute(0, 3, 1, 2)
    return dense - correction


def shape_rows(batch: int, repeats: int, clip: float, shapes=SHAPES) -> list[dict]:
    """Per shape and layout: times and GFLOP/s; for ungrouped channels-last shapes also the weight gradient from
    the codes alone and with the correction in PyTorch operators."""
    torch.manual_seed(0)
    rows = []
    for cin, cout, size, groups, stride in shapes:
        images = batch * len(CYCLE_WEIGHTS)
        for layout in ("channels_last", "nchw"):
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            digits = (torch.rand(images, cin, size, size) < 0.3).float().contiguous(memory_format=fmt)
            weight = torch.randint(-7, 8, (cout, cin // groups, 3, 3)).float().contiguous(memory_format=fmt)
            out = F.conv2d(digits, weight, None, stride, 1, 1, groups)
            grad = torch.randn_like(out).contiguous(memory_format=fmt)
            flops = 2 * out.numel() * (cin // groups) * 9  # one multiply-add per weight per output
            forward = mean_ms(lambda: F.conv2d(digits, weight, None, stride, 1, 1, groups), repeats)
            weight_grad = mean_ms(lambda: _wgrad(grad, digits, weight, stride, groups), repeats)
            input_grad = mean_ms(lambda: _conv_backward(grad[:batch], digits[:batch], weight, stride, groups, 0),
                                 repeats)
            row = {"shape": f"{cin}->{cout}, g{groups}, s{stride}, {size}x{size}", "layout": layout,
                   "forward_ms": round(forward, 2), "forward_gflops": round(flops / forward / 1e6, 1),
                   "wgrad_ms": round(weight_grad, 2), "wgrad_gflops": round(flops / weight_grad / 1e6, 1),
                   "igrad_ms": round(input_grad, 2)}
            if layout == "channels_last" and groups == 1 and clip > 0:
                stacked = digits.view(len(CYCLE_WEIGHTS), batch, cin, size, size)
                grad_u = torch.randn(batch, *out.shape[1:])
                clipped = torch.rand(len(CYCLE_WEIGHTS), *grad_u.shape) < clip
                codes = cycle_codes(stacked).contiguous(memory_format=fmt)
                row["codes_wgrad_ms"] = round(mean_ms(lambda: _wgrad(grad_u, codes, weight, stride, 1), repeats), 2)
                row["sparse_wgrad_ms"] = round(mean_ms(lambda: sparse_weight_gradient(stacked, grad_u, clipped, weight,
                                                                                      stride), max(1, repeats // 4)), 2)
            rows.append(row)
    return rows


COLUMNS = ["shape", "layout", "forward_ms", "forward_gflops", "wgrad_ms", "wgrad_gflops", "igrad_ms", "codes_wgrad_ms",
           "sparse_wgrad_ms"]
HEADERS = ["conv (part)", "layout", "forward ms", "forward GFLOP/s", "weight grad ms", "weight grad GFLOP/s",
           "input grad ms (N)", "weight grad from codes ms (N)", "codes + correction in PyTorch ops ms"]


def main(argv: Optional[list[str]] = None) -> list[dict]:
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32, help="images per PTQ step (32: the preset's)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per number (their mean; 10)")
    parser.add_argument("--clip", type=float, default=0.015, help="fraction of partial sums clipped (0.015)")
    args = parser.parse_args(argv)
    shapes = SHAPES[:2] if args.smoke else SHAPES
    batch, repeats = (2, 1) if args.smoke else (args.batch, args.repeats)
    size = 256 if args.smoke else 2048
    peak = matmul_gflops(size, 1 if args.smoke else 5)
    rows = shape_rows(batch, repeats, args.clip, shapes)
    print(f"\nArray convolutions of a PTQ step ({batch} images x 4 cycles), {machine()}; "
          f"torch.mm {size}^2: {peak:.0f} GFLOP/s\n")
    print(markdown_table(rows, COLUMNS, HEADERS))
    return rows


if __name__ == "__main__":
    main()
