"""`read_export`: load an export directory and check it before anything runs it.

Every check names the directory and the field or tensor at fault: a missing file, an unknown format version,
a tensor file that is not the one the manifest was written with, a layer whose mapping disagrees with its
`CIMSpec`, a missing, extra, mis-shaped or mistyped tensor, or integers outside their documented ranges.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from cimq_pl.errors import ConfigError
from cimq_pl.export.format import (
    CIM_LAYER_OPS,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_FILE,
    TENSORS_FILE,
    ExportError,
    expected_tensors,
    layer_layout,
)
from cimq_pl.export.graph import check_graph
from cimq_pl.files import file_sha256
from cimq_pl.quant.overrides import normalize_overrides
from cimq_pl.quant.spec import CIMSpec
from cimq_pl.quant.ste import code_range
from cimq_pl.quant.tiling import TileGeometry

REQUIRED_FIELDS = ("format", "format_version", "cim", "input_shape", "graph", "layers", "tensors_sha256")
CIM_LAYER_FIELDS = ("spec", "in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                    "bias", "input", "weights", "adc", "mapping", "cycles", "slices", "reference_digit")
DIGITAL_LAYER_FIELDS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                        "bias", "weight_shape")


@dataclass
class Export:
    """A checked export: its manifest, its tensors by name and the directory it came from."""

    manifest: dict
    tensors: dict
    path: Path

    @property
    def spec(self) -> CIMSpec:
        """The macro the model was exported for."""
        return CIMSpec(**self.manifest["cim"])

    @property
    def cim_overrides(self) -> dict | None:
        """The per-layer overrides of the macro the model was fit with (``model.cim_overrides``; None when there
        were none). Each layer's entry holds its resolved ``spec``, which is what the executor reads."""
        return self.manifest.get("cim_overrides") or None

    @property
    def device(self):
        """The `DeviceSpec` the network was quantized for (manifest ``device.spec``), or None."""
        from cimq_pl.quant.device import DeviceSpec

        record = self.manifest.get("device")
        return DeviceSpec(**record["spec"]) if record else None


def _check_device(where: str, record, export: Export) -> None:
    """The optional ``device`` field: null, or ``{"spec": DeviceSpec fields, "noise_aware_training": bool}``."""
    if record is None:
        return
    if not isinstance(record, dict) or set(record) != {"spec", "noise_aware_training"} or \
            not isinstance(record["spec"], dict) or not isinstance(record["noise_aware_training"], bool):
        raise ExportError(f"{where}: manifest 'device' must be null or {{\"spec\": {{...}}, \"noise_aware_training\": "
                          "true|false}")
    try:
        export.device
    except (ConfigError, TypeError) as error:
        raise ExportError(f"{where}: manifest 'device.spec' is not a valid DeviceSpec: {error}") from error


def read_export(dirpath) -> Export:
    """Load and check the export in ``dirpath``.

    Raises:
        ExportError: the first problem found, naming the file, field or tensor and what was expected.
    """
    path = Path(dirpath)
    where = f"export {str(path)!r}"
    if not path.is_dir():
        raise ExportError(f"{where}: no such directory (write one with `python -m cimq_pl export ... --dirpath`)")
    manifest = _read_manifest(path, where)
    tensor_file = path / TENSORS_FILE
    if not tensor_file.is_file():
        raise ExportError(f"{where}: {TENSORS_FILE} is missing")
    if file_sha256(tensor_file) != manifest["tensors_sha256"]:
        raise ExportError(f"{where}: {TENSORS_FILE} is not the file this manifest was written with (sha256 differs "
                          "from manifest 'tensors_sha256'); re-export, or update the hash after editing tensors")
    try:
        tensors = load_file(str(tensor_file))
    except (SafetensorError, OSError, ValueError) as error:
        raise ExportError(f"{where}: {TENSORS_FILE} cannot be read: {error}") from error
    export = Export(manifest, tensors, path)
    try:
        export.spec
    except (ConfigError, TypeError) as error:
        raise ExportError(f"{where}: manifest 'cim' is not a valid CIMSpec: {error}") from error
    _check_device(where, manifest.get("device"), export)
    try:
        normalize_overrides(manifest.get("cim_overrides"))
    except ConfigError as error:
        raise ExportError(f"{where}: manifest 'cim_overrides' is invalid: {error}") from error
    try:
        check_graph(manifest["graph"], manifest["layers"])
        expected = {}
        for name, entry in manifest["layers"].items():
            expected.update(_check_layer(where, name, entry))
        _check_tensors(where, expected, tensors)
        for name, entry in manifest["layers"].items():
            if entry["op"] in CIM_LAYER_OPS:
                _check_values(where, name, entry, tensors)
    except ExportError:
        raise
    except (KeyError, TypeError, AttributeError, IndexError, ValueError) as error:  # a field of the wrong kind
        raise ExportError(f"{where}: malformed manifest ({type(error).__name__}: {error})") from error
    return export


