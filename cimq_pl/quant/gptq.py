"""GPTQ/OPTQ rounding of CIM weights (Frantar et al., ICLR 2023) with the crossbar tiling's fixed steps.

For one conv group, with weights W (outputs x rows, rows = the unrolled inputs C_in/g x k_h x k_w) and the
input Hessian H = X X^T / n (`cimq_pl.quant.hessian`), GPTQ quantizes the input rows one after the other and
moves each one's rounding error onto the rows not yet quantized, along H^-1, so that ||W X - Q X||^2 stays
small (round-to-nearest minimises ||W - Q||^2 instead):

* dead inputs (H_ii = 0) get H_ii = 1 and weight 0; H += damp x mean(diag H) x I;
* U = the upper Cholesky factor of H^-1; for row j: q_j = s_j clamp(round(w_j / s_j), qmin, qmax),
  err_j = (w_j - q_j) / U_jj, w_k -= err_j U_jk for every later row k (lazily, in blocks of ``block_size``
  rows: exactly the same maths, fewer passes over W).

The steps s are the quantizer's, fixed, one per weight element (`WeightQuantizer.element_step`): with ``array``
or ``array_channel`` granularity they change from row block to row block (arrays stacked along the rows) and
from column block to column block, so the tiling is respected by construction. The row blocks are contiguous
ranges of the unrolled rows (`TileGeometry.row_block_of_row`), so rows are processed in their natural order,
array by array; the error of one array's rows is also compensated on the later arrays' rows, since all row
blocks of a column add up (digitally) into the same output.

`gptq_weights` returns W', the value GPTQ rounds at each row (after the earlier rows' compensation): its
round-to-nearest codes are GPTQ's. `gptq_layer_` stores ``W' - W`` in the layer's weight quantizer
(`WeightQuantizer.compensate_`); the layer's weights stay the float ones. `gptq_` runs a model over calibration
batches to collect the Hessians of its layers and does it for all of them: one forward pass plus, per layer,
one Cholesky and one pass over the rows (float64) - seconds for a CIFAR ResNet.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import nn

from cimq_pl.quant.hessian import collecting_hessians
from cimq_pl.quant.layers import cim_layers

__all__ = ["DEFAULT_BLOCK_SIZE", "DEFAULT_DAMP", "GPTQReport", "forward_batch", "gptq_", "gptq_layer_", "gptq_weights",
           "uses_gptq"]

#: Dampening of the Hessian, relative to the mean of its diagonal (GPTQ's ``percdamp``).
DEFAULT_DAMP = 0.01
#: Rows per lazy batch update (GPTQ's ``blocksize``); changes the speed, not the result.
DEFAULT_BLOCK_SIZE = 128


@torch.no_grad()
def gptq_weights(
    weight: torch.Tensor,
    step: torch.Tensor,
    code_range: tuple,
    hessian: torch.Tensor,
    damp: float = DEFAULT_DAMP,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> torch.Tensor:
    """GPTQ's compensated pre-rounding weights W' of one layer (float64), all conv groups at once.

    Args:
        weight: (C_out, C_in/g, k_h, k_w) float weights (a linear layer's (C_out, C_in, 1, 1)).
        step: the step of every weight element, same shape (`WeightQuantizer.element_step`).
        code_range: (qmin, qmax) of the signed integer codes.
        hessian: (groups, rows, rows) input Hessian, rows = C_in/g x k_h x k_w in the weight's flattened order.
        damp: dampening, a fraction of the mean diagonal of H added to the diagonal.
        block_size: rows per lazy batch update.

    Returns:
        W', float64, shape of ``weight``: ``clamp(round(W' / step), qmin, qmax)`` are GPTQ's codes.

    Raises:
        ValueError: on shapes that do not fit, or a bad ``damp``/``block_size``.
    """
    groups, rows = hessian.shape[0], hessian.shape[-1]
    if hessian.shape != (groups, rows, rows) or weight[0].numel() != rows or weight.shape[0] % groups:
        raise ValueError(f"hessian {tuple(hessian.shape)} does not fit weight {tuple(weight.shape)}: expected "
                         "(groups, rows, rows) with rows = C_in/g x k_h x k_w")
    if step.shape != weight.shape:
        raise ValueError(f"step {tuple(step.shape)} must have the weight's shape {tuple(weight.shape)}")
    if not damp >= 0 or isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"damp={damp!r} must be >= 0 and block_size={block_size!r} an integer >= 1")
    qmin, qmax = code_range
    shape = (groups, weight.shape[0] // groups, rows)
    work = weight.detach().to(torch.float64).reshape(shape).clone()  # (G, outputs, rows), rows compensated in place
    steps = step.detach().to(torch.float64).reshape(shape)
    upper = _inverse_cholesky(hessian.to(torch.float64), work, damp)
    compensated = torch.empty_like(work)
    for first in range(0, rows, block_size):
        last = min(first + block_size, rows)
        block = work[..., first:last].clone()
        errors = torch.zeros_like(block)
        corner = upper[:, first:last, first:last]
        for i in range(last - first):
            w = block[..., i]  # (G, outputs)
            compensated[..., first + i] = w
            s = steps[..., first + i]
            err = (w - torch.clamp(torch.round(w / s), qmin, qmax) * s) / corner[:, i, i].unsqueeze(-1)
            block[..., i:] -= err.unsqueeze(-1) * corner[:, i, i:].unsqueeze(1)
            errors[..., i] = err
        work[..., last:] -= errors @ upper[:, first:last, last:]
    return compensated.reshape(weight.shape)


def _inverse_cholesky(hessian: torch.Tensor, work: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of the dampened H^-1, (G, rows, rows); zeroes ``work``'s dead rows (H_ii = 0)."""
    hessian = hessian.clone()
    diagonal = torch.diagonal(hessian, dim1=-2, dim2=-1)  # a view: writes reach ``hessian``
    dead = diagonal == 0
    diagonal[dead] = 1.0
    work.masked_fill_(dead.unsqueeze(1), 0.0)
    diagonal += damp * diagonal.mean(-1, keepdim=True)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(hessian))
    return torch.linalg.cholesky(inverse, upper=True)


