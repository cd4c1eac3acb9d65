"""``python -m cimq_pl {fit,validate,test,predict,export} --config ...``: LightningCLI with friendly failures.

* Several ``--config`` files compose, later ones overriding earlier ones (model/data config + technique config).
* Without a W&B API key, W&B runs offline (``WANDB_MODE=offline``) instead of failing or prompting.
* The resolved config is logged to the run's logger and may be re-saved over an earlier run's copy.
* Bad input (:class:`~cimq_pl.errors.ConfigError`) prints one ``error:`` line and exits with status 2.
* A loss that turns NaN/inf stops the fit with one ``error:`` line naming the block and quantizer (status 1).
* SIGTERM (pre-emption) stops a fit after the current step, with status 143 (128 + SIGTERM); a
  ``ModelCheckpoint(save_on_exception=True)`` in the config has then saved the step to resume from.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from jsonargparse import ArgumentError
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from cimq_pl.datamodules import ImageClassificationDataModule
from cimq_pl.errors import ConfigError
from cimq_pl.models.pretrained import read_checkpoint
from cimq_pl.module import CIMQModule
from cimq_pl.quiet import quiet
from cimq_pl.trainer import CIMQTrainer

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

    @staticmethod
    def subcommands() -> dict:
        """Lightning's subcommands plus ``export`` (`CIMQTrainer.export`: test, then write the deployment export)."""
        return {**LightningCLI.subcommands(), "export": {"model", "datamodule"}}

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("trainer_class", CIMQTrainer)
        kwargs.setdefault("save_config_callback", LoggerSaveConfigCallback)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("subclass_mode_data", True)
        # parse errors are raised (not printed with the whole usage) so that `main` can report them on one line
        no_exit = {"exit_on_error": False}
        kwargs.setdefault("parser_kwargs", {**no_exit, **{name: dict(no_exit) for name in self.subcommands()}})
        super().__init__(CIMQModule, ImageClassificationDataModule, *args, **kwargs)

    def before_instantiate_classes(self) -> None:
        """Sections given as something other than a mapping (``model: [1, 2]``) are one clear error."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        for section in ("model", "data", "trainer"):
            value = config.get(section)
            if value is not None and not hasattr(value, "items") and not hasattr(value, "__dict__"):
                raise ConfigError(f"config section {section!r} is a {type(value).__name__} ({value!r}): expected a mapping of arguments")

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads ``--ckpt_path`` here (for its hyperparameters) before anything else: check first that
        # it is a readable weights-only checkpoint, so a missing, truncated or foreign file is one clear error.
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if path and path not in ("last", "best", "hpc", "registry"):
            checkpoint = read_checkpoint(path, "ckpt_path")
            if "state_dict" not in checkpoint or "pytorch-lightning_version" not in checkpoint:
                raise ConfigError(
                    f"ckpt_path {path!r} is not a Lightning checkpoint written by `fit` (it holds "
                    f"{sorted(checkpoint)[:4]}...); pretrained float weights go in model.pretrained"
                )
        super()._parse_ckpt_path()


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
    quiet()  # drop the messages of a normal run that read like defects (cimq_pl/quiet.py lists them)
    if not wandb_key_available():
        os.environ.setdefault("WANDB_MODE", "offline")
    try:
        CIMQCLI(args=args)
    except SIGTERMException:
        print("error: stopped by SIGTERM; the run's last checkpoint (ModelCheckpoint save_on_exception / save_last) "
              "resumes it: fit ... --ckpt_path <checkpoints>/last.ckpt", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
    except ArgumentError as err:  # a malformed config or argument: jsonargparse's message, on one line
        message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as err:  # the NaN/inf guards of the objectives: the message names the culprit
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except Exception as err:
        config_error = _config_error_in_chain(err)
        if config_error is None:
            raise
        print(f"error: {config_error}", file=sys.stderr)
        sys.exit(2)
