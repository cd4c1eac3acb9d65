"""The messages of a normal run that read like defects but are not, silenced in this one place.

`quiet` (called by `cimq_pl.cli.main`) filters what our users cannot act on; `quiet_wandb_logger` (called by
`CIMQTrainer`) removes the causes of two W&B warnings. Genuine warnings (``data.calibration_size`` larger than
the data, a HardwareReport without CIM layers, a NaN, Lightning's advice when ``num_workers`` < 2 ...) are
left alone: the filters match the start of these exact messages only.
"""

from __future__ import annotations

import logging
import os
import warnings

__all__ = ["SILENCED_INFO", "SILENCED_WARNINGS", "quiet", "quiet_wandb_logger"]

# Python warnings, as (regex matched at the start of the message, why it is noise)
SILENCED_WARNINGS = (
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated",
     "a FutureWarning of torch about Lightning 2.6's own code (lightning/pytorch/utilities/_pytree.py), every run"),
    (r"The number of training batches \(\d+\) is smaller than the logging interval",
     "a short PTQ epoch logs its units' metrics at its end; QAT still logs every log_every_n_steps"),
)
# Lightning's INFO lines that start with these (logged on rank zero through its `rank_zero_info`)
SILENCED_INFO = (
    "💡 Tip:",  # adverts for litlogger / litmodels, two per run
)
_RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class _DropInfo(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(SILENCED_INFO)


_DROP_INFO = _DropInfo()


def quiet() -> None:
    """Install the filters (once per process; calling it again changes nothing)."""
    for pattern, _ in SILENCED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in _RANK_ZERO_LOGGERS:
        logging.getLogger(name).addFilter(_DROP_INFO)


def quiet_wandb_logger(logger) -> None:
    """Remove the causes of two W&B warnings of Lightning's ``WandbLogger`` before it starts its run.

    * "The anonymous setting has no effect": Lightning always passes ``anonymous`` to ``wandb.init`` (None unless
      the logger's ``anonymous`` is set), which recent W&B versions warn about; None is W&B's default, so it is dropped.
    * "git root <save_dir> does not exist": W&B looks for the git commit from ``save_dir`` before creating it, so
      a first run in a new folder warns and records no commit; the folder is created first.
    """
    from lightning.pytorch.loggers import WandbLogger

    init = getattr(logger, "_wandb_init", None)
    if not isinstance(logger, WandbLogger) or not isinstance(init, dict):
        return
    if "anonymous" in init and init["anonymous"] is None:
        del init["anonymous"]
    if init.get("dir"):
        os.makedirs(init["dir"], exist_ok=True)