def uses_gptq(layer: nn.Module) -> bool:
    """Whether ``layer``'s weights are rounded by GPTQ at calibration (an enabled ``rounding="gptq"`` quantizer)."""
    quantizer = getattr(layer, "weight_quantizer", None)
    return quantizer is not None and quantizer.enabled and quantizer.rounding == "gptq"


@torch.no_grad()
def gptq_layer_(layer: nn.Module, hessian: torch.Tensor, damp: float = DEFAULT_DAMP,
                block_size: int = DEFAULT_BLOCK_SIZE) -> None:
    """GPTQ of CIM ``layer`` with its weight quantizer's current steps: stores ``W' - W`` as the quantizer's
    compensation (`WeightQuantizer.compensate_`), replacing any earlier one; the weights are not changed."""
    quantizer = layer.weight_quantizer
    weight = layer._weight4d()
    compensated = gptq_weights(weight, quantizer.element_step(), quantizer.code_range, hessian, damp, block_size)
    quantizer.compensate_(weight, compensated)


def forward_batch(model: nn.Module, batch) -> object:
    """The default ``forward_fn`` of calibration passes: ``model(batch[0])`` for tuples/lists, else ``model(batch)``."""
    return model(batch[0] if isinstance(batch, (tuple, list)) else batch)


@dataclass(frozen=True)
class GPTQReport:
    """What `gptq_` did: the layers it rounded and the wall time (seconds: forward pass + GPTQ)."""

    layers: tuple
    seconds: float

    def describe(self) -> str:
        return f"GPTQ rounding of {len(self.layers)} CIM layers in {self.seconds:.1f} s"


@torch.no_grad()
def gptq_(
    model: nn.Module,
    batches: Iterable,
    forward_fn: Optional[Callable[[nn.Module, object], object]] = None,
    layers: Optional[Sequence[str]] = None,
    damp: float = DEFAULT_DAMP,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> GPTQReport:
    """GPTQ-round CIM layers of ``model`` in place: one pass over ``batches`` collects every layer's input Hessian
    (its quantized inputs in the network as it is now), then `gptq_layer_` on each.

    The Hessians come from one forward pass, not from a pass per layer: a layer's inputs are those of the
    network before any layer was compensated (GPTQ's paper re-runs the network layer by layer). The steps must
    be initialised (`calibrate_` calls this between its weight/input and its ADC calibration).

    Args:
        model: a converted model (or a block of one; ``forward_fn`` runs it).
        batches: a re-iterable of batches.
        forward_fn: ``forward_fn(model, batch)``; default ``model(batch[0])`` for tuples/lists, else ``model(batch)``.
        layers: names (as in `cim_layers(model)`) of the layers to round; default every layer that `uses_gptq`.
        damp: Hessian dampening (fraction of its mean diagonal).
        block_size: rows per lazy batch update.
    """
    start = time.perf_counter()
    forward_fn = forward_fn or forward_batch
    chosen = {name: layer for name, layer in cim_layers(model) if layer.weight_quantizer is not None
              and (uses_gptq(layer) if layers is None else name in layers)}
    if chosen:
        with collecting_hessians(chosen) as accumulators:
            for batch in batches:
                forward_fn(model, batch)
        for name, layer in chosen.items():
            gptq_layer_(layer, accumulators[name].compute(), damp, block_size)
    return GPTQReport(tuple(chosen), time.perf_counter() - start)
