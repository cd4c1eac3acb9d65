"""Memory layouts of 4-D activations: which are channels-last (NHWC memory), and gathers that keep the layout."""

from __future__ import annotations

import torch

__all__ = ["is_channels_last", "select_rows"]


def is_channels_last(tensor: torch.Tensor) -> bool:
    """Whether a tensor is 4-D and stored channels-last, not also plain contiguous (as one-channel tensors are)."""
    return tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last) and not tensor.is_contiguous()


def select_rows(tensor: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``tensor[indices]`` (the batch entries ``indices``) in ``tensor``'s own layout: ``index_select`` returns plain
    contiguous memory, so a channels-last tensor is gathered through its NHWC view (no transposing copy)."""
    if is_channels_last(tensor):
        return tensor.permute(0, 2, 3, 1).index_select(0, indices).permute(0, 3, 1, 2)
    return tensor.index_select(0, indices)
