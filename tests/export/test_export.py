"""Export for deployment: format semantics, the integer executor against the fake-quant model, bad exports."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from cimq_pl.export import ExportError, IntegerExecutor, export_model, read_export
from cimq_pl.files import file_sha256
from cimq_pl.models import create_model
from cimq_pl.quant import CIMSpec, QuantizerOptions, calibrate_, cim_layers, convert_to_cim, fold_batchnorm_

# ------------------------------------------------------------------ helpers


def _calibrated(model: nn.Module, spec: CIMSpec, images: torch.Tensor, options=None, perturb=False) -> nn.Module:
    """Convert ``model`` to ``spec``, calibrate it on ``images`` and (``perturb``) move its learned quantizer
    parameters off their initial values, as PTQ would."""
    torch.manual_seed(0)
    model.eval()
    fold_batchnorm_(model)
    convert_to_cim(model, spec, options=options)
    calibrate_(model, [images])
    if perturb:
        with torch.no_grad():
            for _, layer in cim_layers(model):
                if layer.psum_quantizer is not None:
                    layer.psum_quantizer.theta.normal_(0, 0.3)
                if layer.weight_quantizer.rounding_logits is not None:
                    layer.weight_quantizer.rounding_logits.normal_(0, 2)
    return model.eval()


def _tiny_conv_model(spec: CIMSpec, options=None, perturb=False) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(5, 6, 3, padding=1, bias=True), nn.ReLU())
    images = torch.randn(3, 5, 6, 6)
    return _calibrated(model, spec, images, options, perturb), images


def _slow_layer(export, name: str, x: torch.Tensor) -> torch.Tensor:
    """The format read literally, one array, wordline, bitline and cycle at a time (float64 digital side)."""
    entry, tensors = export.manifest["layers"][name], export.tensors
    mapping = entry["mapping"]
    kh, kw = entry["kernel_size"]
    pad = entry["padding"]
    allowed = tensors[f"{name}.input_codes"].tolist()
    scale_in = float(tensors[f"{name}.input_scale"])
    cells = tensors[f"{name}.cells"].long()
    thresholds = tensors.get(f"{name}.adc_thresholds")
    n_slices = len(entry["slices"])
    n_images, _, height, width = x.shape
    out = torch.zeros(n_images, entry["out_channels"], height, width, dtype=torch.float64)
    for n in range(n_images):
        codes = torch.zeros(x.shape[1], height + 2 * pad[0], width + 2 * pad[1], dtype=torch.long)
        for c in range(x.shape[1]):
            for y in range(height):
                for z in range(width):
                    v = min(max(float(x[n, c, y, z]) / scale_in, allowed[0]), allowed[-1])
                    codes[c, y + pad[0], z + pad[1]] = min(allowed, key=lambda a: (abs(a - v), a))
        for y in range(height):
            for z in range(width):
                for t, tile in enumerate(mapping["tiles"]):
                    row_start, n_rows = mapping["row_blocks"][tile["row_block"]]
                    col_start, n_cols = mapping["col_blocks"][tile["col_block"]]
                    for bitline in range(tile["bitlines"]):
                        shifted = 0
                        for cycle in entry["cycles"]:
                            p = 0
                            for wordline in range(n_rows):
                                row = row_start + wordline  # unrolled row = c * kh * kw + ky * kw + kx
                                c, ky, kx = row // (kh * kw), row % (kh * kw) // kw, row % kw
                                digit = (int(codes[c, y + ky, z + kx]) >> cycle["shift"]) & (2 ** cycle["bits"] - 1)
                                p += digit * int(cells[t, wordline, bitline])
                            if thresholds is not None:
                                setting = int(tensors[f"{name}.adc_setting"][t, bitline])
                                p = int(tensors[f"{name}.adc_code_min"][setting]) + sum(
                                    int(th) <= p for th in thresholds[setting])
                            shifted += cycle["weight"] * p
                        value = float(shifted)
                        if thresholds is not None:
                            value *= float(tensors[f"{name}.adc_scale"][int(tensors[f"{name}.adc_setting"][t, bitline])])
                        o, s = divmod(bitline, n_slices)
                        weight = entry["slices"][s]["weight"]
                        if o >= n_cols:  # the reference column: subtract the offset of every column of the tile
                            for column in range(n_cols):
                                scale = float(tensors[f"{name}.weight_scale"][0, tile["row_block"], col_start + column])
                                out[n, col_start + column, y, z] -= value * entry["slices"][-1]["weight"] * scale
                            continue
                        scale = float(tensors[f"{name}.weight_scale"][0, tile["row_block"], col_start + o])
                        out[n, col_start + o, y, z] += value * weight * scale
    out *= scale_in
    if entry["bias"]:
        out += tensors[f"{name}.bias"].double().view(1, -1, 1, 1)
    return out


# ------------------------------------------------------------------ the format, read literally


@pytest.mark.parametrize("spec", [
    CIMSpec(rows=16, cols=8, weight_bits=4, cell_bits=2, input_bits=3, adc_bits=3),
    CIMSpec(rows=20, cols=7, weight_bits=4, cell_bits=2, weight_slicing="offset", input_bits=4, dac_bits=2, adc_bits=4,
            row_split="dense"),
], ids=["twos_complement", "offset_dense_dac2"])
def test_format_read_literally_gives_the_fake_quant_layer(spec, tmp_path):
    model, images = _tiny_conv_model(spec)
    export = read_export(export_model(model, spec, tmp_path / "export", (5, 6, 6)))
    layer = model[0]
    expected = layer(images).double()
    assert torch.allclose(_slow_layer(export, "0", images), expected, rtol=1e-5, atol=1e-5)
    # same integers; the float32 accumulation over 5 row blocks may round in another order than torch's sum
    assert torch.allclose(IntegerExecutor(export)(images), model(images), rtol=1e-6, atol=1e-6)


def test_column_adc_ranges_are_exported_per_bitline_and_execute_exactly(tmp_path):
    """``psum_granularity="column"``: bitline o * n_slices + s of a tile reads the setting of slice s of its global
    output column, the reference bitline that of its column block; the export runs the fake-quant layer exactly."""
    spec = CIMSpec(rows=20, cols=7, weight_bits=4, cell_bits=2, weight_slicing="offset", input_bits=4, dac_bits=2,
                   adc_bits=4, row_split="dense")
    model, images = _tiny_conv_model(spec, QuantizerOptions(psum_granularity="column"), perturb=True)
    export = read_export(export_model(model, spec, tmp_path / "export", (5, 6, 6)))
    pq, geo = model[0].psum_quantizer, model[0].geometry
    entry = export.manifest["layers"]["0"]
    assert entry["adc"]["granularity"] == "column" and entry["adc"]["settings"] == pq.alpha0.numel() == 3 * 3 * 6
    alpha = pq.alpha().detach().flatten()
    for index, tile in enumerate(entry["mapping"]["tiles"]):  # 3 row blocks x 2 column blocks of 3, 3 columns
        col_start, n_cols = entry["mapping"]["col_blocks"][tile["col_block"]]
        row_array = tile["row_block"]
        setting = export.tensors["0.adc_setting"][index].long()
        for o in range(n_cols):
            for s in range(2):
                assert alpha[setting[o * 2 + s]] == pq.alpha()[s, row_array, col_start + o]
        assert alpha[setting[n_cols * 2]] == pq.alpha()[2, row_array, tile["col_block"]]
        assert (setting[n_cols * 2 + 1:] == -1).all()
    used = export.tensors["0.adc_setting"][export.tensors["0.adc_setting"] >= 0]
    assert used.unique().numel() == used.numel() == model[0].adc_range_settings() == 3 * (2 * 6 + 2)
    expected = model[0](images).double()
    assert torch.allclose(_slow_layer(export, "0", images), expected, rtol=1e-5, atol=1e-5)
    assert torch.allclose(IntegerExecutor(export)(images), model(images), rtol=1e-6, atol=1e-6)


def test_adc_thresholds_reproduce_the_adc_on_every_partial_sum(tmp_path):
    spec = CIMSpec(rows=16, cols=8, weight_bits=4, cell_bits=2, input_bits=3, adc_bits=3)
    model, _ = _tiny_conv_model(spec)
    export = read_export(export_model(model, spec, tmp_path / "export", (5, 6, 6)))
    pq = model[0].psum_quantizer
    thresholds = export.tensors["0.adc_thresholds"].long()
    code_min = export.tensors["0.adc_code_min"].long()
    scale = export.tensors["0.adc_scale"]
    partial_sums = torch.arange(-200, 201)
    for setting in range(thresholds.shape[0]):
        signed = bool(code_min[setting] < 0)
        step, qmin, qmax = pq.channel_params(torch.tensor([setting]), torch.tensor([signed]))
        assert torch.equal(step.float(), scale[setting:setting + 1])
        adc = pq.quantize_codes(partial_sums.float().view(1, 1, -1, 1), step, qmin, qmax).view(-1).long()
        from_thresholds = code_min[setting] + (partial_sums.view(-1, 1) >= thresholds[setting].view(1, -1)).sum(1)
        assert torch.equal(from_thresholds, adc)


def test_cells_hold_the_weight_codes_where_the_mapping_says(tmp_path):
    spec = CIMSpec(rows=16, cols=8, weight_bits=4, cell_bits=2, input_bits=3, adc_bits=3)
    model, _ = _tiny_conv_model(spec)
    export = read_export(export_model(model, spec, tmp_path / "export", (5, 6, 6)))
    layer, entry = model[0], export.manifest["layers"]["0"]
    codes = layer.weight_quantizer.codes(layer._weight4d()).round().long().flatten(1)  # (C_out, unrolled rows)
    cells = export.tensors["0.cells"].long()
    rebuilt = torch.zeros_like(codes)
    for t, tile in enumerate(entry["mapping"]["tiles"]):
        row_start, n_rows = entry["mapping"]["row_blocks"][tile["row_block"]]
        col_start, n_cols = entry["mapping"]["col_blocks"][tile["col_block"]]
        for o in range(n_cols):
            for s, piece in enumerate(entry["slices"]):
                rebuilt[col_start + o, row_start:row_start + n_rows] += piece["weight"] * cells[t, :n_rows, o * 2 + s]
    assert entry["mapping"]["row_blocks"] == [[0, 9], [9, 9], [18, 9], [27, 9], [36, 9]]  # one channel per array
    assert entry["mapping"]["col_blocks"] == [[0, 4], [4, 2]]  # 8 bitlines = 4 columns of 2 slices
    assert torch.equal(rebuilt, codes)
    assert export.tensors["0.cells"].dtype == torch.int8


# ------------------------------------------------------------------ the executor on whole networks


@pytest.mark.parametrize("spec, options, perturb", [
    (CIMSpec(cell_bits=2, dac_bits=2, rows=64, cols=40), None, False),
    (CIMSpec(weight_bits=4, cell_bits=3, weight_slicing="offset", rows=100, row_split="dense", adc_bits=5), None, False),
    (CIMSpec(first_layer="int8", last_layer="digital", adc_bits=None), None, False),
    (CIMSpec(), QuantizerOptions(weight_granularity="array_channel", input_max_ones=2, psum_granularity="array",
                                 weight_rounding="adaround"), True),
], ids=["slices_dac2_ragged", "offset_dense", "int8_first_digital_last_ideal_adc", "cimq_options"])
def test_executor_reproduces_every_layer_of_the_fake_quant_resnet(spec, options, perturb, tmp_path):
    """Each layer, fed the fake-quant model's own input, gives its output up to float32 accumulation order: an
    integer off by one anywhere (a code, a cell, an ADC threshold) would show as an error of a whole step."""
    torch.manual_seed(0)
    images = torch.randn(8, 3, 32, 32)
    model = _calibrated(create_model("cifar_resnet20", 10), spec, images, options, perturb)
    executor = IntegerExecutor(export_model(model, spec, tmp_path / "export", (3, 32, 32)))
    inputs = {}
    layers = dict(executor.manifest["layers"])
    hooks = [model.get_submodule(name).register_forward_pre_hook(
        lambda module, args, name=name: inputs.__setitem__(name, args[0].clone())) for name in layers]
    model(images)
    for hook in hooks:
        hook.remove()
    assert [entry["op"] for entry in layers.values()].count("linear") == (spec.last_layer == "digital")
    with torch.no_grad():
        for name, x in inputs.items():
            expected = model.get_submodule(name)(x)
            error = (executor.run_layer(name, x) - expected).abs().max() / expected.abs().max()
            assert error <= 1e-5, (name, float(error))


def test_unsupported_operation_is_named(tmp_path):
    model = _calibrated(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sigmoid()), CIMSpec(), torch.randn(2, 3, 8, 8))
    with pytest.raises(ExportError, match=r"cannot export node '_1' \(call_module 1\): unsupported module type Sigmoid"):
        export_model(model, CIMSpec(), tmp_path / "export", (3, 8, 8))
    assert not (tmp_path / "export").exists()


class _EveryDigitalOp(nn.Module):
    """A small network using each digital op of the format that ResNet-20 does not (pooling, functions)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(34, 5)

    def forward(self, x):
        x = self.pool(nn.functional.relu(self.conv1(x)))
        x = x + torch.relu(self.conv2(x))
        x = torch.flatten(self.flatten(nn.functional.adaptive_avg_pool2d(x, 2)), 1)
        return self.fc(nn.functional.pad(x, (1, 1)))


