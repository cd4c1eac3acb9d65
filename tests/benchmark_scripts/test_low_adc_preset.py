"""The low-ADC overlay (``configs/quant/low_adc.yaml``) and QAT recipe (``low_adc_qat.yaml``) are the fits their measured
numbers come from."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

from runner import MODEL_CONFIGS, PTQ_PRESET, Setting, data_args, derived_config, preset_iters  # noqa: E402

LOW_ADC = REPO / "configs/quant/low_adc.yaml"


def _parsed(monkeypatch, *args: str):
    """The project's CLI on ``args`` from the repo root, parsed and built but not run, without a logger."""
    from cimq_pl.cli import CIMQCLI

    monkeypatch.chdir(REPO)
    monkeypatch.setattr("sys.argv", ["cimq_pl"])
    return CIMQCLI(args=[*args, "--trainer.logger", "false"], run=False)


def test_the_overlay_on_the_preset_is_the_levers_calibration_on_4000_images_at_1600_steps(tmp_path, monkeypatch):
    overlay = _parsed(monkeypatch, "--config", MODEL_CONFIGS["resnet20"], "--config", "configs/quant/cimq_ptq.yaml",
                      "--config", str(LOW_ADC))
    measured = Setting("resnet20", "cimq", weight_bits=4, input_bits=4, adc_bits=3, iters=1600, calibration_size=4000)
    derived = tmp_path / "levers.yaml"
    derived.write_text(yaml.safe_dump(derived_config(measured), sort_keys=False))
    levers = _parsed(monkeypatch, "--config", MODEL_CONFIGS["resnet20"], "--config", str(derived),
                     *data_args(measured.calibration_size, measured.seed))
    assert overlay.config.model == levers.config.model
    assert overlay.config.data == levers.config.data
    assert overlay.config.trainer.callbacks == levers.config.trainer.callbacks
    assert (overlay.model.cim.adc_bits, overlay.model.objective.iters_per_block,
            overlay.datamodule.calibration_size) == (3, 1600, 4000)


def test_the_overlay_sets_only_adc_bits_steps_and_calibration_images():
    assert yaml.safe_load(LOW_ADC.read_text()) == {
        "model": {"cim": {"adc_bits": 3}, "objective": {"init_args": {"iters_per_block": 1600}}},
        "data": {"init_args": {"calibration_size": 4000}},
    }


def test_the_overlay_at_adc_2_gives_every_array_layer_asymmetric_ranges(monkeypatch):
    """At ``--model.cim.adc_bits 2`` the preset's ``asymmetric: auto`` gives the layers on the arrays asymmetric ADC
    ranges (the `accuracy_levers.py` set "calibration on 4,000 images, asymmetric ADC ranges"), the ``int8`` edge
    layers (ideal ADC) none; at the overlay's own 3 bits none."""
    from cimq_pl.callbacks import PartialSumClipping
    from cimq_pl.quant import cim_layers
    from cimq_pl.quant.techniques import quantize_

    for bits, expected in ((2, True), (3, False)):
        cli = _parsed(monkeypatch, "--config", MODEL_CONFIGS["resnet20"], "--config", "configs/quant/cimq_ptq.yaml",
                      "--config", str(LOW_ADC), "--model.cim.adc_bits", str(bits))
        clipping = next(c for c in cli.trainer.callbacks if isinstance(c, PartialSumClipping))
        assert clipping.config.asymmetric == "auto" and cli.model.cim.adc_bits == bits
        quantize_(cli.model.model, clipping.config)
        shapes = {layer.mapping: layer.options.psum_asymmetric for _, layer in cim_layers(cli.model.model)}
        assert shapes == {"cim": expected, "int8": False}


def test_the_benchmarks_read_the_presets_steps_per_unit_as_the_cli_builds_them(tmp_path, monkeypatch):
    """`runner.preset_iters` (the --iters default of layer_search, low_adc_qat and device_noise) is the steps per
    unit the CLI builds from the preset, and follows a config that sets other steps."""
    preset = _parsed(monkeypatch, "--config", MODEL_CONFIGS["resnet20"], "--config", PTQ_PRESET)
    assert preset_iters() == preset.model.objective.iters_per_block
    config = yaml.safe_load((REPO / PTQ_PRESET).read_text())
    config["model"]["objective"]["init_args"]["iters_per_block"] = 123
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(config, sort_keys=False))
    assert preset_iters(str(other)) == 123


def test_the_qat_recipe_is_the_fit_low_adc_qat_measured(tmp_path, monkeypatch):
    """``configs/quant/low_adc_qat.yaml`` parses to the QAT run `low_adc_qat.py --objective distill-quantizers
    --train lossless --sparsity-weight 0 --steps 300` builds (its README numbers), at ADC 3 and 2, but for where the
    hardware report stands in the callback list and the unused SGD settings (``model.lr``: the objective has its
    rates)."""
    import low_adc_qat

    from cimq_pl.quant.psum import resolve_psum_asymmetric

    checkpoint = str(tmp_path / "ptq.ckpt")
    args = low_adc_qat.build_parser().parse_args(["--objective", "distill-quantizers", "--train", "lossless",
                                                  "--sparsity-weight", "0", "--steps", "300", "--temperature", "1"])
    for bits in (3, 2):
        measured = low_adc_qat.qat_config(bits, Path(checkpoint), args)
        derived = tmp_path / f"qat{bits}.yaml"
        derived.write_text(yaml.safe_dump(measured, sort_keys=False))
        script = _parsed(monkeypatch, "--config", MODEL_CONFIGS["resnet20"], "--config", str(derived))
        recipe = _parsed(monkeypatch, "--config", MODEL_CONFIGS["resnet20"], "--config", "configs/quant/low_adc_qat.yaml",
                         "--model.cim.adc_bits", str(bits), "--trainer.callbacks.init_args.init_from", checkpoint)
        for cli in (script, recipe):
            cli.config.model.lr = cli.config.model.weight_decay = None
        assert recipe.config.model == script.config.model
        assert recipe.config.data == script.config.data
        assert (recipe.config.trainer.max_steps, recipe.config.trainer.max_epochs) == (300, -1)
        def split(cli):  # (the hardware reports, the other callbacks in their order)
            report = [c.class_path.endswith("HardwareReport") for c in cli.config.trainer.callbacks]
            return ([c for c, r in zip(cli.config.trainer.callbacks, report) if r],
                    [c for c, r in zip(cli.config.trainer.callbacks, report) if not r])

        (reports, callbacks), (measured_reports, measured_callbacks) = split(recipe), split(script)
        assert len(reports) == 1 and reports == measured_reports  # the same test-time report, listed elsewhere
        clipping = next(c for c in callbacks if c.class_path.endswith("PartialSumClipping"))
        assert clipping.init_args.asymmetric == "auto"  # the script states what auto resolves to at these bits
        clipping.init_args.asymmetric = resolve_psum_asymmetric("auto", bits)
        assert callbacks == measured_callbacks
        assert recipe.model.objective.lr_step == 4e-4 and recipe.model.cim.adc_bits == bits
