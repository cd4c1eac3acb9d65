"""Datamodules on the real CIFAR files in ../shared: layouts, calibration subset, normalisation, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cimq_pl.datamodules import CIFAR10DataModule, CIFAR100DataModule, ImageNetDataModule
from cimq_pl.errors import ConfigError
from conftest import CIFAR10, CIFAR100_SAMPLE


def test_image_folder_splits_and_labels():
    dm = CIFAR10DataModule(root=str(CIFAR10), num_workers=0)
    train, test = dm.dataset("train"), dm.dataset("test")
    assert (len(train), len(test)) == (4000, 1000)
    assert test.classes[:3] == ["airplane", "automobile", "bird"]
    first = next(i for i, (path, _) in enumerate(test.samples) if path.endswith("00000.png"))
    image, label = test[first]
    assert image.shape == (3, 32, 32) and label == 3  # image 0 of the CIFAR-10 test batch is a cat
    # ImageNet normalisation by default: a pure black pixel maps to -mean/std
    assert image.min().item() == pytest.approx(min(-m / s for m, s in zip(dm.default_mean, dm.default_std)), abs=0.3)


def test_calibration_subset_is_seeded_and_from_train_only():
    dm = CIFAR10DataModule(root=str(CIFAR10), num_workers=0, calibration_size=256, seed=1)
    first, again = dm.calibration_indices(), CIFAR10DataModule(root=str(CIFAR10), calibration_size=256, seed=1).calibration_indices()
    other = CIFAR10DataModule(root=str(CIFAR10), calibration_size=256, seed=2).calibration_indices()
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert len(set(first.tolist())) == 256
    calib = dm.calibration_dataset()
    paths = [calib.dataset.samples[i][0] for i in calib.indices]
    assert all(f"{Path('train')}" in p and "/test/" not in p for p in paths)
    batch, _ = next(iter(dm.calibration_dataloader()))
    assert batch.shape[0] == min(256, dm.eval_batch_size)


def test_training_augmentation_only_on_train_loader():
    dm = CIFAR10DataModule(root=str(CIFAR10), num_workers=0)
    torch.manual_seed(0)
    a = dm.dataset("train", train_mode=True)[5][0]
    torch.manual_seed(1)
    b = dm.dataset("train", train_mode=True)[5][0]
    assert not torch.equal(a, b)
    assert torch.equal(dm.dataset("train")[5][0], dm.dataset("train")[5][0])


def test_npz_sample_is_the_test_split_with_cifar100_normalisation():
    dm = CIFAR100DataModule(root=str(CIFAR100_SAMPLE), num_workers=0)
    test = dm.dataset("test")
    raw = np.load(CIFAR100_SAMPLE)
    assert len(test) == 100 and test[7][1] == int(raw["labels"][7])
    mean = torch.tensor(dm.default_mean)[:, None, None]
    std = torch.tensor(dm.default_std)[:, None, None]
    expected = (torch.from_numpy(raw["images"][7]).permute(2, 0, 1) / 255 - mean) / std
    assert torch.allclose(test[7][0], expected, atol=1e-6)
    with pytest.raises(ConfigError, match="the 'train' split .* must come from another data.root"):
        dm.dataset("train")


def test_missing_folder_without_download_is_a_clear_error(tmp_path):
    dm = CIFAR10DataModule(root=str(tmp_path / "none"), download=False)
    with pytest.raises(ConfigError, match=r"no CIFAR10 data in data.root .*none"):
        dm.dataset("test")


@pytest.mark.parametrize("field,value", [("batch_size", 0), ("num_workers", -1), ("calibration_size", 0)])
def test_bad_loader_arguments(field, value):
    with pytest.raises(ConfigError, match=rf"data.{field} must be an integer >= \d, got {value}"):
        CIFAR10DataModule(root=str(CIFAR10), **{field: value})


def test_imagenet_folder_uses_224_transforms(tmp_path):
    # 1000 class folders, each holding one real CIFAR-10 image (upscaled by the transform)
    sources = sorted((CIFAR10 / "test" / "cat").iterdir())[:1]
    for split in ("train", "val"):
        for c in range(1000):
            folder = tmp_path / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            (folder / "a.png").symlink_to(sources[0])
    dm = ImageNetDataModule(root=str(tmp_path), num_workers=0)
    image, label = dm.dataset("test")[999]
    assert image.shape == (3, 224, 224) and label == 999
    assert dm.dataset("train", train_mode=True)[0][0].shape == (3, 224, 224)
    with pytest.raises(ConfigError, match="ImageNet folder .* not found"):
        ImageNetDataModule(root=str(tmp_path / "missing")).dataset("train")
    Image.open(sources[0]).verify()


def test_the_datamodule_knows_nothing_of_ptq():
    """PTQ's step loader is the reconstruction objective's (cimq_pl/objectives/reconstruction.py), not the data's."""
    import cimq_pl.datamodules.base as base

    dm = CIFAR10DataModule(root=str(CIFAR10), num_workers=0)
    names = [name.lower() for name in (*dir(dm), *vars(base))]
    assert not [name for name in names if "step" in name or "ptq" in name or "reconstruct" in name]
