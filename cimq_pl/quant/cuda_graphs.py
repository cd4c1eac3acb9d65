"""Replay a model's evaluation from one CUDA graph: one launch per batch instead of one per kernel.

A CIM layer launches dozens of small kernels (ADC, shift-add, scales) per convolution; at small batches on a GPU the
launches cost more than the work. `record_forward` records ``model(images)`` once, without gradients, and returns a
function that replays it on new images of the same shape and dtype. What it records must read no tensor value on
the host (`cimq_pl.quant.host_syncs.HostSyncCounter` counts such reads; the eager path's evaluation has none).
The replay reads the parameters and buffers where they were when it recorded: changing them in place is seen,
replacing them (or a module's Python settings) needs a new recording.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from cimq_pl.errors import ConfigError

__all__ = ["record_forward"]


def record_forward(model: nn.Module, images: torch.Tensor, warmup: int = 3) -> Callable[[torch.Tensor], torch.Tensor]:
    """Record ``model(images)`` (no gradients) into a CUDA graph; returns ``replay(batch)``, which copies ``batch``
    (the shape and dtype of ``images``) into the graph's input and returns the graph's output tensor, overwritten by
    the next replay (clone it to keep it).

    ``warmup`` batches run first on a side stream, as a capture asks (lazy buffers, cuDNN plans).

    Raises:
        ConfigError: ``images`` not on a CUDA device.
    """
    if images.device.type != "cuda":
        raise ConfigError(f"record_forward records CUDA graphs: images on {images.device} are not on a CUDA device")
    static = images.clone()
    stream = torch.cuda.Stream(images.device)
    stream.wait_stream(torch.cuda.current_stream(images.device))
    with torch.no_grad(), torch.cuda.stream(stream):
        for _ in range(warmup):
            model(static)
    torch.cuda.current_stream(images.device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        output = model(static)

    def replay(batch: torch.Tensor) -> torch.Tensor:
        if batch.shape != static.shape or batch.dtype != static.dtype:
            raise ConfigError(f"record_forward's graph was recorded for {tuple(static.shape)} {static.dtype} images, "
                              f"got {tuple(batch.shape)} {batch.dtype}: record another for this shape")
        static.copy_(batch)
        graph.replay()
        return output

    return replay
