"""Where a run's checkpoints live, and writing one atomically (temporary file + rename)."""

from __future__ import annotations

import os
from pathlib import Path

from lightning.pytorch import Trainer

__all__ = ["checkpoint_directory", "resume_checkpoint", "save_checkpoint_atomic"]


def checkpoint_directory(trainer: Trainer) -> Path:
    """The run's checkpoint folder: the `ModelCheckpoint`'s ``dirpath``, else ``<log dir>/checkpoints``."""
    checkpointing = trainer.checkpoint_callback
    if checkpointing is not None and getattr(checkpointing, "dirpath", None):
        return Path(checkpointing.dirpath)
    return Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"


def save_checkpoint_atomic(trainer: Trainer, name: str) -> Path:
    """Save the trainer's checkpoint as ``<checkpoint folder>/<name>``, never half-written; returns the path."""
    directory = checkpoint_directory(trainer)
    path = directory / name
    if trainer.is_global_zero:
        directory.mkdir(parents=True, exist_ok=True)
    partial = directory / f".{name}.partial"
    trainer.save_checkpoint(partial, weights_only=False)
    if trainer.is_global_zero:
        os.replace(partial, path)
    return path


def resume_checkpoint(trainer: Trainer) -> Path | None:
    """The checkpoint a stopped fit resumes from: the run's ``last.ckpt``, if one was written."""
    for callback in trainer.checkpoint_callbacks:
        last = getattr(callback, "last_model_path", "")
        if last and Path(last).is_file():
            return Path(last)
    candidate = checkpoint_directory(trainer) / "last.ckpt"
    return candidate if candidate.is_file() else None
