"""What the four technique callbacks share: apply one technique config to the CIM model at ``setup``."""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer
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
    """

    config = None

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        require_cim(pl_module, type(self).__name__)
        quantize_(pl_module.model, self.config)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"
