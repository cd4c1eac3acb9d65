"""ImageNet from an ImageFolder tree ``root/{train,val}/<wnid>/<image>`` with the standard 224 transforms.

Transforms come from timm's data config of the attached model (``timm.data.create_transform``): random
resized crop + flip for training; resize to 224/crop_pct and a 224 centre crop for evaluation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from timm.data import create_transform
from torchvision.datasets import ImageFolder

from cimq_pl.datamodules.base import ImageClassificationDataModule, Split
from cimq_pl.datamodules.sources import check_image_folder
from cimq_pl.errors import ConfigError

__all__ = ["ImageNetDataModule"]


class ImageNetDataModule(ImageClassificationDataModule):
    """ImageNet-1k; the ``test`` split reads ``root/val``.

    Args:
        root: folder holding ``train/`` and ``val/``.
        image_size: evaluation crop size in pixels.
        crop_pct: evaluation centre-crop fraction (resize to image_size / crop_pct first).
        **kwargs: see :class:`ImageClassificationDataModule`.
    """

    num_classes = 1000

    def __init__(self, root: str = "data/imagenet", image_size: int = 224, crop_pct: float = 0.875, **kwargs):
        super().__init__(root=root, **kwargs)
        if not 0 < crop_pct <= 1:
            raise ConfigError(f"data.crop_pct must be in (0, 1], got {crop_pct!r}")
        self.image_size = image_size
        self.crop_pct = crop_pct

    def check_source(self) -> None:
        if not any((Path(self.root) / split).is_dir() for split in ("train", "val")):
            raise ConfigError(f"no ImageNet data in data.root {self.root!r}: it must hold train/ and val/ ImageFolder trees")

    def _build_split(self, split: Split, transform: Callable):
        folder = Path(self.root) / ("val" if split == "test" else "train")
        if not folder.is_dir():
            raise ConfigError(
                f"ImageNet folder {str(folder)!r} not found: data.root must hold train/ and val/ ImageFolder trees"
            )
        check_image_folder(folder, self.num_classes)
        return ImageFolder(str(folder), transform=transform)

    def _transform(self, mean, std, is_training: bool):
        return create_transform(
            input_size=self.image_size, is_training=is_training, mean=mean, std=std, crop_pct=self.crop_pct,
            interpolation="bilinear",
        )

    def train_transform(self, mean, std):
        return self._transform(mean, std, is_training=True)

    def eval_transform(self, mean, std):
        return self._transform(mean, std, is_training=False)
