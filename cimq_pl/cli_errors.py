"""One short ``error:`` line for the input mistakes jsonargparse reports as a multi-line union dump.

When parsing fails, :func:`explain_parse_error` re-reads the raw input (the ``--config`` files and the
``--key value`` arguments after the subcommand) and names the first clear cause it finds:

* a config file that is empty or holds something other than a mapping of sections;
* an unknown ``model``, ``model.cim``, ``model.device`` or ``trainer`` key (with the closest valid one) or a value of the wrong type;
* an unknown callback or data class (with the closest class path), or an unknown argument of one (with the
  closest valid one) or a value of the wrong type.

A cause counts only if jsonargparse's message mentions it (the bad key, class or value); otherwise the
function returns None and :func:`cimq_pl.cli.main` prints jsonargparse's own message.

Importing this module imports :mod:`cimq_pl.callbacks`, so that jsonargparse resolves their short names
(``class_path: PostTrainingQuantization``, ``--trainer.callbacks.help PostTrainingQuantization``).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import types
import typing
from pathlib import Path
from typing import Any, Iterator, Literal, Union

import yaml
from lightning.pytorch import Callback

import cimq_pl.callbacks
import cimq_pl.datamodules
from cimq_pl.module import CIMQModule
from cimq_pl.quant.device import DeviceSpec
from cimq_pl.quant.spec import CIMSpec
from cimq_pl.trainer import CIMQTrainer

__all__ = ["explain_parse_error"]

SECTIONS = "(model, data, trainer)"
CLASS_SECTIONS = {"trainer.callbacks": Callback, "data": cimq_pl.datamodules.ImageClassificationDataModule}


def explain_parse_error(message: str, args: list[str], subcommands) -> str | None:
    """The first cause in ``args`` that jsonargparse's ``message`` mentions, as one line; None if none is found.

    Args:
        message: the text of jsonargparse's ``ArgumentError``.
        args: the command line (without the program name), as given to the parser.
        subcommands: names of the CLI's subcommands; the arguments after the first one are read.
    """
    for needle, explanation in _problems(_after_subcommand(args, subcommands)):
        if needle in message:
            return explanation
    return None


def _after_subcommand(args: list[str], subcommands) -> list[str]:
    for i, arg in enumerate(args):
        if arg in subcommands:
            return args[i + 1:]
    return args


def _flags(args: list[str]) -> Iterator[tuple[str, Any]]:
    """``(key, value)`` per ``--key value`` / ``--key=value`` / ``--key+=value``; the value as YAML reads it."""
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if not arg.startswith("--"):
            continue
        if "=" in arg:
            key, text = arg[2:].split("=", 1)
            key = key.rstrip("+")
        elif i < len(args) and not args[i].startswith("--"):
            key, text = arg[2:], args[i]
            i += 1
        else:
            continue
        yield key, text if key == "config" else _load(text)


def _load(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _problems(args: list[str]) -> Iterator[tuple[str, str]]:
    """``(needle, explanation)`` for each problem found, in the order jsonargparse reads the input."""
    last = dict.fromkeys(CLASS_SECTIONS)  # per section, the class that `--SECTION.KEY value` sets an argument of
    for key, value in _flags(args):
        if key == "config":
            config = yield from _config_file(value)
            if not isinstance(config, dict):
                continue
            yield from _model_section(config.get("model"))
            yield from _trainer_section(config.get("trainer"))
            if "data" in config:
                last["data"] = yield from _classes("data", config["data"], last["data"])
            if isinstance(config.get("trainer"), dict) and "callbacks" in config["trainer"]:
                section = "trainer.callbacks"
                last[section] = yield from _classes(section, config["trainer"]["callbacks"], last[section])
            continue
        section, _, name = key.rpartition(".")
        section = section.removesuffix(".init_args")
        if key in CLASS_SECTIONS:
            last[key] = yield from _classes(key, value, last[key])
        elif section in CLASS_SECTIONS:
            if last[section] and name not in ("help", "class_path", "init_args", "dict_kwargs"):
                yield from _class_arguments(section, last[section], {name: value})
        elif key.startswith("model."):
            yield from _model_section(_nest(key.split(".")[1:], value))
        elif key.startswith("trainer."):
            yield from _trainer_section(_nest(key.split(".")[1:], value))


def _nest(keys: list[str], value: Any) -> dict:
    for key in reversed(keys):
        value = {key: value}
    return value


def _config_file(path: str) -> Iterator[tuple[str, str]]:
    """Problems of the config file itself; returns its content (None when it cannot be read)."""
    try:
        content = yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):  # jsonargparse's own message names these
        return None
    if content is None:
        yield "Unexpected config", f"config file {path!r} is empty"
    elif not isinstance(content, dict):
        kind = "a list" if isinstance(content, list) else f"a single value ({content!r})"
        yield "Unexpected config", f"config file {path!r} holds {kind}, expected a mapping of sections {SECTIONS}"
    return content


def _model_section(model: Any) -> Iterator[tuple[str, str]]:
    if not isinstance(model, dict):
        return
    yield from _arguments("model", CIMQModule, {k: v for k, v in model.items() if k not in ("cim", "device")},
                          ": unknown key")
    for key, spec_class in (("cim", CIMSpec), ("device", DeviceSpec)):
        spec = model.get(key)
        if isinstance(spec, dict):
            spec = spec.get("init_args", spec) if "class_path" in spec or "init_args" in spec else spec
            if isinstance(spec, dict):
                yield from _arguments(f"model.{key}", spec_class, spec, ": unknown key")


def _trainer_section(trainer: Any) -> Iterator[tuple[str, str]]:
    if isinstance(trainer, dict):
        yield from _arguments("trainer", CIMQTrainer, {k: v for k, v in trainer.items() if k != "callbacks"},
                              ": unknown key")


def _classes(section: str, value: Any, last: str | None) -> Iterator[tuple[str, str]]:
    """Problems of a section that names classes (a list, one entry or a class path); returns the last class."""
    if isinstance(value, dict) and "class_path" not in value and last:  # arguments of the class given before
        yield from _class_arguments(section, last, _entry_arguments(value))
        return last
    for entry in value if isinstance(value, list) else [value]:
        if isinstance(entry, str) and not _is_file(entry):
            entry = {"class_path": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("class_path"), str):
            continue
        last = entry["class_path"]
        if _class(section, last) is None:
            yield last, f"{section}: unknown class {last!r} ({_class_hint(section, last)})"
        else:
            yield from _class_arguments(section, last, _entry_arguments(entry))
    return last


def _is_file(text: str) -> bool:
    try:
        return Path(text).is_file()
    except (OSError, ValueError):  # a name too long, a NUL byte
        return False


def _entry_arguments(entry: dict) -> dict:
    arguments = {k: v for k, v in entry.items() if k not in ("class_path", "init_args", "dict_kwargs")}
    if isinstance(entry.get("init_args"), dict):
        arguments.update(entry["init_args"])
    return arguments


def _class_arguments(section: str, class_path: str, arguments: dict) -> Iterator[tuple[str, str]]:
    cls = _class(section, class_path)
    if cls is not None:
        yield from _arguments(f"{section}: {cls.__name__}", cls, arguments, " has no argument")


def _public_classes(section: str) -> dict[str, str]:
    """Short class name -> class path of the classes to suggest for ``section``."""
    if section == "data":
        return {name: f"cimq_pl.datamodules.{name}" for name in cimq_pl.datamodules.__all__}
    known = {name: f"cimq_pl.callbacks.{name}" for name in cimq_pl.callbacks.__all__}
    for name in importlib.import_module("lightning.pytorch.callbacks").__all__:
        known.setdefault(name, f"lightning.pytorch.callbacks.{name}")
    known.pop("Callback")
    return known


def _class(section: str, class_path: str) -> type | None:
    """The class ``class_path`` names (a dotted path, or a short name as jsonargparse resolves it), or None."""
    if "." not in class_path:
        known = _public_classes(section)
        stack = [CLASS_SECTIONS[section]]
        while stack:  # any imported subclass, as jsonargparse does
            cls = stack.pop()
            stack.extend(cls.__subclasses__())
            if "<locals>" not in cls.__qualname__:
                known.setdefault(cls.__name__, f"{cls.__module__}.{cls.__qualname__}")
        class_path = known.get(class_path, "")
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except Exception:  # noqa: BLE001 - any failure to import means: no such class
        return None
    return cls if inspect.isclass(cls) else None


def _class_hint(section: str, class_path: str) -> str:
    known = _public_classes(section)
    close = difflib.get_close_matches(class_path.rpartition(".")[2], known, n=1)
    if close:
        return f"did you mean {known[close[0]]}?"
    if section == "data":
        return f"allowed: {', '.join(known.values())}"
    ours = ", ".join(cimq_pl.callbacks.__all__)
    return f"cimq_pl.callbacks: {ours}; or Lightning's"


def _arguments(where: str, cls: type, given: dict, unknown: str) -> Iterator[tuple[str, str]]:
    """Keys of ``given`` that ``cls`` does not take (``unknown`` tells how to say so), and values of the wrong type
    (for plain annotations)."""
    parameters = _parameters(cls)
    if parameters is None:
        return
    for key, value in given.items():
        if key not in parameters:
            close = difflib.get_close_matches(str(key), parameters, n=1)
            hint = f"did you mean {close[0]!r}?; " if close else ""
            listed = f"allowed: {', '.join(parameters)}" if len(parameters) <= 16 else "see --help"
            yield str(key), f"{where}{unknown} {key!r} ({hint}{listed})"
        elif parameters[key] is not None:
            expected = _mismatch(value, parameters[key])
            if expected:
                yield str(value), f"{where}.{key}: {value!r} is not {expected}"


def _parameters(cls: type) -> dict[str, Any] | None:
    """Argument name -> type hint (None if unknown) of ``cls``, following ``**kwargs`` to the base classes as
    jsonargparse does; None when ``cls`` takes any keyword."""
    if dataclasses.is_dataclass(cls):
        hints = _type_hints(cls)
        return {field.name: hints.get(field.name) for field in dataclasses.fields(cls)}
    parameters = {}
    for base in cls.__mro__:
        if "__init__" not in vars(base):
            continue
        init = vars(base)["__init__"]
        hints = _type_hints(init)
        try:
            signature = inspect.signature(init)
        except (TypeError, ValueError):
            return None
        for name, parameter in list(signature.parameters.items())[1:]:  # skip self
            if parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY):
                parameters.setdefault(name, hints.get(name))
        if not any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
            return parameters
    return None


def _type_hints(obj) -> dict:
    try:
        return typing.get_type_hints(obj)
    except Exception:  # noqa: BLE001 - annotations that do not resolve are not checked
        return {}


def _mismatch(value: Any, hint: Any) -> str | None:
    """What ``hint`` expects when ``value`` does not fit it; None if it fits or the hint is not a plain one."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (Union, types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    expected, choices = [], []
    for option in options:
        if option is type(None):
            continue
        if option is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return None
            expected.append("an integer")
        elif option is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool) or _is_float_text(value):
                return None
            expected.append("a number")
        elif option is bool:
            if isinstance(value, bool):
                return None
            expected.append("true or false")
        elif typing.get_origin(option) is Literal:
            if value in typing.get_args(option):
                return None
            choices += typing.get_args(option)
        else:
            return None  # str, paths, sequences...: left to jsonargparse
    if choices:
        close = difflib.get_close_matches(str(value), [str(choice) for choice in choices], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        expected.append(f"one of {', '.join(repr(choice) for choice in choices)}{hint}")
    return " or ".join(expected) or None


def _is_float_text(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return isinstance(value, str)
