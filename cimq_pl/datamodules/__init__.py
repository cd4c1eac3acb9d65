"""Lightning datamodules: CIFAR-10/100 (ImageFolder, .npz, torchvision) and ImageNet (ImageFolder)."""

from cimq_pl.datamodules.base import ImageClassificationDataModule
from cimq_pl.datamodules.cifar import CIFAR10DataModule, CIFAR100DataModule
from cimq_pl.datamodules.imagenet import ImageNetDataModule

__all__ = ["CIFAR10DataModule", "CIFAR100DataModule", "ImageClassificationDataModule", "ImageNetDataModule"]
