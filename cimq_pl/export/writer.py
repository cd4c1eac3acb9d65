"""`export_model`: write a calibrated CIM model as an export directory, atomically."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file
from torch import nn

from cimq_pl.export.format import FORMAT_NAME, FORMAT_VERSION, MANIFEST_FILE, TENSORS_FILE, ExportError
from cimq_pl.export.graph import trace_graph
from cimq_pl.export.layers import check_exportable, cim_layer_record, digital_layer_record
from cimq_pl.files import file_sha256
from cimq_pl.quant.device_model import attached_device
from cimq_pl.quant.layers import _CIMLayerBase


@torch.no_grad()
def _layer_input_shapes(model: nn.Module, layers: dict, input_shape: tuple) -> dict:
    """Shape of one image's input to each layer, from one forward pass of a zero image."""
    shapes, hooks = {}, []

    def record(name):
        def hook(module, args):
            shapes.setdefault(name, tuple(args[0].shape[1:]))  # returns None: the input passes unchanged
        return hook

    for name, layer in layers.items():
        hooks.append(layer.register_forward_pre_hook(record(name)))
    parameter = next(model.parameters())
    try:
        model(torch.zeros(1, *input_shape, dtype=parameter.dtype, device=parameter.device))
    finally:
        for hook in hooks:
            hook.remove()
    return shapes


def export_manifest_and_tensors(model: nn.Module, spec, input_shape: tuple, info: Optional[dict] = None) -> tuple:
    """The manifest (without the tensor file's hash) and the tensors of ``model``, in eval mode.

    Args:
        model: a network whose CIM layers are calibrated (after PTQ or QAT).
        spec: the model's `CIMSpec` (layers mapped in ``"int8"`` mode carry their own spec in their entry).
        input_shape: one image, e.g. ``(3, 32, 32)``.
        info: extra JSON-ready fields (model name, data config, the fake-quant test accuracy, ...). Without a
            ``device`` entry, the manifest's ``device`` is the `DeviceSpec` attached to the model's CIM layers
            (`attach_device_`), with ``noise_aware_training`` false, or null.
    """
    was_training = model.training
    model.eval()
    try:
        nodes, layers = trace_graph(model)
        if not any(isinstance(layer, _CIMLayerBase) for layer in layers.values()):
            raise ExportError("the model has no CIM layers to export: build it with model.cim (convert_to_cim)")
        for name, layer in layers.items():  # before any forward pass, which would calibrate lazily
            if isinstance(layer, _CIMLayerBase):
                check_exportable(name, layer)
        shapes = _layer_input_shapes(model, layers, tuple(input_shape))
        entries, tensors = {}, {}
        for name, layer in layers.items():
            if isinstance(layer, _CIMLayerBase):
                entry, layer_tensors = cim_layer_record(name, layer, shapes[name])
            else:
                op = next(node["op"] for node in nodes if node.get("layer") == name)
                entry, layer_tensors = digital_layer_record(name, layer, op)
            entries[name] = entry
            tensors.update(layer_tensors)
    finally:
        model.train(was_training)
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "cim": dataclasses.asdict(spec),
        "input_shape": list(input_shape),
        **(info or {}),
        "graph": nodes,
        "layers": entries,
    }
    if "device" not in manifest:
        attached = attached_device(model)
        manifest["device"] = {"spec": dataclasses.asdict(attached), "noise_aware_training": False} if attached else None
    return manifest, {name: tensor.contiguous() for name, tensor in tensors.items()}


def _make_shareable(directory: Path) -> None:
    """Give the directory and its files the permissions the umask allows (mkdtemp makes them private)."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.iterdir():
        path.chmod(0o666 & ~umask)


def check_export_target(target: Path, overwrite: bool) -> None:
    """Raise `ExportError` when ``target`` is a file, or an existing directory and ``overwrite`` is False."""
    if target.exists() and not target.is_dir():
        raise ExportError(f"export path {str(target)!r} is a file: expected a directory to create")
    if target.exists() and not overwrite:
        raise ExportError(f"export directory {str(target)!r} already exists: choose another dirpath or set "
                          "overwrite (--overwrite true)")


def write_export(dirpath, manifest: dict, tensors: dict, overwrite: bool = False) -> Path:
    """Write ``manifest.json`` (with the tensor file's sha256) and ``model.safetensors`` into ``dirpath``.

    The files are written into a temporary sibling directory that is renamed into place, so a crash leaves
    either the previous export or none, never a half-written one.

    Raises:
        ExportError: when ``dirpath`` exists and ``overwrite`` is False, or is not a directory.
    """
    target = Path(dirpath)
    check_export_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        save_file(tensors, str(staging / TENSORS_FILE))
        manifest = {**manifest, "tensors_sha256": file_sha256(staging / TENSORS_FILE)}
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n")
        _make_shareable(staging)
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, retired / target.name)
            os.replace(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def export_model(model: nn.Module, spec, dirpath, input_shape: tuple, info: Optional[dict] = None,
                 overwrite: bool = False) -> Path:
    """Export a calibrated CIM ``model`` to the directory ``dirpath`` (see the README's export format).

    Returns:
        The directory written.
    """
    manifest, tensors = export_manifest_and_tensors(model, spec, input_shape, info)
    return write_export(dirpath, manifest, tensors, overwrite)


__all__ = ["check_export_target", "export_manifest_and_tensors", "export_model", "write_export"]
