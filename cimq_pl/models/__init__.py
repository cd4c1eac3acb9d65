"""Model definitions registered in timm's registry, and pretrained-weight loading."""

from cimq_pl.models.cifar_resnet import BasicBlock, CifarResNet
from cimq_pl.models.factory import create_model
from cimq_pl.models.pretrained import load_pretrained_, read_state_dict

__all__ = ["BasicBlock", "CifarResNet", "create_model", "load_pretrained_", "read_state_dict"]
