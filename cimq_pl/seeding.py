"""Seeds derived from a few integers, so a random draw depends on *where* it happens, not on what ran before.

PTQ steps, QAT steps and training augmentations seed themselves from ``(seed, rank, epoch or unit, step or
sample)``: a run resumed from a checkpoint then draws exactly what an uninterrupted run drew.
"""

from __future__ import annotations

import torch

__all__ = ["derive_seed", "seed_step"]

_PRIME = 1_000_003
_MODULUS = 2**63 - 1


def derive_seed(seed: int, *parts: int) -> int:
    """A seed in [0, 2**63 - 1) determined by ``seed`` and ``parts`` (order matters)."""
    value = int(seed) % _MODULUS
    for part in parts:
        value = (value * _PRIME + int(part)) % _MODULUS
    return value


def seed_step(seed: int, device: torch.device | str = "cpu") -> None:
    """Seed the default generators a training step draws from: the CPU's, and ``device``'s when it is CUDA.

    What ``torch.manual_seed`` does for these draws, without its per-call cost for backends the step does not
    use (before CUDA is initialised, it records a stack trace to seed CUDA later: about 1 ms per call, once per
    step).
    """
    torch.default_generator.manual_seed(seed)
    device = torch.device(device)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)
