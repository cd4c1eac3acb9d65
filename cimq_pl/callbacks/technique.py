"""What the four technique callbacks share: apply one technique config to the CIM model at ``setup``.

A technique callback is declared in one line, ``class BitSparseActivations(TechniqueCallback,
config=BitSparseActivationConfig)``: its init arguments *are* the config's fields (signature, types, defaults
and documentation come from the config dataclass, so the YAML a user writes is validated against them and
nothing is restated here).
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from typing import Any, ClassVar, Optional

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from cimq_pl.errors import ConfigError
from cimq_pl.quant.techniques import quantize_

__all__ = ["TechniqueCallback", "require_cim"]


def require_cim(pl_module: LightningModule, who: str) -> None:
    """Raise unless ``pl_module`` runs its network on a CIM macro (``model.cim`` set)."""
    if getattr(pl_module, "is_export", False):
        raise ConfigError(
            f"{who} cannot act on model.export (an export is already quantized and runs integer-only): test an "
            "export with the model config alone, without technique, PTQ or QAT callbacks"
        )
    if getattr(pl_module, "cim", None) is None:
        raise ConfigError(
            f"{who} needs a CIM macro: set model.cim (e.g. `cim: {{rows: 128, cols: 128, weight_bits: 4, "
            f"input_bits: 4, adc_bits: 4}}` in the model config)"
        )


class TechniqueCallback(Callback):
    """Applies ``self.config`` (a registered technique config) to ``pl_module.model`` at ``setup``.

    Applying at ``setup`` (every stage) means the checkpoint, DDP wrapping and the optimizers all see the
    final modules, and ``test --ckpt_path`` rebuilds the same quantizers before loading their values.

    Subclass with ``config=<config dataclass>``; ``renamed={"old": "new"}`` keeps old init argument names
    working for one release (with a deprecation line).
    """

    config_type: ClassVar[type]
    renamed: ClassVar[dict[str, str]] = {}

    def __init_subclass__(cls, config: Optional[type] = None, renamed: Optional[dict[str, str]] = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if config is None:
            return
        cls.config_type = config
        cls.renamed = dict(renamed or {})
        cls.__init__ = _init_from_config(cls, config, cls.renamed)
        cls.__doc__ = f"{inspect.cleandoc(cls.__doc__ or '')}\n\n{_args_section(config, cls.renamed)}"

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        require_cim(pl_module, type(self).__name__)
        quantize_(pl_module.model, self.config)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


def _init_from_config(cls: type, config: type, renamed: dict[str, str]):
    """An ``__init__`` whose signature is ``config``'s fields (plus the ``renamed`` old names, defaulting to None)."""
    hints = typing.get_type_hints(config)
    fields = [f for f in dataclasses.fields(config) if f.init]
    parameters = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    parameters += [
        inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=f.default, annotation=hints[f.name])
        for f in fields
    ]
    parameters += [
        inspect.Parameter(old, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Optional[hints[new]])
        for old, new in renamed.items()
    ]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        for old, new in renamed.items():
            value = kwargs.pop(old, None)
            if value is not None:
                rank_zero_warn(f"{cls.__name__}.{old} is deprecated: call it {new} (the old name goes in the next release)",
                               category=FutureWarning)
                kwargs[new] = value
        self.config = config(*args, **kwargs)

    __init__.__signature__ = inspect.Signature(parameters)
    __init__.__annotations__ = {p.name: p.annotation for p in parameters[1:]}
    __init__.__qualname__ = f"{cls.__qualname__}.__init__"
    __init__.__module__ = cls.__module__
    return __init__


def _args_section(config: type, renamed: dict[str, str]) -> str:
    """The config's documentation of its fields (its ``Attributes:`` section) as the callback's ``Args:``, with
    a line for each old name."""
    doc = inspect.cleandoc(config.__doc__ or "")
    if "Attributes:" not in doc:
        return ""
    section = doc[doc.index("Attributes:"):].replace("Attributes:", "Args:", 1)
    head, _, tail = section.partition("\n\nRaises:")
    old_names = "".join(f"\n    {old}: deprecated name of ``{new}``." for old, new in renamed.items())
    return head + old_names + ("\n\nRaises:" + tail if tail else "")
