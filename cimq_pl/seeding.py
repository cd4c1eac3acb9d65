"""Seeds derived from a few integers, so a random draw depends on *where* it happens, not on what ran before.

PTQ steps, QAT steps and training augmentations seed themselves from ``(seed, rank, epoch or unit, step or
sample)``: a run resumed from a checkpoint then draws exactly what an uninterrupted run drew.
"""

from __future__ import annotations

__all__ = ["derive_seed"]

_PRIME = 1_000_003
_MODULUS = 2**63 - 1


def derive_seed(seed: int, *parts: int) -> int:
    """A seed in [0, 2**63 - 1) determined by ``seed`` and ``parts`` (order matters)."""
    value = int(seed) % _MODULUS
    for part in parts:
        value = (value * _PRIME + int(part)) % _MODULUS
    return value
