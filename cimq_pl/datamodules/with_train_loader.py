"""`WithTrainLoader`: a datamodule with another train loader, everything else delegated to the one it wraps."""

from __future__ import annotations

from typing import Any, Callable

import lightning.pytorch as pl
from torch.utils.data import DataLoader

__all__ = ["WithTrainLoader"]


class WithTrainLoader(pl.LightningDataModule):
    """``datamodule`` whose ``train_dataloader`` is ``make_train_loader()`` instead of its own.

    Lightning reads the train loader from the datamodule given to ``fit``; this is how a loader that is not the
    data's (a training objective's) reaches the fit while validation, test and predict loaders, ``prepare_data``,
    ``setup``, checkpoint state, ``hparams`` and any other attribute (``seed``, ``calibration_dataloader``, ...)
    stay ``datamodule``'s; ``make_train_loader`` is called when Lightning asks for the loader, after every ``setup``
    hook. (Lightning logs the hyperparameters a datamodule saved with ``save_hyperparameters``; ours save none, the
    CLI logs the whole config, so the wrapper saves none either.)

    Args:
        datamodule: the data.
        make_train_loader: returns the train loader.
    """

    def __init__(self, datamodule: pl.LightningDataModule, make_train_loader: Callable[[], DataLoader]):
        self.__dict__["datamodule"] = datamodule  # first: `trainer` is forwarded to it
        self.make_train_loader = make_train_loader
        trainer = datamodule.trainer
        super().__init__()  # sets `trainer` to None
        self.trainer = trainer
        # Lightning reads these flags of the datamodule it is given: the wrapped one's
        self.prepare_data_per_node = datamodule.prepare_data_per_node
        self.allow_zero_length_dataloader_with_multiple_devices = datamodule.allow_zero_length_dataloader_with_multiple_devices

    def __getattr__(self, name: str) -> Any:  # only called for what this object lacks
        if name == "datamodule":
            raise AttributeError(name)
        return getattr(self.datamodule, name)

    @property
    def trainer(self):
        return self.datamodule.trainer

    @trainer.setter
    def trainer(self, trainer) -> None:
        self.datamodule.trainer = trainer  # the data reads the model's normalisation through it

    @property
    def hparams(self):
        return self.datamodule.hparams

    @property
    def hparams_initial(self):
        return self.datamodule.hparams_initial

    def prepare_data(self) -> None:
        self.datamodule.prepare_data()

    def setup(self, stage: str) -> None:
        self.datamodule.setup(stage)

    def teardown(self, stage: str) -> None:
        self.datamodule.teardown(stage)

    def train_dataloader(self) -> DataLoader:
        return self.make_train_loader()

    def val_dataloader(self):
        return self.datamodule.val_dataloader()

    def test_dataloader(self):
        return self.datamodule.test_dataloader()

    def predict_dataloader(self):
        return self.datamodule.predict_dataloader()

    def state_dict(self) -> dict[str, Any]:
        return self.datamodule.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.datamodule.load_state_dict(state_dict)

    def on_exception(self, exception: BaseException) -> None:
        self.datamodule.on_exception(exception)
