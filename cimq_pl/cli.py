"""``python -m cimq_pl {fit,validate,test,predict,export,cost,search} --config ...``: LightningCLI with friendly failures.

* Several ``--config`` files compose, later ones overriding earlier ones (model/data config + technique config).
* Without a W&B API key, W&B runs offline (``WANDB_MODE=offline``) instead of failing or prompting.
* The resolved config is logged to the run's logger and may be re-saved over an earlier run's copy.
* Bad input (:class:`~cimq_pl.errors.ConfigError`) prints one ``error:`` line and exits with status 2.
* A loss that turns NaN/inf stops the fit with one ``error:`` line naming the block and quantizer (status 1).
* SIGTERM (pre-emption) stops a fit after the current step, with status 143 (128 + SIGTERM); a
  ``ModelCheckpoint(save_on_exception=True)`` in the config has then saved the step to resume from.
"""

from __future__ import annotations

import difflib
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Optional

from jsonargparse import ArgumentError
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.exceptions import SIGTERMException

from cimq_pl import preemption
from cimq_pl.cpu_runtime import hide_absent_gpus, keep_freed_memory
from cimq_pl.checkpointing import resume_checkpoint
from cimq_pl.cli_errors import explain_parse_error
from cimq_pl.datamodules import ImageClassificationDataModule
from cimq_pl.errors import ConfigError
from cimq_pl.models.pretrained import read_checkpoint
from cimq_pl.provenance import RECORD_KEY, check_config_agrees, configured_techniques, resolve_class
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
        """Lightning's subcommands plus ``export`` (`CIMQTrainer.export`: test, then write the deployment export),
        ``cost`` (`CIMQTrainer.cost`: the hardware cost of the configuration without training) and ``search``
        (`CIMQTrainer.search`: per-layer precisions under an energy or loss budget)."""
        return {**LightningCLI.subcommands(), "export": {"model", "datamodule"}, "cost": {"model", "datamodule"},
                "search": {"model", "datamodule"}}

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("trainer_class", CIMQTrainer)
        kwargs.setdefault("save_config_callback", LoggerSaveConfigCallback)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("subclass_mode_data", True)
        # parse errors are raised (not printed with the whole usage) so that `main` can report them on one line
        # ... and an abbreviated flag (`--trainer.max_epoch`) is an unknown key, not silently another one
        no_exit = {"exit_on_error": False, "allow_abbrev": False}
        kwargs.setdefault("parser_kwargs", {**no_exit, **{name: dict(no_exit) for name in self.subcommands()}})
        if not wandb_key_available():  # offline, never a failure or a prompt: from Python as from the command line
            os.environ.setdefault("WANDB_MODE", "offline")
        keep_freed_memory()  # glibc keeps freed tensor memory: no fresh pages every step (cimq_pl/cpu_runtime.py)
        hide_absent_gpus()  # no NVML probe at every optimizer step where no GPU is usable
        super().__init__(CIMQModule, ImageClassificationDataModule, *args, **kwargs)

    def before_instantiate_classes(self) -> None:
        """Checks that need no model, before it is built: sections given as something other than a mapping
        (``model: [1, 2]``), devices the machine lacks (more CPU processes than cores is a warning), missing data."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        for section in ("model", "data", "trainer"):
            value = config.get(section)
            if value is not None and not hasattr(value, "items") and not hasattr(value, "__dict__"):
                raise ConfigError(f"config section {section!r} is a {type(value).__name__} ({value!r}): expected a mapping of arguments")
        _move_deprecated_settings(config)
        _check_devices(config.trainer)
        _choose_ptq_strategy(config.trainer)
        _check_data_source(config.get("data"))
        if "weights_only" in config and config.weights_only is None:
            config.weights_only = True  # --ckpt_path was verified weights-only (`_parse_ckpt_path`): load it so too

    def after_instantiate_classes(self) -> None:
        """Data of another number of classes than the model is refused before the run (and W&B) starts."""
        super().after_instantiate_classes()
        if self.datamodule is not None:
            self.model.check_data(self.datamodule)

    def _run_subcommand(self, subcommand: str) -> None:
        """Run the subcommand with SIGTERM deferred to a safe point, then print where its results went."""
        with preemption.deferring():
            try:
                super()._run_subcommand(subcommand)
            except preemption.Preempted:
                raise
            except SIGTERMException as stop:
                resume = resume_checkpoint(self.trainer) if subcommand == "fit" else None
                raise preemption.Preempted(subcommand, resume) from stop
            except Exception as err:
                if preemption.requested():  # e.g. a DataLoader worker the same SIGTERM stopped first
                    raise preemption.Preempted(subcommand, None) from err
                raise
        if self.trainer.is_global_zero:
            self._print_outputs()

    def _print_outputs(self) -> None:
        """One line per output of the run: its folder, the checkpoints and the hardware report's files."""
        trainer = self.trainer
        lines = []
        if isinstance(trainer.logger, WandbLogger):
            lines.append(("run folder", Path(trainer.logger.experiment.dir).parent))
        elif trainer.logger is not None:
            lines.append(("run folder", trainer.log_dir))
        for callback in trainer.callbacks:
            lines.extend(callback.output_files() if hasattr(callback, "output_files") else ())
        for checkpointing in trainer.checkpoint_callbacks:
            if getattr(checkpointing, "last_model_path", ""):
                lines.append(("last checkpoint", checkpointing.last_model_path))
        for label, path in lines:
            print(f"[cimq] {label}: {path}", flush=True)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--without", type=Optional[str], default=None,
            help="Comma-separated callbacks to drop from trainer.callbacks, by class name, e.g. "
                 "'BitSparseActivations,QuantDropping' (switch techniques off without copying the callback list)",
        )

    def _drop_callbacks_without(self, config) -> None:
        """Remove the callbacks named by ``--without`` from ``config.trainer.callbacks`` (unknown names are an error)."""
        names = [name.strip() for name in (config.get("without") or "").split(",") if name.strip()]
        if not names:
            return
        callbacks = config.trainer.get("callbacks") or []
        listed = [entry.class_path.rpartition(".")[2] for entry in callbacks]
        for name in names:
            short = name.rpartition(".")[2]
            if short not in listed:
                close = difflib.get_close_matches(short, listed, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise ConfigError(f"--without {name!r}: no such callback in trainer.callbacks{hint}; listed: "
                                  f"{', '.join(listed) or 'none'}")
        drop = {name.rpartition(".")[2] for name in names}
        config.trainer.callbacks = [entry for entry, short in zip(callbacks, listed) if short not in drop]

    def _parse_ckpt_path(self) -> None:
        # Runs right after parsing, before LightningCLI merges the checkpoint's hyperparameters into the config:
        # apply --without, then check that ``--ckpt_path`` is a readable weights-only checkpoint written for this
        # model, macro and technique set, so that any mismatch is one clear error before anything is built.
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config  # run=False: no subcommand
        self._drop_callbacks_without(config)
        path = config.get("ckpt_path")
        if path and path not in ("last", "best", "hpc", "registry"):
            checkpoint = read_checkpoint(path, "ckpt_path")
            if "state_dict" not in checkpoint or "pytorch-lightning_version" not in checkpoint:
                raise ConfigError(
                    f"ckpt_path {path!r} is not a Lightning checkpoint written by `fit` (it holds "
                    f"{sorted(checkpoint)[:4]}...); pretrained float weights go in model.pretrained"
                )
            techniques = configured_techniques(config.trainer.get("callbacks"))
            check_config_agrees(checkpoint, config.model.as_dict(), techniques, path)
            if subcommand == "fit":
                _resume_logger_run(config, checkpoint)
        super()._parse_ckpt_path()


def _check_data_source(data_config) -> None:
    """Refuse missing data (``data.root``) before the model is built or W&B starts: the datamodule is cheap to
    build, its data is not read here."""
    cls = resolve_class(data_config.class_path) if hasattr(data_config, "class_path") else None
    if isinstance(cls, type) and issubclass(cls, ImageClassificationDataModule):
        cls(**data_config.init_args.as_dict()).check_source()


def _move_deprecated_settings(config) -> None:
    """Read the keys of the release before for one more release: `PostTrainingQuantization`'s reconstruction
    settings (``iters_per_block``, ``batch_size``, ...) and `QuantizationAwareTraining`'s ``quantizer_lr_scale`` are the
    objective's now (``model.objective.init_args``). Given in a callback's init_args, they are moved there (over
    what ``model.objective`` says: the callback's keys are the ones the user wrote) with a FutureWarning naming
    the new key.

    Raises:
        ConfigError: old keys of one objective while ``model.objective`` is another.
    """
    from cimq_pl.callbacks.ptq import MOVED_TO_OBJECTIVE, PostTrainingQuantization
    from cimq_pl.callbacks.qat import QuantizationAwareTraining
    from cimq_pl.objectives import BlockReconstruction, TaskObjective

    moves = ((PostTrainingQuantization, MOVED_TO_OBJECTIVE, BlockReconstruction),
             (QuantizationAwareTraining, ("quantizer_lr_scale",), TaskObjective))
    for entry in config.trainer.get("callbacks") or []:
        cls = resolve_class(getattr(entry, "class_path", ""))
        init_args = getattr(entry, "init_args", None)
        for callback, names, objective in moves:
            if not (isinstance(cls, type) and issubclass(cls, callback)) or init_args is None:
                continue
            given = {name: init_args.get(name) for name in names if init_args.get(name) is not None}
            if not given:
                continue
            target = _objective_config(config.model, objective, f"{callback.__name__}.{next(iter(given))}")
            for name, value in given.items():
                target.init_args[name] = value
                init_args[name] = None
            new_keys = ", ".join(f"model.objective.init_args.{name}" for name in given)
            rank_zero_warn(f"{callback.__name__}.{'/'.join(given)} is deprecated and read this release only: set "
                           f"{new_keys} (model.objective.class_path: cimq_pl.objectives.{objective.__name__})",
                           category=FutureWarning)


def _objective_config(model_config, objective: type, old_key: str):
    """The ``model.objective`` config of class ``objective``: the configured one, or, if none is set, a new one with
    the class's defaults (as the parser would have made it)."""
    import inspect

    from jsonargparse import Namespace

    current = model_config.get("objective")
    if current is None:
        defaults = {name: p.default for name, p in inspect.signature(objective).parameters.items()}
        model_config.objective = current = Namespace(class_path=f"cimq_pl.objectives.{objective.__name__}",
                                                     init_args=Namespace(**defaults))
    cls = resolve_class(getattr(current, "class_path", ""))
    if not (isinstance(cls, type) and issubclass(cls, objective)):
        raise ConfigError(f"{old_key} is a setting of {objective.__name__} but model.objective is "
                          f"{getattr(current, 'class_path', current)}: set model.objective.class_path: "
                          f"cimq_pl.objectives.{objective.__name__} (and its init_args) instead")
    if current.get("init_args") is None:
        current.init_args = Namespace()
    return current


def _choose_ptq_strategy(trainer_config) -> None:
    """``--trainer.strategy ddp`` with PTQ becomes the DDP that lets the units not being reconstructed go without
    gradients (`PTQ_DDP_STRATEGY`), with one line saying so."""
    from cimq_pl.callbacks.ptq import PTQ_DDP_STRATEGY, PostTrainingQuantization

    if trainer_config.get("strategy") != "ddp":
        return
    for entry in trainer_config.get("callbacks") or []:
        cls = resolve_class(getattr(entry, "class_path", ""))
        if isinstance(cls, type) and issubclass(cls, PostTrainingQuantization):
            trainer_config.strategy = PTQ_DDP_STRATEGY
            rank_zero_info(f"[cimq] PTQ under DDP: trainer.strategy={PTQ_DDP_STRATEGY} (one unit learns at a time)")
            return


def _check_devices(trainer_config) -> None:
    """Refuse more GPUs than the machine has, before the model is built; warn when a CPU run asks for more
    processes (``trainer.devices``) than this machine has cores."""
    import torch

    devices, accelerator = trainer_config.get("devices"), trainer_config.get("accelerator")
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    gpus = torch.cuda.device_count()
    if accelerator in ("gpu", "cuda") and isinstance(devices, int) and devices > gpus:
        raise ConfigError(f"trainer.devices={devices} GPUs requested with trainer.accelerator={accelerator!r}, but this "
                          f"machine has {gpus}: use --trainer.devices {gpus} or --trainer.accelerator cpu" if gpus else
                          f"trainer.accelerator={accelerator!r} but this machine has no GPU: use --trainer.accelerator cpu")
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    cores = os.cpu_count() or 1
    if on_cpu and isinstance(devices, int) and devices > cores:
        rank_zero_warn(f"trainer.devices={devices} CPU processes on a machine with {cores} cores: each process gets "
                       f"a fraction of a core and the run is slower, not faster; use --trainer.devices {cores} or fewer")


def _resume_logger_run(config, checkpoint) -> None:
    """A fit resumed from ``checkpoint`` logs into the W&B run that wrote it (same run id, same checkpoint folder)."""
    record = checkpoint.get(RECORD_KEY) or {}
    run_id = record.get("wandb_run_id")
    logger = config.trainer.get("logger")
    if not run_id or not hasattr(logger, "class_path") or not logger.class_path.endswith("WandbLogger"):
        return
    if logger.init_args.get("id") or logger.init_args.get("version"):
        return  # the user chose a run
    logger.init_args.id = run_id
    logger.init_args.resume = "allow"
    rank_zero_info(f"[cimq] resuming W&B run {run_id} (from the checkpoint)")


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
    preemption.install()
    try:
        CIMQCLI(args=args)
    except SIGTERMException as stop:
        _close_preempted_run()
        print(f"error: {preemption.describe(stop, args if args is not None else sys.argv[1:])}", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
    except ArgumentError as err:  # a malformed config or argument: its cause in one short line, else jsonargparse's
        message = explain_parse_error(str(err), sys.argv[1:] if args is None else args, CIMQCLI.subcommands())
        message = message or " ".join(line.strip() for line in str(err).splitlines() if line.strip()) + " (see --help)"
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except MisconfigurationException as err:  # e.g. trainer.devices or accelerator the machine does not have
        message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        print(f"error: trainer: {message} (trainer.accelerator / trainer.devices)", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as err:  # the NaN/inf guards of the objectives: the message names the culprit
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except Exception as err:
        config_error = _config_error_in_chain(err)
        if config_error is None:
            raise
        _discard_offline_run()
        print(f"error: {config_error}", file=sys.stderr)
        sys.exit(2)


def _active_wandb_run():
    """The W&B run this process started, if any (W&B is not imported just to ask)."""
    return getattr(sys.modules.get("wandb"), "run", None)


def _close_preempted_run() -> None:
    """Close a W&B run stopped by SIGTERM as pre-empted, so the resumed fit can take up its run id at once."""
    run = _active_wandb_run()
    if run is not None:
        run.mark_preempting()
        run.finish(exit_code=128 + signal.SIGTERM)


def _discard_offline_run() -> None:
    """A run refused for bad input leaves no offline W&B folder behind: it holds nothing worth syncing."""
    run = _active_wandb_run()
    if run is None:
        return
    folder = Path(run.dir).parent
    offline = run.offline
    run.finish(exit_code=2)
    if offline:
        shutil.rmtree(folder, ignore_errors=True)