def test_pooling_and_functional_ops_are_exported(tmp_path):
    torch.manual_seed(0)
    images = torch.randn(6, 3, 8, 8)
    model = _calibrated(_EveryDigitalOp(), CIMSpec(rows=32, cols=16), images)
    executor = IntegerExecutor(export_model(model, CIMSpec(rows=32, cols=16), tmp_path / "export", (3, 8, 8)))
    ops = [node["op"] for node in executor.manifest["graph"]]
    assert {"max_pool2d", "adaptive_avg_pool2d", "flatten", "relu", "add", "pad"} <= set(ops)
    assert torch.allclose(executor(images), model(images), rtol=1e-5, atol=1e-5)


def test_uncalibrated_model_or_disabled_adc_is_refused(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    convert_to_cim(model, CIMSpec())
    with pytest.raises(ExportError, match="quantizer is not calibrated"):
        export_model(model, CIMSpec(), tmp_path / "export", (3, 8, 8))
    calibrate_(model, [torch.randn(2, 3, 8, 8)])
    model[0].psum_quantizer.enabled = False
    with pytest.raises(ExportError, match="ADC quantizer disabled but its spec has adc_bits=4"):
        export_model(model, CIMSpec(), tmp_path / "export", (3, 8, 8))


# ------------------------------------------------------------------ writing atomically


def test_export_is_written_atomically_and_never_overwritten_silently(tmp_path, monkeypatch):
    spec = CIMSpec(rows=16, cols=8)
    model, _ = _tiny_conv_model(spec)
    target = tmp_path / "export"
    export_model(model, spec, target, (5, 6, 6))
    before = file_sha256(target / "model.safetensors")
    with pytest.raises(ExportError, match="already exists.*overwrite"):
        export_model(model, spec, target, (5, 6, 6))

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("cimq_pl.export.writer.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        export_model(model, spec, target, (5, 6, 6), overwrite=True)
    assert file_sha256(target / "model.safetensors") == before  # the previous export is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no staging directory left behind
    with pytest.raises(OSError, match="disk full"):
        export_model(model, spec, tmp_path / "fresh", (5, 6, 6))
    assert not (tmp_path / "fresh").exists()


# ------------------------------------------------------------------ malformed and mismatched exports


@pytest.fixture(scope="module")
def good_export(tmp_path_factory):
    spec = CIMSpec(rows=16, cols=8, weight_bits=4, cell_bits=2, input_bits=3, adc_bits=3)
    model, _ = _tiny_conv_model(spec)
    return export_model(model, spec, tmp_path_factory.mktemp("good") / "export", (5, 6, 6))


def _corrupted(good, tmp_path, manifest_edit=None, tensors_edit=None, rehash=True):
    """A copy of ``good`` with its manifest and/or tensors edited (the hash updated unless ``rehash`` False)."""
    path = tmp_path / "bad"
    shutil.copytree(good, path)
    manifest = json.loads((path / "manifest.json").read_text())
    if tensors_edit is not None:
        tensors = load_file(str(path / "model.safetensors"))
        tensors_edit(tensors)
        save_file(tensors, str(path / "model.safetensors"))
        if rehash:
            manifest["tensors_sha256"] = file_sha256(path / "model.safetensors")
    if manifest_edit is not None:
        manifest_edit(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def _set(path: str, value):
    def edit(manifest):
        *parents, last = path.split("/")
        node = manifest
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[last] = value
    return edit


BAD_EXPORTS = {
    "unknown version": (dict(manifest_edit=_set("format_version", 2)), "unknown format_version 2: this cimq-pl reads version 1"),
    "other format": (dict(manifest_edit=_set("format", "onnx")), "has format 'onnx': expected 'cimq-pl-export'"),
    "missing tensor": (dict(tensors_edit=lambda t: t.pop("0.adc_thresholds")), "tensor '0.adc_thresholds' is missing"),
    "wrong shape": (dict(tensors_edit=lambda t: t.update({"0.cells": t["0.cells"][:, :8].contiguous()})),
                    r"tensor '0.cells' has shape \(10, 8, 8\): the manifest needs \(10, 16, 8\)"),
    "float codes": (dict(tensors_edit=lambda t: t.update({"0.cells": t["0.cells"].float()})),
                    "tensor '0.cells' has dtype torch.float32: expected an int dtype"),
    "extra tensor": (dict(tensors_edit=lambda t: t.update({"0.spare": torch.zeros(1)})), r"tensor\(s\) no layer uses: \['0.spare'\]"),
    "tensors of another export": (dict(tensors_edit=lambda t: t["0.weight_scale"].mul_(2), rehash=False),
                                  "not the file this manifest was written with"),
    "mapping disagrees with spec": (dict(manifest_edit=_set("layers/0/spec/rows", 32)),
                                    "layer '0' field 'mapping' disagrees with the mapping of its spec"),
    "invalid spec": (dict(manifest_edit=_set("cim/adc_bits", 40)), r"'cim' is not a valid CIMSpec: CIMSpec.adc_bits=40"),
    "cells beyond their bits": (dict(tensors_edit=lambda t: t["0.cells"].fill_(9)), "cells outside the 2-bit cell range"),
    "input codes out of range": (dict(tensors_edit=lambda t: t.update({"0.input_codes": torch.tensor([0, 3, 9], dtype=torch.int8)})),
                                 "input_codes must be strictly increasing 3-bit"),
    "graph reads a later node": (dict(manifest_edit=_set("graph/1/inputs", ["_1"])), r"reads \['_1'\], which no earlier node"),
    "unknown op": (dict(manifest_edit=_set("graph/2/op", "gelu")), "unknown op 'gelu'"),
    "layer missing": (dict(manifest_edit=lambda m: m["layers"].pop("0")), "names layer '0', which 'layers' does not hold"),
    "field of the wrong kind": (dict(manifest_edit=_set("layers/0/input", "4 bits")), r"malformed manifest \(AttributeError"),
    "scale not positive": (dict(tensors_edit=lambda t: t["0.input_scale"].fill_(0)), "scales .* must be finite and > 0"),
    "device of the wrong kind": (dict(manifest_edit=_set("device", {"sigma": 0.1})), "manifest 'device' must be null or"),
    "invalid device": (dict(manifest_edit=_set("device", {"spec": {"programming_sigma": -1}, "noise_aware_training": False})),
                       r"'device.spec' is not a valid DeviceSpec: DeviceSpec.programming_sigma=-1.0"),
}


def test_the_manifest_records_the_device_and_the_executor_stays_ideal(tmp_path):
    """The device attached to the layers goes into ``device.spec``; the integer executor computes the ideal macro."""
    from cimq_pl.quant import DeviceSpec, attach_device_, device_mode

    spec = CIMSpec(rows=16, cols=8, weight_bits=4, cell_bits=2, input_bits=3, adc_bits=3)
    model, images = _tiny_conv_model(spec)
    assert read_export(export_model(model, spec, tmp_path / "ideal", (5, 6, 6))).manifest["device"] is None
    device = DeviceSpec(programming_sigma=0.05, stuck_on_prob=0.001, seed=3)
    attach_device_(model, device)
    export = read_export(export_model(model, spec, tmp_path / "device", (5, 6, 6)))
    assert export.manifest["device"] == {"spec": device.as_dict(), "noise_aware_training": False}
    assert export.device == device
    with device_mode(model, "ideal"):
        assert torch.allclose(IntegerExecutor(export)(images), model(images), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", sorted(BAD_EXPORTS))
def test_malformed_exports_are_refused_clearly(case, good_export, tmp_path):
    edits, message = BAD_EXPORTS[case]
    with pytest.raises(ExportError, match=message):
        read_export(_corrupted(good_export, tmp_path, **edits))


def test_missing_files_are_refused_clearly(good_export, tmp_path):
    with pytest.raises(ExportError, match="no such directory"):
        read_export(tmp_path / "nowhere")
    for missing in ("manifest.json", "model.safetensors"):
        path = tmp_path / missing
        shutil.copytree(good_export, path)
        (path / missing).unlink()
        with pytest.raises(ExportError, match=f"{missing} is missing"):
            read_export(path)
    (tmp_path / "garbled").mkdir()
    (tmp_path / "garbled" / "manifest.json").write_text("{not json")
    with pytest.raises(ExportError, match="manifest.json is not valid JSON"):
        read_export(tmp_path / "garbled")


def test_a_learned_output_offset_is_exported_in_the_bias(tmp_path):
    """PTQ's output offset (`add_output_offset_`, added after the ADC) travels as part of the exported bias, and the
    integer executor reproduces the layer with it."""
    spec = CIMSpec(rows=20, cols=7, weight_bits=4, input_bits=4, adc_bits=3)
    model, images = _tiny_conv_model(spec, perturb=True)
    layer = model[0]
    with torch.no_grad():
        layer.add_output_offset_().uniform_(-0.5, 0.5)
    export = read_export(export_model(model, spec, tmp_path / "export", (5, 6, 6)))
    assert torch.equal(export.tensors["0.bias"], (layer.bias + layer.output_offset).detach())
    with torch.no_grad():
        expected = model(images)
        without = layer.output_offset.clone()
        layer.output_offset.zero_()
        assert not torch.allclose(model[0](images), expected)  # the offset matters to the output
        layer.output_offset.copy_(without)
    assert torch.allclose(IntegerExecutor(export)(images), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("spec, bias", [
    (CIMSpec(rows=16, cols=8, weight_bits=4, cell_bits=2, input_bits=3, adc_bits=2), True),
    (CIMSpec(rows=20, cols=7, weight_bits=4, cell_bits=2, weight_slicing="offset", input_bits=4, adc_bits=3), False),
], ids=["twos_complement", "offset_slicing_no_bias"])
def test_asymmetric_adc_ranges_export_as_plain_adcs_and_a_bias(spec, bias, tmp_path):
    """An asymmetric ADC (code of p / step - z, value step (code + z)) exports as an ordinary ADC (its thresholds)
    plus what the offsets add, folded into the bias (one is made for a layer without): the format read literally and
    the integer executor give the fake-quant layer."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(5, 6, 3, padding=1, bias=bias), nn.ReLU())
    images = torch.randn(3, 5, 6, 6)
    options = QuantizerOptions(psum_granularity="column", psum_asymmetric=True)
    model = _calibrated(model, spec, images, options, perturb=True)
    layer, offset = model[0], model[0].psum_quantizer.offset
    assert offset.abs().amax() > 0.1  # calibration moved ranges
    with torch.no_grad():  # and PTQ would move them on
        offset.add_(torch.empty_like(offset).uniform_(-0.5, 0.5))
    export = read_export(export_model(model, spec, tmp_path / "export", (5, 6, 6)))
    assert export.manifest["layers"]["0"]["bias"]
    layer_bias = torch.zeros(6) if layer.bias is None else layer.bias.detach()
    assert not torch.allclose(export.tensors["0.bias"], layer_bias, atol=1e-3)  # the offsets' share is there
    with torch.no_grad():
        expected = layer(images).double()
    assert torch.allclose(_slow_layer(export, "0", images), expected, rtol=1e-5, atol=1e-5)
    assert torch.allclose(IntegerExecutor(export)(images), model(images), rtol=1e-5, atol=1e-5)
