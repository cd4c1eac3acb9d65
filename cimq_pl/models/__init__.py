"""Model definitions registered in timm's registry, and pretrained-weight loading."""

from cimq_pl.models._timm import import_timm

import_timm()  # before the modules below import timm: timm without its eager `import wandb`

from cimq_pl.models.cifar_resnet import BasicBlock, CifarResNet  # noqa: E402
from cimq_pl.models.factory import create_model  # noqa: E402
from cimq_pl.models.pretrained import load_pretrained_, read_state_dict  # noqa: E402

__all__ = ["BasicBlock", "CifarResNet", "create_model", "load_pretrained_", "read_state_dict"]
