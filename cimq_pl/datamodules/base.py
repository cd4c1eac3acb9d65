"""What every image-classification datamodule shares: loaders, normalisation and the calibration subset.

Subclasses say how to build a split (``_build_split``), how many classes there are and their default
transforms. Normalisation comes from the model when the datamodule is attached to a trainer whose
LightningModule exposes ``data_config`` (timm's ``mean``/``std`` of that model family), unless ``mean`` and
``std`` are given explicitly, and falls back to the dataset's default otherwise.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Literal, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, Subset

from cimq_pl.datamodules.resumable import ResumableSampler, SeededAugmentation
from cimq_pl.errors import ConfigError

__all__ = ["ImageClassificationDataModule", "Split"]

# Lightning warns that a mid-epoch resume replays an unknown part of the epoch unless the loader is "stateful".
# Ours resume exactly without that protocol (the train loader reads its position from the restored loop state;
# an objective's own loader only paces the steps, which seed their draws by position), so the warning would only
# mislead.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")

Split = Literal["train", "test"]


class ImageClassificationDataModule(pl.LightningDataModule):
    """Base datamodule: train split for fitting and calibration, test split for validation and test.

    Args:
        root: data folder (or file) to read; see the subclass for accepted layouts.
        batch_size: images per training batch (per process under DDP).
        eval_batch_size: images per validation/test/calibration batch; None = ``batch_size``.
        num_workers: dataloader worker processes.
        calibration_size: number of train-split images in the calibration subset (quantizer calibration).
        seed: seed of the calibration subset draw (the same seed gives the same images).
        mean: per-channel normalisation mean; None = the model's (timm data config) or the dataset default.
        std: per-channel normalisation std; None = as ``mean``.
        augment: apply training augmentation to the train split when fitting.
    """

    num_classes: int = 0
    default_mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    default_std: tuple[float, ...] = (0.229, 0.224, 0.225)

    def __init__(
        self,
        root: str,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        calibration_size: int = 1024,
        seed: int = 0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        augment: bool = True,
    ):
        super().__init__()
        for field, value, low in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0),
                                  ("calibration_size", calibration_size, 1)):
            if not isinstance(value, int) or value < low:
                raise ConfigError(f"data.{field} must be an integer >= {low}, got {value!r}")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise ConfigError(f"data.eval_batch_size must be >= 1 or null, got {eval_batch_size!r}")
        if (mean is None) != (std is None):
            raise ConfigError("data.mean and data.std must be given together (or both left null)")
        if mean is not None and (len(mean) != 3 or len(std) != 3 or min(std) <= 0):
            raise ConfigError(f"data.mean/std must be 3 numbers each with std > 0, got mean={mean!r} std={std!r}")
        self.root = str(root)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.calibration_size = calibration_size
        self.seed = seed
        self.mean = tuple(mean) if mean is not None else None
        self.std = tuple(std) if std is not None else None
        self.augment = augment
        self._datasets: dict[str, Dataset] = {}

    # -- what subclasses provide -------------------------------------------------------------------------
    def _build_split(self, split: Split, transform: Callable) -> Dataset:
        raise NotImplementedError

    def train_transform(self, mean: tuple[float, ...], std: tuple[float, ...]) -> Callable:
        raise NotImplementedError

    def eval_transform(self, mean: tuple[float, ...], std: tuple[float, ...]) -> Callable:
        raise NotImplementedError

    def check_source(self) -> None:
        """Raise `ConfigError` now if ``root`` cannot provide the data (called by the CLI before a run starts)."""

    # -- normalisation -----------------------------------------------------------------------------------
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std): explicit arguments, else the attached model's data config, else the dataset default."""
        if self.mean is not None:
            return self.mean, self.std
        module = self.trainer.lightning_module if self.trainer is not None else None
        config = getattr(module, "data_config", None) if module is not None else None
        if config and "mean" in config and "std" in config:
            return tuple(config["mean"]), tuple(config["std"])
        return self.default_mean, self.default_std

    # -- datasets ----------------------------------------------------------------------------------------
    def dataset(self, split: Split, train_mode: bool = False) -> Dataset:
        """The ``split`` dataset, with training augmentation when ``train_mode`` (and ``augment``)."""
        key = f"{split}:{'aug' if train_mode and self.augment else 'eval'}"
        if key not in self._datasets:
            mean, std = self.normalization()
            transform = self.train_transform(mean, std) if key.endswith("aug") else self.eval_transform(mean, std)
            self._datasets[key] = self._build_split(split, transform)
        return self._datasets[key]

    def calibration_indices(self) -> torch.Tensor:
        """Indices of the calibration subset: ``calibration_size`` train images drawn with ``seed``."""
        n_train = len(self.dataset("train"))
        if self.calibration_size > n_train:
            rank_zero_warn(
                f"data.calibration_size={self.calibration_size} exceeds the {n_train} train images; using all"
            )
        generator = torch.Generator().manual_seed(self.seed)
        return torch.randperm(n_train, generator=generator)[: self.calibration_size]

    def calibration_dataset(self) -> Dataset:
        """The seeded calibration subset of the train split, without augmentation (never test images)."""
        return Subset(self.dataset("train"), self.calibration_indices().tolist())

    # -- loaders -----------------------------------------------------------------------------------------
    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool = False, sampler=None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled, augmented train batches, reproducible by position: the order of an epoch is seeded by
        ``(seed, epoch)`` and each image's augmentation by ``(seed, epoch, index)``, and a fit resumed in the
        middle of an epoch starts after the batches its checkpoint had consumed (exact resume)."""
        dataset = self.dataset("train", train_mode=True)
        sampler = ResumableSampler(dataset, self.seed)
        epoch, batches_done = self._resume_position(math.ceil(len(sampler) / self.batch_size))
        sampler.start_at(epoch, batches_done * self.batch_size)
        return self._loader(SeededAugmentation(dataset, self.seed), self.batch_size, sampler=sampler)

    def _resume_position(self, batches_per_epoch: int) -> tuple[int, int]:
        """``(epoch, batches of it already done)`` of the fit being (re)started; (0, 0) for a fresh one."""
        trainer = self.trainer
        if trainer is None:
            return 0, 0
        loop = trainer.fit_loop
        # "processed" batches: a checkpoint written in on_train_batch_end has not yet counted its batch "completed"
        epoch, done = loop.epoch_progress.current.processed, loop.epoch_loop.batch_progress.current.processed
        limit = trainer.limit_train_batches
        limit = min(batches_per_epoch, limit) if isinstance(limit, int) else int(batches_per_epoch * limit)
        if done >= max(1, limit):  # the checkpoint closed its epoch: start the next one
            return epoch + 1, 0
        return epoch, done

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("test"), self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("test"), self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("test"), self.eval_batch_size)

    def calibration_dataloader(self) -> DataLoader:
        """Loader over the calibration subset, in a fixed order."""
        return self._loader(self.calibration_dataset(), self.eval_batch_size)