def _read_manifest(path: Path, where: str) -> dict:
    manifest_file = path / MANIFEST_FILE
    if not manifest_file.is_file():
        raise ExportError(f"{where}: {MANIFEST_FILE} is missing")
    try:
        manifest = json.loads(manifest_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ExportError(f"{where}: {MANIFEST_FILE} is not valid JSON: {error}") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ExportError(f"{where}: {MANIFEST_FILE} has format {found!r}: expected {FORMAT_NAME!r}")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ExportError(f"{where}: unknown format_version {version!r}: this cimq-pl reads version {FORMAT_VERSION}")
    missing = [field for field in REQUIRED_FIELDS if field not in manifest]
    if missing:
        raise ExportError(f"{where}: {MANIFEST_FILE} lacks field(s) {missing}")
    if not isinstance(manifest["layers"], dict):
        raise ExportError(f"{where}: manifest 'layers' must be an object of layer entries")
    return manifest


def _check_layer(where: str, name: str, entry) -> dict:
    """Check the entry's fields and, for a CIM layer, that its mapping is the one its spec gives."""
    if not isinstance(entry, dict) or "op" not in entry:
        raise ExportError(f"{where}: layer {name!r} must be an object with an 'op'")
    required = CIM_LAYER_FIELDS if entry["op"] in CIM_LAYER_OPS else DIGITAL_LAYER_FIELDS
    missing = [field for field in required if field not in entry]
    if missing:
        raise ExportError(f"{where}: layer {name!r} lacks field(s) {missing}")
    if entry["op"] in CIM_LAYER_OPS:
        try:
            spec = CIMSpec(**entry["spec"])
            geometry = TileGeometry.from_layer(spec, entry["in_channels"], entry["out_channels"],
                                               tuple(entry["kernel_size"]), entry["groups"])
        except (ConfigError, TypeError, ValueError) as error:
            raise ExportError(f"{where}: layer {name!r} has an invalid spec or shape: {error}") from error
        layout = layer_layout(geometry, bool(entry["input"].get("signed")))
        for field, value in layout.items():
            if entry[field] != value:
                raise ExportError(f"{where}: layer {name!r} field {field!r} disagrees with the mapping of its spec "
                                  f"{spec} on a {entry['in_channels']}->{entry['out_channels']} layer")
        if (entry["adc"] is None) != (spec.adc_bits is None) or (entry["adc"] and entry["adc"]["bits"] != spec.adc_bits):
            raise ExportError(f"{where}: layer {name!r} 'adc' disagrees with its spec adc_bits={spec.adc_bits}")
    return expected_tensors(name, entry)


def _check_tensors(where: str, expected: dict, tensors: dict) -> None:
    for tensor_name, (shape, kind) in expected.items():
        tensor = tensors.get(tensor_name)
        if tensor is None:
            raise ExportError(f"{where}: tensor {tensor_name!r} is missing from {TENSORS_FILE}")
        is_int = not tensor.dtype.is_floating_point and tensor.dtype != torch.bool
        if is_int != (kind == "int"):
            raise ExportError(f"{where}: tensor {tensor_name!r} has dtype {tensor.dtype}: expected an {kind} dtype")
        fits = len(shape) == tensor.dim() and all(want in (-1, got) for want, got in zip(shape, tensor.shape))
        if not fits:
            raise ExportError(f"{where}: tensor {tensor_name!r} has shape {tuple(tensor.shape)}: the manifest needs "
                              f"{tuple('any' if s == -1 else s for s in shape)}")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise ExportError(f"{where}: {TENSORS_FILE} holds tensor(s) no layer uses: {extra[:5]}")


def _check_values(where: str, name: str, entry: dict, tensors: dict) -> None:
    """Integers within their documented ranges (cells within their slice's bits, codes, ADC settings)."""
    def fail(message: str):
        raise ExportError(f"{where}: layer {name!r}: {message}")

    bits, signed = entry["input"]["bits"], entry["input"]["signed"]
    low, high = code_range(bits, signed)
    codes = tensors[f"{name}.input_codes"].long()
    if codes.numel() == 0 or int(codes.min()) < low or int(codes.max()) > high or bool((codes.diff() <= 0).any()):
        fail(f"input_codes must be strictly increasing {bits}-bit {'signed' if signed else 'unsigned'} codes in "
             f"[{low}, {high}]")
    cells = tensors[f"{name}.cells"].long()
    widest = max(s["bits"] for s in entry["slices"])
    cell_low = -(2 ** (widest - 1)) if any(s["signed"] for s in entry["slices"]) else 0
    if int(cells.min()) < cell_low or int(cells.max()) > 2**widest - 1:
        fail(f"cells outside the {widest}-bit cell range [{cell_low}, {2 ** widest - 1}]")
    scales = [tensors[f"{name}.{field}"] for field in ("weight_scale", "input_scale")]
    if entry["adc"] is not None:
        settings = tensors[f"{name}.adc_setting"].long()
        if int(settings.min()) < -1 or int(settings.max()) >= entry["adc"]["settings"]:
            fail(f"adc_setting values must be -1 (unused bitline) or in [0, {entry['adc']['settings'] - 1}]")
        if bool((tensors[f"{name}.adc_thresholds"].long().diff(dim=1) < 0).any()):
            fail("adc_thresholds must be non-decreasing along each setting")
        scales.append(tensors[f"{name}.adc_scale"])
    if not all(bool(torch.isfinite(scale).all() and (scale > 0).all()) for scale in scales):
        fail("scales (weight_scale, input_scale, adc_scale) must be finite and > 0")


__all__ = ["Export", "read_export"]
