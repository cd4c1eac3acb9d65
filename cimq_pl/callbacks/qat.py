"""Callback: quantization-aware training as an ordinary ``trainer.fit`` (SPEC 4.4, last sentence).

The module's task objective (`~cimq_pl.objectives.TaskObjective`: cross-entropy plus the bit-sparsity
regularizer, its ``quantizer_lr_scale``; or `~cimq_pl.objectives.DistillationObjective`, the same training towards
the float network's logits) trains the network weights together with the learned step sizes and ADC clips; this
callback gives them their start: the FP weights calibrated at ``on_fit_start``, or a PTQ checkpoint
(``init_from``; its AdaRound decisions are baked into the weights).
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from cimq_pl.callbacks.calibration import calibrate_module_, calibration_images
from cimq_pl.callbacks.technique import require_cim
from cimq_pl.errors import ConfigError
from cimq_pl.models.pretrained import check_state_dict_fits, read_checkpoint, read_state_dict
from cimq_pl.provenance import (RECORD_KEY, STATE_SHAPING_FIELDS, check_config_agrees, check_quantizer_options,
                                quantizer_options)
from cimq_pl.objectives import TaskObjective
from cimq_pl.quant import cim_layers

__all__ = ["QuantizationAwareTraining"]


class QuantizationAwareTraining(Callback):
    """Fine-tune the CIM model with the task loss (the module's `TaskObjective`, its default objective, or a subclass
    such as `DistillationObjective`).

    Learning rate, momentum and weight decay are the module's (``model.lr`` ...); the schedule is a cosine
    over the whole fit; the quantizers' learning-rate multiplier is the objective's
    (``model.objective: {class_path: cimq_pl.objectives.TaskObjective, init_args: {quantizer_lr_scale: 0.1}}``).

    Args:
        init_from: a checkpoint of this module after PTQ (``ptq.ckpt``); None starts from the FP weights and
            calibrates.
        quantizer_lr_scale: deprecated: `TaskObjective`'s (``model.objective.init_args.quantizer_lr_scale``); the
            CLI moves it there for one release.

    Raises:
        ConfigError: ``quantizer_lr_scale`` given in Python, an objective other than the task loss (at setup), or an
            ``init_from`` checkpoint that does not fit the model.
    """

    def __init__(self, init_from: Optional[str] = None, *, quantizer_lr_scale: Optional[float] = None):
        if quantizer_lr_scale is not None:
            raise ConfigError(f"QuantizationAwareTraining(quantizer_lr_scale={quantizer_lr_scale!r}): the setting is the "
                              f"objective's now: CIMQModule(objective=TaskObjective(quantizer_lr_scale="
                              f"{quantizer_lr_scale!r})) (model.objective in a config)")
        self.init_from = init_from

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        require_cim(pl_module, type(self).__name__)
        objective = getattr(pl_module, "objective", None)
        if not isinstance(objective, TaskObjective):
            raise ConfigError(f"QuantizationAwareTraining trains with the task loss, but model.objective is "
                              f"{type(objective).__name__}: leave model.objective unset (or set class_path: "
                              "cimq_pl.objectives.TaskObjective)")

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.ckpt_path is not None:  # resumed: the checkpoint holds the quantizers
            return
        if self.init_from is not None:
            load_ptq_checkpoint_(pl_module, self.init_from)
            rank_zero_info(f"[cimq] QAT starts from {self.init_from}")
        else:
            images = calibration_images(trainer.datamodule, pl_module.device)
            calibrate_module_(trainer, pl_module, images, getattr(trainer.datamodule, "seed", 0))


@torch.no_grad()
def load_ptq_checkpoint_(pl_module: LightningModule, path: str, who: str = "QAT init_from",
                         bake_offsets: bool = True) -> None:
    """Load a PTQ checkpoint into ``pl_module``, baking its hard AdaRound decisions into the weights
    (`WeightQuantizer.bake_rounding_`): round-to-nearest then reproduces the PTQ codes; learned output offsets
    (PTQ's ``lr_offset``) are added to the biases, which QAT then learns as any bias, or with ``bake_offsets``
    False kept as the layers' own `output_offset` (added with the bias only while the ADC is on). ``who`` names
    the setting in errors.

    Raises:
        ConfigError: the checkpoint cannot be read, was written for another macro or other per-layer overrides
            (``checkpoint["cimq"]``), with other weight-scale or ADC-range shapes (`STATE_SHAPING_FIELDS`), or does
            not fit the module.
    """
    checkpoint = read_checkpoint(path, who)
    if isinstance(checkpoint.get(RECORD_KEY), dict):  # the macro and its per-layer overrides must be the run's
        model_config = {key: pl_module.hparams.get(key) for key in ("name", "num_classes", "cim", "cim_overrides")}
        check_config_agrees(checkpoint, model_config, None, path, who)
        check_quantizer_options(checkpoint[RECORD_KEY], quantizer_options(pl_module.model), f"{who} {path!r}",
                                fields=STATE_SHAPING_FIELDS)
    state = checkpoint.get("state_dict")
    if not isinstance(state, Mapping):  # not a Lightning checkpoint: the network's own keys, as read_state_dict gives
        state = {f"model.{key}": value for key, value in read_state_dict(path, who).items()}
    logits = {k: v for k, v in state.items() if k.endswith("weight_quantizer.rounding_logits")}
    offsets = {k: v for k, v in state.items() if k.endswith(".output_offset")}
    rest = {k: v for k, v in state.items() if k not in logits and k not in offsets}
    check_state_dict_fits(pl_module.state_dict(), rest, f"{who} {path!r}", "the model",
                          " (it must be a PTQ checkpoint of the same model and model.cim)")
    pl_module.load_state_dict(rest, strict=True)
    for name, layer in cim_layers(pl_module.model):
        key = f"model.{name}.weight_quantizer.rounding_logits"
        if key in logits and layer.weight_quantizer is not None:
            layer.weight_quantizer.bake_rounding_(layer._weight4d(), logits[key])  # a view: linear layers too
        offset = offsets.get(f"model.{name}.output_offset")
        if offset is not None and bake_offsets:
            bake_output_offset_(layer, offset, name)
        elif offset is not None:
            if layer.add_output_offset_() is None:
                raise ConfigError(f"{who} {path!r} holds an output offset for layer {name!r}, which has no ADC here")
            layer.output_offset.copy_(offset.to(layer.output_offset))


@torch.no_grad()
def bake_output_offset_(layer, offset: torch.Tensor, name: str) -> None:
    """Add a PTQ checkpoint's learned output ``offset`` to ``layer``'s bias (QAT's optimizer already holds the
    biases, so a layer without one cannot take it: refused)."""
    if layer.bias is None:
        raise ConfigError(f"the PTQ checkpoint learned an output offset (BlockReconstruction.lr_offset) for layer "
                          f"{name!r}, which has no bias for QAT to add it to: refit PTQ with lr_offset: 0")
    layer.bias.add_(offset.to(layer.bias))


@torch.no_grad()
def reconstructed_state(pl_module: LightningModule, path: str, who: str) -> dict:
    """The network's (``pl_module.model``'s) state dict as the PTQ checkpoint ``path`` leaves it
    (`load_ptq_checkpoint_`: AdaRound decisions baked into the weights, learned output offsets kept as the layers'
    ``output_offset`` entries); ``pl_module`` itself is left as it was."""
    import copy

    saved = copy.deepcopy(pl_module.state_dict())
    without_offset = [layer for _, layer in cim_layers(pl_module.model) if layer.output_offset is None]
    load_ptq_checkpoint_(pl_module, path, who, bake_offsets=False)
    state = copy.deepcopy(pl_module.model.state_dict())
    for layer in without_offset:
        layer.output_offset = None
    pl_module.load_state_dict(saved)
    return state
