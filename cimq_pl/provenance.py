"""What a `fit` checkpoint records of the run that wrote it, and the check that a later run agrees with it.

Every checkpoint of a `CIMQModule` (``last.ckpt``, ``ptq.ckpt``) carries, under ``checkpoint["cimq"]``:

* ``cim``: the macro (the `CIMSpec` fields, or None for the float network);
* ``cim_overrides``: the per-layer overrides of the macro (``model.cim_overrides``, None when there are none);
* ``techniques``: the technique callbacks and their settings, e.g. ``{"BitSparseActivations": {"max_ones": 2, ...}}``;
* ``quantizer_options``: each CIM layer's `QuantizerOptions`, what its quantizers were built from;
* ``wandb_run_id``: the W&B run, so that a resumed fit logs into the same run and checkpoint folder;
* ``device``: the `DeviceSpec` fields of ``model.device`` (or None) and ``noise_aware``: whether the run lists
  `NoiseAwareTraining` (its training drew chips of that device). For the record and the export only: a network
  is tested on any device.

``test``/``validate``/``export``/a resumed ``fit`` whose config disagrees (another model, macro or technique set)
is refused while the command line is parsed, before the model is built or W&B starts, with one line naming
the field, both values and the flag that makes them agree.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from typing import Any, Iterable, Mapping

from cimq_pl.errors import ConfigError

__all__ = ["RECORD_KEY", "STATE_SHAPING_FIELDS", "check_config_agrees", "check_quantizer_options", "configured_techniques", "quantizer_options", "resolve_class", "run_record",
           "technique_settings"]

RECORD_KEY = "cimq"


def _plain(value: Any) -> Any:
    """``value`` as JSON types (tuples become lists), so records compare equal however they were made."""
    return json.loads(json.dumps(value))


def technique_settings(callbacks: Iterable[Any]) -> dict[str, dict]:
    """``{callback class name: its technique config as plain values}`` for the technique callbacks listed."""
    from cimq_pl.callbacks.technique import TechniqueCallback

    return {type(cb).__name__: _plain(dataclasses.asdict(cb.config))
            for cb in callbacks if isinstance(cb, TechniqueCallback)}


def quantizer_options(model) -> dict[str, dict]:
    """``{CIM layer name: its QuantizerOptions as plain values}`` of ``model``."""
    from cimq_pl.quant import cim_layers

    return {name: _plain(dataclasses.asdict(layer.options)) for name, layer in cim_layers(model) if hasattr(layer, "options")}


def run_record(pl_module) -> dict[str, Any]:
    """The record `CIMQModule.on_save_checkpoint` stores under ``checkpoint["cimq"]``."""
    from lightning.pytorch.loggers import WandbLogger

    trainer = pl_module.trainer
    record = {
        "cim": _plain(pl_module.hparams.get("cim")),
        "cim_overrides": _plain(pl_module.hparams.get("cim_overrides")),
        "techniques": technique_settings(trainer.callbacks),
        "quantizer_options": quantizer_options(pl_module.model),
        "device": _plain(dataclasses.asdict(pl_module.device_spec)) if getattr(pl_module, "device_spec", None) else None,
        "noise_aware": any(type(cb).__name__ == "NoiseAwareTraining" for cb in trainer.callbacks),
    }
    logger = trainer.logger
    if isinstance(logger, WandbLogger):
        record["wandb_run_id"] = logger.version
    return record


def _as_dict(value: Any) -> Any:
    """A jsonargparse Namespace (or dataclass) as a plain dict; anything else unchanged."""
    if hasattr(value, "as_dict"):
        return value.as_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def resolve_class(class_path: str) -> type | None:
    """The class a config's ``class_path`` names, or None when it cannot be imported (the parser reports that)."""
    module_name, _, class_name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError):
        return None  # jsonargparse reports unknown classes itself


def configured_techniques(callbacks_config: Any) -> dict[str, dict]:
    """The technique settings a parsed ``trainer.callbacks`` config will build (same shape as `technique_settings`)."""
    from cimq_pl.callbacks.technique import TechniqueCallback

    callbacks = []
    for entry in callbacks_config or []:
        entry = _as_dict(entry)
        if not isinstance(entry, Mapping) or "class_path" not in entry:
            continue
        cls = resolve_class(entry["class_path"])
        if isinstance(cls, type) and issubclass(cls, TechniqueCallback):
            callbacks.append(cls(**(_as_dict(entry.get("init_args")) or {})))
    return technique_settings(callbacks)


def _cim_flag(field: str, value: Any) -> str:
    return f"--model.cim.{field} {'null' if value is None else value}"


