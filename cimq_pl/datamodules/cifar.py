"""CIFAR-10 and CIFAR-100 datamodules reading any of three layouts.

``root`` may be:

1. an ImageFolder tree ``root/{train,test}/<class>/<image>`` (e.g. ``../shared/data/cifar10_lossless``);
   class folders sort to the label order;
2. a ``.npz`` file with ``images`` (N, 32, 32, 3) uint8 and ``labels`` (the test split), or
   ``train_images``/``test_images`` (e.g. ``../shared/data/cifar100_sample.npz``);
3. torchvision's format (``cifar-10-batches-py`` / ``cifar-100-python`` inside ``root``), downloaded there
   when missing and ``download`` is true (needs a network).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torchvision
from torchvision import transforms as T
from torchvision.datasets import ImageFolder

from cimq_pl.datamodules.base import ImageClassificationDataModule, Split
from cimq_pl.datamodules.sources import NpzImageDataset, check_image_folder
from cimq_pl.errors import ConfigError

__all__ = ["CIFAR10DataModule", "CIFAR100DataModule"]


class _CIFARDataModule(ImageClassificationDataModule):
    """Shared CIFAR logic; see the module docstring for the accepted layouts.

    Args:
        root: data folder, or a ``.npz`` file.
        download: download torchvision's copy into ``root`` when no data is found there.
        **kwargs: see :class:`ImageClassificationDataModule`.
    """

    torchvision_class: type = torchvision.datasets.CIFAR10
    torchvision_folder: str = ""

    def __init__(self, root: str = "data/cifar", download: bool = True, **kwargs):
        super().__init__(root=root, **kwargs)
        self.download = download

    def _layout(self) -> str:
        root = Path(self.root)
        if root.is_file():
            if root.suffix != ".npz":
                raise ConfigError(f"data.root {self.root!r} is a file but not a .npz archive")
            return "npz"
        if (root / "train").is_dir() or (root / "test").is_dir():
            return "image_folder"
        if (root / self.torchvision_folder).is_dir() or self.download:
            return "torchvision"
        raise ConfigError(
            f"no {self.dataset_label} data in data.root {self.root!r}: expected train/ and test/ ImageFolder "
            f"folders, a .npz file or torchvision's {self.torchvision_folder}/ (or set data.download true)"
        )

    @property
    def dataset_label(self) -> str:
        return type(self).__name__.replace("DataModule", "")

    def check_source(self) -> None:
        self._layout()

    def prepare_data(self) -> None:
        if self._layout() == "torchvision" and not (Path(self.root) / self.torchvision_folder).is_dir():
            for train in (True, False):
                try:
                    self.torchvision_class(self.root, train=train, download=True)
                except Exception as err:  # noqa: BLE001 - no network: say what is missing
                    raise ConfigError(
                        f"no {self.dataset_label} data in data.root {self.root!r} and the download failed "
                        f"({type(err).__name__}: {err}); point data.root at an ImageFolder train/test tree, a "
                        f".npz file, or a folder holding {self.torchvision_folder}/"
                    ) from err

    def _build_split(self, split: Split, transform: Callable):
        layout = self._layout()
        if layout == "npz":
            dataset = NpzImageDataset(self.root, split, transform)
        elif layout == "image_folder":
            folder = Path(self.root) / split
            if not folder.is_dir():
                raise ConfigError(f"data.root {self.root!r} has no {split}/ folder (ImageFolder layout)")
            check_image_folder(folder, self.num_classes)
            dataset = ImageFolder(str(folder), transform=transform)
        else:
            if not (Path(self.root) / self.torchvision_folder).is_dir():
                self.prepare_data()
            dataset = self.torchvision_class(self.root, train=split == "train", transform=transform)
        labels = getattr(dataset, "targets", None)
        if labels is not None and len(labels) and int(max(labels)) >= self.num_classes:
            raise ConfigError(
                f"{self.dataset_label} {split} split in {self.root!r} has label {int(max(labels))}, "
                f"outside 0..{self.num_classes - 1}"
            )
        return dataset

    def train_transform(self, mean, std):
        return T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])

    def eval_transform(self, mean, std):
        return T.Compose([T.ToTensor(), T.Normalize(mean, std)])


class CIFAR10DataModule(_CIFARDataModule):
    """CIFAR-10 (10 classes, 32x32). Default normalisation: ImageNet mean/std (the pretrained ResNets')."""

    num_classes = 10
    torchvision_class = torchvision.datasets.CIFAR10
    torchvision_folder = "cifar-10-batches-py"


class CIFAR100DataModule(_CIFARDataModule):
    """CIFAR-100 (100 fine classes, 32x32). Default normalisation: CIFAR-100 mean/std."""

    num_classes = 100
    default_mean = (0.5070, 0.4865, 0.4409)
    default_std = (0.2673, 0.2564, 0.2761)
    torchvision_class = torchvision.datasets.CIFAR100
    torchvision_folder = "cifar-100-python"
