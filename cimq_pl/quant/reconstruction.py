"""Block-wise reconstruction pieces (BRECQ / QDrop), pure PyTorch.

* :func:`find_blocks` splits any model into reconstruction units generically: containers
  (``nn.Sequential``, ``nn.ModuleList``, ``nn.ModuleDict`` and the model itself) are opened, and every other
  module holding at least one quantized layer is one unit (a residual block of a timm ResNet, an inverted
  residual of a MobileNet, a lone stem conv or classifier). No per-model table.
* :func:`capture_block_io` runs a model and returns what flows into and out of one unit, stopping the
  forward right after it.
* :func:`chained_units` tells which units take the previous unit's output unchanged as their input, so that a
  unit's input can be computed from the previous unit's alone instead of from the whole network before it.
* :class:`RoundingSchedule` anneals AdaRound's beta (20 -> 2 after a 20% warm-up, as in AdaRound/BRECQ).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

__all__ = [
    "RoundingSchedule",
    "capture_block_input",
    "capture_block_io",
    "chained_units",
    "eval_mode",
    "find_blocks",
    "float_mode",
]

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def find_blocks(model: nn.Module, is_quantized: Callable[[nn.Module], bool]) -> list[tuple[str, nn.Module]]:
    """Reconstruction units of ``model`` in execution (registration) order.

    Args:
        model: the network.
        is_quantized: predicate telling which modules are quantized layers.

    Returns:
        ``(qualified name, module)`` pairs; every quantized layer belongs to exactly one unit.
    """

    def holds_quantized(module: nn.Module) -> bool:
        return any(is_quantized(m) for m in module.modules())

    def walk(prefix: str, module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        for name, child in module.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if not holds_quantized(child):
                continue
            if isinstance(child, _CONTAINERS) and not is_quantized(child):
                yield from walk(full, child)
            else:
                yield full, child

    return list(walk("", model))


class _StopForward(Exception):
    pass


def _run_to_block(model: nn.Module, block: nn.Module, images: torch.Tensor, through_block: bool, stop: bool = True):
    """Run ``model(images)`` and return ``block``'s ``(input, output or None)``; stop there if ``stop``."""
    seen: dict[str, torch.Tensor] = {}

    def before(_module, args):
        seen["input"] = args[0].detach()
        if not through_block:
            raise _StopForward

    def after(_module, args, output):
        seen["output"] = output.detach()
        if stop:
            raise _StopForward

    handles = [block.register_forward_pre_hook(before)]
    if through_block:
        handles.append(block.register_forward_hook(after))
    try:
        model(images)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if "input" not in seen:
        raise RuntimeError(f"{type(block).__name__} did not run in the model's forward")
    return seen["input"], seen.get("output")


def capture_block_io(
    model: nn.Module, block: nn.Module, images: torch.Tensor, stop: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model(images)`` and return ``(input, output)`` of ``block`` (its first positional argument).

    Args:
        model: the network containing ``block``.
        block: the unit to observe; it must run exactly once per forward.
        images: the model input.
        stop: end the forward right after ``block`` (saves the rest of the network).
    """
    return _run_to_block(model, block, images, through_block=True, stop=stop)


def capture_block_input(model: nn.Module, block: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Run ``model(images)`` up to ``block`` and return the block's input; ``block`` itself does not run."""
    return _run_to_block(model, block, images, through_block=False)[0]


@torch.no_grad()
def chained_units(model: nn.Module, blocks: list[tuple[str, nn.Module]], images: torch.Tensor) -> list[bool]:
    """For every unit of ``blocks``, whether its input is exactly the previous unit's output in ``model(images)``.

    Entry ``k`` is True when unit ``k``'s first positional input equals (same shape, same values) what unit
    ``k - 1`` returned, i.e. nothing runs between them (a residual stage's blocks); False for the first unit and
    wherever something does (an activation or pooling between a stem and the first block, a classifier's pooling).
    One forward of ``images`` in ``model``'s current mode; a structural property, so a few images suffice.
    """
    inputs: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}

    def keep(store: dict, index: int, tensor) -> None:  # copies: a later in-place op (ReLU) must not change them
        if index not in store and isinstance(tensor, torch.Tensor):
            store[index] = tensor.detach().clone()

    handles = []  # the hooks return None: a returned value would replace the block's input or output
    for index, (_, block) in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(lambda _m, args, i=index: keep(inputs, i, args[0])))
        handles.append(block.register_forward_hook(lambda _m, _args, output, i=index: keep(outputs, i, output)))
    try:
        model(images)
    finally:
        for handle in handles:
            handle.remove()

    def chained(index: int) -> bool:
        before, now = outputs.get(index - 1), inputs.get(index)
        return index > 0 and before is not None and now is not None and before.shape == now.shape and torch.equal(
            before, now)

    return [chained(index) for index in range(len(blocks))]


@dataclass(frozen=True)
class RoundingSchedule:
    """AdaRound regulariser schedule over ``steps`` steps of one block.

    The rounding loss is off during the first ``warmup`` fraction; then beta decays linearly from
    ``beta_start`` to ``beta_end`` (AdaRound / BRECQ's temperature decay).
    """

    steps: int
    warmup: float = 0.2
    beta_start: float = 20.0
    beta_end: float = 2.0

    def active(self, step: int) -> bool:
        """Whether the rounding loss counts at ``step`` (0-based, within the block)."""
        return step >= self.warmup * self.steps

    def beta(self, step: int) -> float:
        """Beta at ``step``: ``beta_start`` until warm-up ends, then decaying to ``beta_end``."""
        start = self.warmup * self.steps
        if step <= start:
            return self.beta_start
        progress = min(1.0, (step - start) / max(1.0, self.steps - start))
        return self.beta_end + (self.beta_start - self.beta_end) * (1.0 - progress)


@contextlib.contextmanager
def float_mode(model: nn.Module) -> Iterator[None]:
    """Run ``model`` as the float network: every quantizer of every CIM layer disabled, restored on exit."""
    from cimq_pl.quant.layers import iter_quantizers

    saved = [(q, q.enabled) for *_, q in iter_quantizers(model)]
    try:
        for quantizer, _ in saved:
            quantizer.enabled = False
        yield
    finally:
        for quantizer, enabled in saved:
            quantizer.enabled = enabled


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """``module.eval()`` inside the block, the previous train/eval flags of every submodule restored after."""
    saved = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        yield
    finally:
        for m, training in saved:
            m.training = training
