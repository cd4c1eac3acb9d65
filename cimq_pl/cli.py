"""``python -m cimq_pl {fit,validate,test,predict} --config ...``: LightningCLI with friendly failures.

* Several ``--config`` files compose, later ones overriding earlier ones (model/data config + technique config).
* Without a W&B API key, W&B runs offline (``WANDB_MODE=offline``) instead of failing or prompting.
* The resolved config is logged to the run's logger and may be re-saved over an earlier run's copy.
* Bad input (:class:`~cimq_pl.errors.ConfigError`) prints one ``error:`` line and exits with status 2.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import Logger

from cimq_pl.datamodules import ImageClassificationDataModule
from cimq_pl.errors import ConfigError
from cimq_pl.module import CIMQModule

__all__ = ["CIMQCLI", "main"]


def wandb_key_available() -> bool:
    """True when W&B has an API key: ``WANDB_API_KEY`` or an ``api.wandb.ai`` entry in ``~/.netrc``."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


class LoggerSaveConfigCallback(SaveConfigCallback):
    """Save the resolved config next to the run (overwriting is allowed) and log it as hyperparameters."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        if isinstance(trainer.logger, Logger):
            trainer.logger.log_hyperparams({"config": self.config.as_dict()})


class CIMQCLI(LightningCLI):
    """The project's LightningCLI: :class:`CIMQModule` plus any :class:`ImageClassificationDataModule`."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("save_config_callback", LoggerSaveConfigCallback)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("subclass_mode_data", True)
        super().__init__(CIMQModule, ImageClassificationDataModule, *args, **kwargs)


def _config_error_in_chain(err: BaseException) -> ConfigError | None:
    """The ConfigError behind ``err``, if any (jsonargparse wraps errors raised while instantiating)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, ConfigError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def main(args: list[str] | None = None) -> None:
    """Entry point of ``python -m cimq_pl`` and the ``cimq-pl`` script."""
    if not wandb_key_available():
        os.environ.setdefault("WANDB_MODE", "offline")
    try:
        CIMQCLI(args=args)
    except Exception as err:
        config_error = _config_error_in_chain(err)
        if config_error is None:
            raise
        print(f"error: {config_error}", file=sys.stderr)
        sys.exit(2)