def check_config_agrees(checkpoint: Mapping, model_config: Mapping, techniques: dict[str, dict] | None,
                        path: str, what: str = "ckpt_path") -> None:
    """Refuse ``checkpoint`` (read from ``path``) when the run's config differs from the one that wrote it.

    Args:
        checkpoint: the Lightning checkpoint.
        model_config: the parsed ``model`` section (name, num_classes, cim).
        techniques: the technique settings of the parsed ``trainer.callbacks`` (`configured_techniques`).
        path: the checkpoint's path, for the message.
        what: how the message names the checkpoint (``ckpt_path``, ``QAT init_from``).

    Raises:
        ConfigError: naming the first field that differs, both values and the flag that makes them agree.
    """
    where = f"{what} {path!r}"
    hparams = checkpoint.get("hyper_parameters") or {}
    for field in ("name", "num_classes"):
        if field in hparams and field in model_config and hparams[field] != model_config[field]:
            raise ConfigError(f"{where} was written for model.{field}={hparams[field]!r} but the config gives "
                              f"{model_config[field]!r}: pass --model.{field} {hparams[field]} or use the run's config")
    record = checkpoint.get(RECORD_KEY)
    saved_cim = record["cim"] if isinstance(record, Mapping) else hparams.get("cim", "unrecorded")
    if saved_cim != "unrecorded" and "cim" in model_config:
        _check_cim(where, _plain(saved_cim), _plain(_as_dict(model_config["cim"])))
        saved_overrides = record.get("cim_overrides") if isinstance(record, Mapping) else hparams.get("cim_overrides")
        _check_overrides(where, saved_overrides, model_config.get("cim_overrides"))
    if isinstance(record, Mapping) and techniques is not None:
        _check_techniques(where, record.get("techniques", {}), techniques)


def _check_cim(where: str, saved: dict | None, configured: dict | None) -> None:
    if saved is None and configured is None:
        return
    if saved is None:
        raise ConfigError(f"{where} holds the float network (model.cim null) but the config puts it on a CIM macro: "
                          "pass --model.cim null, or test the checkpoint the quantized run wrote")
    if configured is None:
        raise ConfigError(f"{where} was written for a CIM macro ({_short(saved)}) but the config gives model.cim "
                          "null: add the technique config the run used (--config configs/quant/...)")
    for field in sorted(saved.keys() | configured.keys()):
        if saved.get(field) != configured.get(field):
            raise ConfigError(f"{where} was written for model.cim.{field}={saved.get(field)!r} but the config gives "
                              f"{configured.get(field)!r}: pass {_cim_flag(field, saved.get(field))} "
                              "(or use the config the run was made with)")


def _check_overrides(where: str, saved: Any, configured: Any) -> None:
    """Refuse per-layer overrides that differ (a checkpoint without a record of them had none)."""
    from cimq_pl.quant.overrides import normalize_overrides

    saved, configured = (_plain(normalize_overrides(_as_dict(value))) for value in (saved, configured))
    if saved == configured:
        return
    layers = [*saved, *(name for name in configured if name not in saved)]  # in the order the configs list them
    name = next(name for name in layers if saved.get(name) != configured.get(name))
    raise ConfigError(f"{where} was written for model.cim_overrides[{name!r}]={saved.get(name)!r} but the config gives "
                      f"{configured.get(name)!r}: pass the per-layer config the run used (--config <its overrides "
                      f"YAML>, or --model.cim_overrides '{json.dumps(saved) if saved else 'null'}')")


def _renamed_settings(name: str, settings: Mapping) -> dict:
    """A technique's recorded settings under today's field names (records of the release before the renames)."""
    import cimq_pl.callbacks

    renamed = getattr(getattr(cimq_pl.callbacks, name, None), "renamed", {})
    return {renamed.get(field, field): value for field, value in settings.items()}


def _with_defaults(name: str, settings: Mapping) -> dict:
    """``settings`` of technique ``name`` with the defaults of the fields it lacks (a record made before a field
    existed was made with its default)."""
    import cimq_pl.callbacks

    config_type = getattr(getattr(cimq_pl.callbacks, name, None), "config_type", None)
    if config_type is None or not dataclasses.is_dataclass(config_type):
        return dict(settings)
    defaults = {field.name: _plain(field.default) for field in dataclasses.fields(config_type)
                if field.default is not dataclasses.MISSING}
    return {**defaults, **settings}


#: Technique settings whose ``"auto"`` each layer resolves for itself and records in its `QuantizerOptions`
#: (`PartialSumClipping.observer` and ``asymmetric``: by the layer's ADC bits). ``"auto"`` and an explicit value
#: agree here; the layers' recorded options must still agree (`check_quantizer_options`).
RESOLVED_PER_LAYER = frozenset({("PartialSumClipping", "observer"), ("PartialSumClipping", "asymmetric")})


