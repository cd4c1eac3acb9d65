"""Readers for the on-disk layouts a CIFAR-style data folder can have."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from cimq_pl.errors import ConfigError

__all__ = ["NpzImageDataset", "check_image_folder"]


class NpzImageDataset(Dataset):
    """Images and labels from a ``.npz`` file: ``images`` uint8 (N, H, W, 3) and ``labels`` int (N,).

    A file may also hold several splits as ``<split>_images`` / ``<split>_labels``.
    """

    def __init__(self, path: str | Path, split: str, transform: Callable | None = None):
        with np.load(path, allow_pickle=False) as data:
            keys = set(data.files)
            if f"{split}_images" in keys:
                images, labels = data[f"{split}_images"], data[f"{split}_labels"]
            elif "images" in keys and split == "test":
                images, labels = data["images"], data["labels"]
            elif "images" in keys:
                raise ConfigError(
                    f"{str(path)!r} holds one split of images, used as the test split; the {split!r} split "
                    f"(needed for training and calibration) must come from another data.root"
                )
            else:
                raise ConfigError(f"{str(path)!r} has no 'images'/'labels' arrays (found: {sorted(keys)})")
            self.classes = [str(c) for c in data["classes"]] if "classes" in keys else None
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ConfigError(
                f"{str(path)!r}: images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}"
            )
        if len(labels) != len(images):
            raise ConfigError(f"{str(path)!r}: {len(images)} images but {len(labels)} labels")
        self.images = images
        self.targets = torch.as_tensor(labels, dtype=torch.long)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.images[index])
        return (self.transform(image) if self.transform else image), int(self.targets[index])


def check_image_folder(folder: Path, num_classes: int) -> None:
    """Raise if ``folder`` is not an ImageFolder tree with ``num_classes`` class folders."""
    classes = [p for p in folder.iterdir() if p.is_dir()] if folder.is_dir() else []
    if len(classes) != num_classes:
        raise ConfigError(
            f"{str(folder)!r} has {len(classes)} class folders, expected {num_classes} "
            f"(ImageFolder layout <split>/<class>/<image>)"
        )
