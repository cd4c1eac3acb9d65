"""Build any timm model by name, with pretrained weights from timm, a local path or a URL."""

from __future__ import annotations

import difflib
import sys

import timm
from torch import nn

import cimq_pl.models.cifar_resnet  # noqa: F401  (registers the CIFAR ResNets in timm)
from cimq_pl.errors import ConfigError
from cimq_pl.models.pretrained import load_pretrained_

__all__ = ["create_model"]


def _check_model_name(name: str) -> None:
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=4, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ConfigError(
        f"unknown model name {name!r}: {hint}allowed are the names of timm.list_models() "
        f"({len(timm.list_models())} models), e.g. {', '.join(timm.list_models('cifar_*'))}"
    )


def create_model(name: str, num_classes: int | None = None, pretrained: bool | str = False) -> nn.Module:
    """Create timm model ``name``.

    Args:
        name: any name of ``timm.list_models()``, including our ``cifar_resnet{20,32,44,56}[_b]``.
        num_classes: classifier size; None keeps the model's default.
        pretrained: False (random init), True (the model's published weights, via timm / the hub cache), or a
            local path or http(s) URL of a checkpoint (a local file always takes precedence).

    Raises:
        ConfigError: unknown name, unreadable weights or weights that do not fit the model.
    """
    _check_model_name(name)
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if pretrained is True:
        try:
            return timm.create_model(name, pretrained=True, **kwargs)
        except ConfigError:
            raise
        except Exception as err:  # noqa: BLE001 - no network / no weights: tell the user what to do
            raise ConfigError(
                f"cannot get timm's pretrained weights for {name!r} ({type(err).__name__}: {err}); "
                "pass model.pretrained a local checkpoint path instead"
            ) from err
    model = timm.create_model(name, pretrained=False, **kwargs)
    if pretrained:
        filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
        load_pretrained_(model, pretrained, filter_fn=filter_fn)
    return model