def _check_techniques(where: str, saved: Mapping[str, dict], configured: Mapping[str, dict]) -> None:
    saved = {name: _renamed_settings(name, settings) for name, settings in saved.items()}
    missing, extra = sorted(saved.keys() - configured.keys()), sorted(configured.keys() - saved.keys())
    if missing:
        made_with = "; ".join(f"{name}({_short(saved[name])})" for name in missing)
        raise ConfigError(f"{where} was made with the technique(s) {made_with}, which the config does not list: "
                          "add them to trainer.callbacks (use the technique config the run used)")
    if extra:
        raise ConfigError(f"{where} was made without the technique(s) {', '.join(extra)}, which the config lists: "
                          f"pass --without {','.join(extra)}")
    for name in sorted(saved):
        mine, theirs = _with_defaults(name, saved[name]), _with_defaults(name, configured[name])
        for field in sorted(mine.keys() | theirs.keys()):
            if (name, field) in RESOLVED_PER_LAYER and "auto" in (mine.get(field), theirs.get(field)):
                continue  # each layer records what "auto" gave it: `check_quantizer_options` compares those
            if mine.get(field) != theirs.get(field):
                raise ConfigError(f"{where} was made with {name}.{field}={mine.get(field)!r} but the config "
                                  f"gives {theirs.get(field)!r}: set {field}: {mine.get(field)!r} in "
                                  f"the {name} init_args (or use the config the run was made with)")


#: `QuantizerOptions` fields added after checkpoints were written, with the value those checkpoints were made with.
FIELDS_BEFORE_THEY_EXISTED = {"psum_asymmetric": False}
#: What to set when a layer's recorded option differs, for options a preset's ``"auto"`` resolves per layer.
FIELD_HINTS = {"psum_asymmetric": " (PartialSumClipping asymmetric: true or false as the run had it; the CIMQ presets' "
                                  "auto gives ADCs of 2 bits and fewer asymmetric ranges)",
               "psum_observer": " (PartialSumClipping observer as the run had it)"}
#: `QuantizerOptions` fields that change nothing outside training (QDrop's keep probabilities).
TRAINING_ONLY_FIELDS = frozenset({"input_keep_prob", "psum_keep_prob"})
#: `QuantizerOptions` fields that decide which tensors a layer holds and their shapes (scales per tile or column,
#: ADC range offsets): a PTQ checkpoint whose layers differ in them cannot start QAT or a search.
STATE_SHAPING_FIELDS = frozenset({"weight_granularity", "psum_granularity", "psum_asymmetric"})


def check_quantizer_options(record: Mapping | None, current: Mapping[str, dict], where: str,
                            fields: frozenset[str] | None = None) -> None:
    """Refuse a checkpoint whose layers' `QuantizerOptions` differ from the model's (the last safety net:
    the macro and technique checks at parse time normally catch the cause first). ``fields`` limits the comparison
    (`STATE_SHAPING_FIELDS` for a PTQ checkpoint that starts QAT, whose rounding and regulariser may differ).

    QDrop's keep probabilities (`TRAINING_ONLY_FIELDS`) are not compared: they act in training mode only, a changed
    `QuantDropping` is refused by the technique check, and a checkpoint written before ``QuantDropping.int8_layers``
    records 0.5 for the ``int8`` edge layers, where dropping never happened (their quantizers stayed in eval mode).
    """
    if not isinstance(record, Mapping) or "quantizer_options" not in record:
        return
    from cimq_pl.quant.options import RENAMED_FIELDS

    saved = {layer: {**FIELDS_BEFORE_THEY_EXISTED,
                     **{RENAMED_FIELDS.get(field, field): value for field, value in options.items()}}
             for layer, options in record["quantizer_options"].items()}
    layers = saved.keys() | current.keys() if fields is None else saved.keys() & current.keys()
    for layer in sorted(layers):  # with ``fields``, a layer one side lacks is left to the state dict's check
        if layer not in saved or layer not in current:
            holder, other = ("this run", "the checkpoint's model") if layer not in saved else \
                ("the checkpoint", "this run's model")
            raise ConfigError(f"{where}: {holder} has CIM layer {layer!r}, which {other} does not; use the model "
                              "config the run was made with")
        compared = saved[layer].keys() - TRAINING_ONLY_FIELDS
        for field in sorted(compared if fields is None else compared & fields):
            built = current[layer].get(field, FIELDS_BEFORE_THEY_EXISTED.get(field))
            if saved[layer][field] != built:
                raise ConfigError(f"{where}: layer {layer!r} was quantized with {field}={saved[layer][field]!r} but "
                                  f"this run builds {built!r}; use the technique and PTQ/QAT "
                                  f"callbacks the run was made with{FIELD_HINTS.get(field, '')}")


def _short(settings: Mapping) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in settings.items())
