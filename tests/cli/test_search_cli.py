"""``python -m cimq_pl search`` end to end: the written per-layer YAML is a config `fit` takes as is, the
checkpoint remembers the overrides, and a run without them is refused; bad search arguments are one line."""

from __future__ import annotations

import os

import pytest
import torch
import yaml

from conftest import REPO
from .test_bad_input import _assert_clear, _run_main
from .test_provenance import BASE, CONVENTIONAL

TINY = ["--data.init_args.calibration_size", "8", "--data.init_args.eval_batch_size", "25",
        "--trainer.limit_test_batches", "2"]  # ("1" would parse as the fraction 1.0: every batch)
SEARCH = ["--layers", "[layer3.2.conv2, fc]", "--candidates", "{adc_bits: [3, 4]}", "--images", "8",
          "--batch_size", "8", "--verify", "false", "--energy_budget", "adc_bits=3"]


def test_search_writes_an_assignment_fit_uses_and_checkpoints_remember(tmp_path, capsys, monkeypatch):
    from cimq_pl.cli import CIMQCLI

    monkeypatch.chdir(REPO)
    out = tmp_path / "search"
    search = CIMQCLI(args=["search", *BASE, *CONVENTIONAL, *TINY, *SEARCH, "--output_dir", str(out)])
    printed = capsys.readouterr().out
    # fc is int8 (the config's last_layer): uniform ADC 3, the budget, leaves it so, and so does the search
    assert "searched assignment: adc_bits=3 x1" in printed and search.trainer.loggers == []
    assert {path.name for path in out.iterdir()} == {"cim_overrides.yaml", "sensitivity.csv", "front.csv",
                                                     "points.csv", "search.png"}
    overrides = out / "cim_overrides.yaml"
    assert yaml.safe_load(overrides.read_text()) == {"model": {"cim_overrides": {"layer3.2.conv2": {"adc_bits": 3}}}}

    with_yaml = [*BASE, *CONVENTIONAL, "--config", str(overrides), *TINY, "--trainer.default_root_dir", str(tmp_path)]
    fit = CIMQCLI(args=["fit", *with_yaml, "--trainer.limit_val_batches", "0"])  # no validation pass over the split
    layers = dict(fit.model.model.named_modules())
    assert [layers[name].spec.adc_bits for name in ("layer3.2.conv2", "layer3.2.conv1", "fc")] == [3, 4, None]
    path = next(cb.checkpoint_path for cb in fit.trainer.callbacks if hasattr(cb, "checkpoint_path"))
    record = torch.load(path, map_location="cpu", weights_only=True)["cimq"]
    assert record["cim_overrides"] == {"layer3.2.conv2": {"adc_bits": 3}}

    code, err = _run_main(["test", *BASE, *CONVENTIONAL, *TINY, "--ckpt_path", str(path)], capsys, monkeypatch)
    _assert_clear(code, err, "was written for model.cim_overrides['layer3.2.conv2']={'adc_bits': 3} but the config "
                             "gives None: pass the per-layer config the run used")
    test = CIMQCLI(args=["test", *with_yaml, "--ckpt_path", str(path)])
    assert 0 <= test.trainer.callback_metrics["test/acc"].item() <= 1

    # searched again from the fitted network (search.init_from): measured on it, the same answer for this budget
    again = tmp_path / "again"
    CIMQCLI(args=["search", *with_yaml, *SEARCH, "--init_from", str(path), "--output_dir", str(again)])
    assert f"from {path} (8 train images)" in capsys.readouterr().out
    assert yaml.safe_load((again / "cim_overrides.yaml").read_text()) == yaml.safe_load(overrides.read_text())
    code, err = _run_main(["search", *BASE, *CONVENTIONAL, *TINY, *SEARCH, "--init_from", str(path), "--output_dir",
                           str(again)], capsys, monkeypatch)  # the checkpoint's per-layer config is not this run's
    _assert_clear(code, err, f"search.init_from {str(path)!r} was written for model.cim_overrides['layer3.2.conv2']="
                             "{'adc_bits': 3} but the config gives None")
    assert os.getcwd() == str(REPO)


@pytest.mark.parametrize("args, needle", [
    (["--layers", "[layer9.*]"], "error: search.layers: 'layer9.*' matches no layer; the layers are: conv1, layer1.0.conv1, "),
    (["--energy_budget", "adc_bits=9"], "error: search.energy_budget='adc_bits=9' is not a uniform setting"),
    (["--candidates", "{adc_bits: [3, 99]}"], "error: search.candidates.adc_bits: 99 is invalid"),
    (["--layer_candidates", "{layer9.*: {input_bits: [7]}}"],
     "error: search.layer_candidates: 'layer9.*' matches no layer; the searched layers are: layer3.2.conv2, fc"),
    (["--init_from", "no/such/ptq.ckpt"], "error: search.init_from 'no/such/ptq.ckpt' not found"),
    (["--model.cim_overrides", "{fc: {adc_bits: 99}}"], "error: model.cim_overrides: layer 'fc': CIMSpec.adc_bits=99 is invalid"),
    (["--model.cim_overrides", "{fcc: {adc_bits: 3}}"], "error: model.cim_overrides: 'fcc' matches no layer (did you mean 'fc'?)"),
    (["--model.cim_overrides", "{fc: {adc_bit: 3}}"], "error: model.cim_overrides['fc']: unknown field 'adc_bit' (did you mean 'adc_bits'?)"),
    (["--model.cim", "null", "--model.cim_overrides", "{fc: {adc_bits: 3}}"],
     "error: model.cim_overrides needs a macro to override: set model.cim"),
])
def test_bad_search_arguments_and_overrides_are_one_error_line(args, needle, capsys, monkeypatch, tmp_path):
    code, err = _run_main(["search", *BASE, *CONVENTIONAL, *TINY, *SEARCH, "--output_dir", str(tmp_path), *args],
                          capsys, monkeypatch)
    _assert_clear(code, err, needle, short="matches no layer" not in needle)  # the list of 20 layers is a long line
    assert code == 2
