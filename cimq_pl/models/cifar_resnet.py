"""CIFAR ResNets of He et al. (2016), registered in timm's model registry.

Three stages of basic blocks (16, 32, 64 channels) after a 3x3 stem, global average pooling and a linear
classifier; depth = 6n + 2. Two shortcut styles where the shape changes:

* option ``"A"``: identity with stride-2 subsampling and zero-padded new channels (no parameters), as in
  the paper and the ``resnet20-12fca82f.th`` family of CIFAR-10 weights;
* option ``"B"``: 1x1 conv + BN projection (``downsample.0`` / ``downsample.1``), as in the CIFAR-100
  ``cifar100_resnet56-f2eff4c8.pt`` weights.

``timm.create_model("cifar_resnet20")`` builds option A, ``timm.create_model("cifar_resnet56_b")`` option B.
Pretrained configs (download address, normalisation, number of classes) live in ``default_cfgs`` below,
apart from the code, as in timm.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model
from torch import nn

from cimq_pl.models.pretrained import load_pretrained_

__all__ = ["CifarResNet", "BasicBlock"]

Shortcut = Literal["A", "B"]


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut: subsample by ``stride`` and zero-pad ``out_channels - in_channels`` channels."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.pad_channels = out_channels - in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        half = self.pad_channels // 2
        return F.pad(x, (0, 0, 0, 0, half, self.pad_channels - half))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus shortcut, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, shortcut: Shortcut = "A"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.act2 = nn.ReLU(inplace=True)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            if shortcut == "A":
                self.downsample = ZeroPadShortcut(in_channels, out_channels, stride)
            else:
                self.downsample = nn.Sequential(
                    nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        return self.act2(x + shortcut)


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs with ``depth = 6n + 2`` (20, 32, 44, 56, 110, ...)."""

    def __init__(
        self,
        depth: int = 20,
        num_classes: int = 10,
        in_chans: int = 3,
        shortcut: Shortcut = "A",
        widths: tuple[int, int, int] = (16, 32, 64),
        **kwargs,
    ):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, ...), got {depth}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        blocks_per_stage = (depth - 2) // 6
        self.num_classes = num_classes
        self.num_features = widths[-1]
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.act1 = nn.ReLU(inplace=True)
        in_channels = widths[0]
        for stage, width in enumerate(widths):
            blocks = []
            for i in range(blocks_per_stage):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(in_channels, width, stride, shortcut))
                in_channels = width
            self.add_module(f"layer{stage + 1}", nn.Sequential(*blocks))
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str = "avg") -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x).flatten(1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename the classifier of the published CIFAR-10 checkpoints (``linear.*``) to ``fc.*``."""
    return {("fc." + k[len("linear.") :] if k.startswith("linear.") else k): v for k, v in state_dict.items()}


def _create_cifar_resnet(variant: str, pretrained: bool | str = False, **kwargs) -> CifarResNet:
    """Build ``variant``; ``pretrained`` is False, True (the default cfg's weights) or a path / URL."""
    pretrained_cfg = default_cfgs.get(variant)  # the untagged lookup returns the default tag
    cfg_dict = pretrained_cfg.default.to_dict() if pretrained_cfg is not None else {}
    if pretrained is True:
        kwargs.setdefault("num_classes", cfg_dict.get("num_classes", 10))
    model = CifarResNet(**kwargs)
    model.pretrained_cfg = cfg_dict
    model.default_cfg = cfg_dict
    if pretrained:
        source = cfg_dict.get("url") if pretrained is True else pretrained
        if not source:
            raise ValueError(f"{variant} has no pretrained weights; pass a local path or URL instead")
        load_pretrained_(model, source, filter_fn=checkpoint_filter_fn)
    return model


_CIFAR10 = dict(
    input_size=(3, 32, 32),
    crop_pct=1.0,
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    num_classes=10,
    first_conv="conv1",
    classifier="fc",
)
_CIFAR100 = dict(_CIFAR10, mean=(0.5070, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2761), num_classes=100)
_AKAMASTER = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/"
_CHENYAOFO = "https://github.com/chenyaofo/pytorch-cifar-models/releases/download/resnet/"

default_cfgs = generate_default_cfgs(
    {
        "cifar_resnet20.cifar10": dict(_CIFAR10, url=_AKAMASTER + "resnet20-12fca82f.th", license="bsd-2-clause"),
        "cifar_resnet32.cifar10": dict(_CIFAR10, url=_AKAMASTER + "resnet32-d509ac18.th", license="bsd-2-clause"),
        "cifar_resnet44.cifar10": dict(_CIFAR10, url=_AKAMASTER + "resnet44-014dd654.th", license="bsd-2-clause"),
        "cifar_resnet56.cifar10": dict(_CIFAR10, url=_AKAMASTER + "resnet56-4bfd9763.th", license="bsd-2-clause"),
        "cifar_resnet20_b.cifar100": dict(
            _CIFAR100, url=_CHENYAOFO + "cifar100_resnet20-23dac2f1.pt", license="bsd-3-clause"
        ),
        "cifar_resnet32_b.cifar100": dict(_CIFAR100),
        "cifar_resnet44_b.cifar100": dict(_CIFAR100),
        "cifar_resnet56_b.cifar100": dict(
            _CIFAR100, url=_CHENYAOFO + "cifar100_resnet56-f2eff4c8.pt", license="bsd-3-clause"
        ),
    }
)


@register_model
def cifar_resnet20(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-20 for CIFAR, option-A shortcuts (0.27M params)."""
    return _create_cifar_resnet("cifar_resnet20", pretrained, depth=20, shortcut="A", **kwargs)


@register_model
def cifar_resnet32(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-32 for CIFAR, option-A shortcuts (0.46M params)."""
    return _create_cifar_resnet("cifar_resnet32", pretrained, depth=32, shortcut="A", **kwargs)


@register_model
def cifar_resnet44(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-44 for CIFAR, option-A shortcuts (0.66M params)."""
    return _create_cifar_resnet("cifar_resnet44", pretrained, depth=44, shortcut="A", **kwargs)


@register_model
def cifar_resnet56(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-56 for CIFAR, option-A shortcuts (0.85M params)."""
    return _create_cifar_resnet("cifar_resnet56", pretrained, depth=56, shortcut="A", **kwargs)


@register_model
def cifar_resnet20_b(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-20 for CIFAR, option-B (1x1 conv + BN) shortcuts."""
    return _create_cifar_resnet("cifar_resnet20_b", pretrained, depth=20, shortcut="B", **kwargs)


@register_model
def cifar_resnet32_b(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-32 for CIFAR, option-B (1x1 conv + BN) shortcuts."""
    return _create_cifar_resnet("cifar_resnet32_b", pretrained, depth=32, shortcut="B", **kwargs)


@register_model
def cifar_resnet44_b(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-44 for CIFAR, option-B (1x1 conv + BN) shortcuts."""
    return _create_cifar_resnet("cifar_resnet44_b", pretrained, depth=44, shortcut="B", **kwargs)


@register_model
def cifar_resnet56_b(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-56 for CIFAR, option-B (1x1 conv + BN) shortcuts (the CIFAR-100 weights)."""
    return _create_cifar_resnet("cifar_resnet56_b", pretrained, depth=56, shortcut="B", **kwargs)
