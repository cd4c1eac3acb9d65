"""Load pretrained weights from a local file or a URL, safely and with clear errors.

* A local file always takes precedence; it is read with ``torch.load(weights_only=True)``, so loading never
  executes code from the file.
* A file name carrying a torch.hub-style sha256 prefix (``resnet20-12fca82f.th``) is verified against it.
* A URL goes through ``torch.hub.load_state_dict_from_url(check_hash=True)``, which first looks in the hub
  cache (``$TORCH_HOME/hub/checkpoints``): with the file there, no network is needed.
* Checkpoints may be plain state dicts, ``{"state_dict": ...}`` (Lightning, DataParallel-era scripts) or
  ``{"model": ...}``; a ``module.`` (DataParallel) or ``model.`` (our LightningModule) prefix is stripped.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

from cimq_pl.errors import ConfigError
from cimq_pl.files import file_sha256

__all__ = ["check_state_dict_fits", "load_pretrained_", "read_checkpoint", "read_state_dict", "verify_sha256_prefix"]

# torch.hub convention: <name>-<sha256 prefix of at least 8 hex digits>.<ext>
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,64})\.[A-Za-z0-9]+$")
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
_PREFIXES = ("module.", "model.")


def verify_sha256_prefix(path: Path) -> None:
    """Check a file against the sha256 prefix in its name, if the name carries one.

    Raises:
        ConfigError: the file's sha256 does not start with the prefix in its name.
    """
    match = _HASH_IN_NAME.search(path.name)
    if match is None:
        return
    digest = file_sha256(path)
    if not digest.startswith(match.group(1)):
        raise ConfigError(
            f"checkpoint {str(path)!r} is corrupt or not the named file: its sha256 starts with "
            f"{digest[:len(match.group(1))]!r}, but its name says {match.group(1)!r}"
        )


def _unwrap(checkpoint: Mapping) -> dict[str, torch.Tensor]:
    for key in _WRAPPER_KEYS:
        if key in checkpoint and isinstance(checkpoint[key], Mapping):
            return _unwrap(checkpoint[key])
    state_dict = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    for prefix in _PREFIXES:
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
    return state_dict


def read_checkpoint(source: str | os.PathLike, what: str = "pretrained weights") -> Mapping:
    """Read a torch checkpoint (a mapping) from a local path (preferred) or an http(s) URL, weights-only.

    ``torch.load(weights_only=True)`` never executes code from the file.

    Args:
        source: path or URL.
        what: how the message names the file (``pretrained weights``, ``ckpt_path``).

    Raises:
        ConfigError: the path does not exist, the URL cannot be fetched, the file is not a weights-only torch
            checkpoint (truncated, foreign, or needing code to load), or its sha256 does not match its name.
    """
    source = str(source)
    if os.path.exists(source):
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"{what} {source!r} is a directory: expected a checkpoint file")
        verify_sha256_prefix(path)
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad file for the user
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(
                f"cannot read {what} {source!r} as a weights-only torch file (truncated or not a torch "
                f"checkpoint?): {first_line}"
            ) from err
    elif re.match(r"^https?://", source):
        try:
            checkpoint = torch.hub.load_state_dict_from_url(
                source, map_location="cpu", check_hash=True, weights_only=True, progress=True
            )
        except Exception as err:  # noqa: BLE001 - network, hash and format errors all mean "cannot get it"
            cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(source).name
            raise ConfigError(
                f"cannot download {what} {source!r} ({type(err).__name__}: {err}); "
                f"without a network, put the file at {str(cache)!r} or pass a local path"
            ) from err
    else:
        raise ConfigError(f"{what} {source!r} not found: expected an existing file path or an http(s) URL")
    if not isinstance(checkpoint, Mapping):
        raise ConfigError(f"{what} {source!r} holds a {type(checkpoint).__name__}, expected a state dict")
    return checkpoint


def read_state_dict(source: str | os.PathLike, what: str = "pretrained weights") -> dict[str, torch.Tensor]:
    """The state dict of the checkpoint at ``source`` (`read_checkpoint`, then unwrapped and de-prefixed).

    Raises:
        ConfigError: as `read_checkpoint`, or the checkpoint holds no tensors.
    """
    state_dict = _unwrap(read_checkpoint(source, what))
    if not state_dict:
        raise ConfigError(f"{what} {str(source)!r} holds no tensors")
    return state_dict


def check_state_dict_fits(expected: Mapping, found: Mapping, source: str, target: str, hint: str = "") -> None:
    """Raise a `ConfigError` naming the first missing, unexpected and wrongly shaped keys of ``found``.

    Only BatchNorm's ``num_batches_tracked`` counters may be missing (old checkpoints lack them).

    Args:
        expected: the state dict the target holds.
        found: the state dict read from ``source``.
        source: what was read, for the message (e.g. ``checkpoint 'x.ckpt'``).
        target: what it should fit, for the message.
        hint: appended to the message (what a fitting file is).
    """
    missing = [k for k in expected if k not in found and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in found if k not in expected]
    wrong_shape = [
        f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}"
        for k, v in found.items()
        if k in expected and hasattr(v, "shape") and v.shape != expected[k].shape
    ]
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
        if keys:
            parts.append(f"{len(keys)} {label} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
    if parts:
        raise ConfigError(f"{source} does not fit {target}: {'; '.join(parts)}{hint}")


def load_pretrained_(
    model: nn.Module,
    source: str | os.PathLike,
    filter_fn: Callable[[dict, nn.Module], dict] | None = None,
) -> nn.Module:
    """Load weights from ``source`` into ``model`` in place; every parameter and buffer must be matched.

    Only BatchNorm's ``num_batches_tracked`` counters may be missing (old checkpoints lack them).

    Raises:
        ConfigError: unreadable source, or keys / shapes that do not fit the model.
    """
    state_dict = read_state_dict(source)
    if filter_fn is not None:
        state_dict = filter_fn(state_dict, model)
    check_state_dict_fits(model.state_dict(), state_dict, f"checkpoint {str(source)!r}", type(model).__name__)
    model.load_state_dict(state_dict, strict=False)
    return model
