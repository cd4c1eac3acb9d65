"""The one LightningModule: a timm classifier with top-1/top-5 accuracy, trained or evaluated by Lightning.

Quantization techniques are not part of this class: they are callbacks that transform ``self.model`` at
``setup``. The module only builds the network, runs it and measures it.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import timm.data
import torch
import torch.nn.functional as F
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from cimq_pl.errors import ConfigError
from cimq_pl.models import create_model

__all__ = ["CIMQModule"]


class CIMQModule(pl.LightningModule):
    """A timm image classifier (any name of ``timm.list_models()``).

    Args:
        name: timm model name, e.g. ``cifar_resnet20`` or ``resnet18``.
        num_classes: classifier outputs; must match the datamodule's classes.
        pretrained: False (random init), True (the model's published weights) or a local path / URL to a
            checkpoint (a local file always takes precedence; a sha256 prefix in the file name is verified).
        lr: SGD learning rate for plain fine-tuning.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
    """

    def __init__(
        self,
        name: str = "cifar_resnet20",
        num_classes: int = 10,
        pretrained: bool | str = False,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
    ):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ConfigError(f"model.num_classes must be an integer >= 1, got {num_classes!r}")
        if lr <= 0:
            raise ConfigError(f"model.lr must be > 0, got {lr!r}")
        self.save_hyperparameters()
        self.model = create_model(name, num_classes, pretrained)
        self.num_classes = num_classes
        top_k = min(5, num_classes)
        self.val_metrics = self._metrics("val/", top_k)
        self.test_metrics = self._metrics("test/", top_k)

    def _metrics(self, prefix: str, top_k: int) -> MetricCollection:
        """Top-1 (``acc``) and top-k (``acc_top5``) accuracy as fractions, DDP-reduced by torchmetrics."""
        return MetricCollection(
            {
                "acc": MulticlassAccuracy(num_classes=self.num_classes, top_k=1, average="micro"),
                f"acc_top{top_k}": MulticlassAccuracy(num_classes=self.num_classes, top_k=top_k, average="micro"),
            },
            prefix=prefix,
        )

    @property
    def data_config(self) -> dict[str, Any]:
        """timm's data config of the model (input size, mean, std, ...), read by the datamodules."""
        return timm.data.resolve_model_data_config(self.model)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_classes = getattr(datamodule, "num_classes", None)
        if data_classes and data_classes != self.num_classes:
            raise ConfigError(
                f"model.num_classes={self.num_classes} disagrees with the data ({type(datamodule).__name__} "
                f"has {data_classes} classes); set model.num_classes {data_classes}"
            )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", (logits.argmax(1) == labels).float().mean())
        return loss

    def _evaluate(self, batch, metrics: MetricCollection, prefix: str) -> None:
        images, labels = batch
        logits = self(images)
        self.log(f"{prefix}loss", F.cross_entropy(logits, labels), sync_dist=True)
        metrics.update(logits, labels)
        self.log_dict(metrics, prog_bar=prefix == "val/")

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics, "val/")

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, "test/")

    def predict_step(self, batch, batch_idx: int) -> dict[str, torch.Tensor]:
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        logits = self(images)
        return {"logits": logits, "prediction": logits.argmax(1)}

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(
            self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum,
            weight_decay=self.hparams.weight_decay,
        )
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=max(1, int(self.trainer.estimated_stepping_batches))
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

