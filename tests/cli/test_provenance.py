"""A checkpoint records the macro, technique set and quantizer options of its run; a run whose config differs
is refused with one line naming the field, both values and the flag that makes them agree (`cimq_pl.provenance`).
`--without` switches listed callbacks off."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from conftest import CIFAR10, REPO, RESNET20
from .test_bad_input import _assert_clear, _run_main

from cimq_pl.errors import ConfigError
from cimq_pl.provenance import check_config_agrees, check_quantizer_options, configured_techniques
from cimq_pl.quant import CIMSpec

BASE = ["--config", "configs/resnet20_cifar10.yaml", "--data.root", str(CIFAR10), "--model.pretrained", str(RESNET20),
        "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--data.init_args.num_workers", "0",
        "--data.init_args.eval_batch_size", "50", "--trainer.limit_test_batches", "2"]
CONVENTIONAL = ["--config", "configs/quant/conventional.yaml"]
CIMQ = ["--config", "configs/quant/cimq_ptq.yaml"]
ALL_BUT_PTQ_OF_CIMQ = "BitSparseActivations,ArraywiseWeights,PartialSumClipping,QuantDropping,HardwareReport"


def _record(cim=None, techniques=None) -> dict:
    cim = dataclasses.asdict(CIMSpec(adc_bits=3)) if cim is None else cim
    return {"hyper_parameters": {"name": "cifar_resnet20", "num_classes": 10, "cim": cim},
            "cimq": {"cim": cim, "techniques": techniques or {}, "quantizer_options": {}}}


def _model(**cim) -> dict:
    return {"name": "cifar_resnet20", "num_classes": 10, "cim": dataclasses.asdict(CIMSpec(**cim))}


def test_a_macro_field_that_differs_is_named_with_both_values_and_the_flag():
    with pytest.raises(ConfigError, match=r"model\.cim\.adc_bits=3 but the config gives 4: pass --model\.cim\.adc_bits 3"):
        check_config_agrees(_record(), _model(adc_bits=4), {}, "x.ckpt")
    check_config_agrees(_record(), _model(adc_bits=3), {}, "x.ckpt")  # the same macro is accepted


def test_float_and_cim_checkpoints_are_not_mixed_up():
    with pytest.raises(ConfigError, match=r"float network \(model\.cim null\).*pass --model\.cim null"):
        check_config_agrees(_record(cim=None) | {"cimq": {"cim": None, "techniques": {}}}, _model(), {}, "x.ckpt")
    with pytest.raises(ConfigError, match=r"written for a CIM macro .*adc_bits=3.* model\.cim null"):
        check_config_agrees(_record(), {"name": "cifar_resnet20", "num_classes": 10, "cim": None}, {}, "x.ckpt")


def test_per_layer_overrides_must_agree():
    overrides = {"layer1.*.conv2": {"adc_bits": 3}}
    record = _record()
    record["cimq"]["cim_overrides"] = overrides
    check_config_agrees(record, {**_model(adc_bits=3), "cim_overrides": dict(overrides)}, {}, "x.ckpt")
    with pytest.raises(ConfigError, match=r"written for model\.cim_overrides\['layer1\.\*\.conv2'\]=\{'adc_bits': 3\} but "
                                          r"the config gives \{'adc_bits': 5\}: pass the per-layer config the run used"):
        check_config_agrees(record, {**_model(adc_bits=3), "cim_overrides": {"layer1.*.conv2": {"adc_bits": 5}}}, {},
                            "x.ckpt")
    with pytest.raises(ConfigError, match=r"model\.cim_overrides\['layer1\.\*\.conv2'\]=\{'adc_bits': 3\} but the config "
                                          r"gives None"):
        check_config_agrees(record, _model(adc_bits=3), {}, "x.ckpt")
    # a checkpoint of the release before overrides (no record of them) had none
    with pytest.raises(ConfigError, match=r"model\.cim_overrides\['fc'\]=None but the config gives \{'adc_bits': 6\}"):
        check_config_agrees(_record(), {**_model(adc_bits=3), "cim_overrides": {"fc": {"adc_bits": 6}}}, {}, "x.ckpt")
    check_config_agrees(_record(), {**_model(adc_bits=3), "cim_overrides": None}, {}, "x.ckpt")


def test_qat_init_from_a_ptq_checkpoint_of_other_overrides_is_refused(tmp_path):
    from cimq_pl.callbacks.qat import load_ptq_checkpoint_
    from cimq_pl.module import CIMQModule

    module = CIMQModule(cim=CIMSpec(adc_bits=3), cim_overrides={"fc": {"adc_bits": 6}})
    record = _record()
    record["cimq"]["cim_overrides"] = {"fc": {"adc_bits": 5}}
    torch.save({**record, "state_dict": module.state_dict()}, tmp_path / "ptq.ckpt")
    with pytest.raises(ConfigError, match=r"QAT init_from '.*ptq\.ckpt' was written for model\.cim_overrides\['fc'\]="
                                          r"\{'adc_bits': 5\} but the config gives \{'adc_bits': 6\}"):
        load_ptq_checkpoint_(module, str(tmp_path / "ptq.ckpt"))
    record["cimq"]["cim_overrides"] = {"fc": {"adc_bits": 6}}
    torch.save({**record, "state_dict": module.state_dict()}, tmp_path / "ptq.ckpt")
    load_ptq_checkpoint_(module, str(tmp_path / "ptq.ckpt"))  # the same macro and overrides load


def test_model_name_and_classes_must_agree():
    with pytest.raises(ConfigError, match=r"model\.name='cifar_resnet20' but the config gives 'cifar_resnet32'"):
        check_config_agrees(_record(), {**_model(adc_bits=3), "name": "cifar_resnet32"}, {}, "x.ckpt")


def test_technique_sets_and_settings_must_agree():
    saved = {"BitSparseActivations": {"max_ones": 2, "sparsity_weight": 0.0, "observer": "mse"}}
    record = _record(techniques=saved)
    with pytest.raises(ConfigError, match=r"made with the technique\(s\) BitSparseActivations\(max_ones=2"):
        check_config_agrees(record, _model(adc_bits=3), {}, "x.ckpt")
    with pytest.raises(ConfigError, match=r"made without the technique\(s\) ArraywiseWeights, QuantDropping.*"
                                          r"--without ArraywiseWeights,QuantDropping"):
        check_config_agrees(record, _model(adc_bits=3), {**saved, "QuantDropping": {}, "ArraywiseWeights": {}}, "x")
    with pytest.raises(ConfigError, match=r"BitSparseActivations\.max_ones=2 but the config gives 3: set max_ones: 2"):
        check_config_agrees(record, _model(adc_bits=3), {"BitSparseActivations": {**saved["BitSparseActivations"],
                                                                                   "max_ones": 3}}, "x.ckpt")
    check_config_agrees(record, _model(adc_bits=3), saved, "x.ckpt")


def test_technique_settings_are_read_from_the_parsed_callbacks_config():
    callbacks = [{"class_path": "cimq_pl.callbacks.BitSparseActivations", "init_args": {"max_ones": 1}},
                 {"class_path": "cimq_pl.callbacks.PostTrainingQuantization", "init_args": {"iters_per_block": 0}},
                 {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint"}]
    assert configured_techniques(callbacks) == {
        "BitSparseActivations": {"max_ones": 1, "sparsity_weight": 0.0, "observer": "mse", "step_scale": 1.0}}


def test_a_record_made_before_a_technique_field_existed_was_made_with_its_default():
    """Checkpoints written before ``BitSparseActivations.step_scale`` existed agree with its default only."""
    old = {"BitSparseActivations": {"max_ones": 2, "sparsity_weight": 0.0, "observer": "mse"}}
    record = _record(techniques=old)
    check_config_agrees(record, _model(adc_bits=3), {"BitSparseActivations": {**old["BitSparseActivations"],
                                                                               "step_scale": 1.0}}, "x.ckpt")
    with pytest.raises(ConfigError, match=r"BitSparseActivations\.step_scale=1\.0 but the config gives 2\.0"):
        check_config_agrees(record, _model(adc_bits=3), {"BitSparseActivations": {**old["BitSparseActivations"],
                                                                                   "step_scale": 2.0}}, "x.ckpt")


def test_quantizer_options_that_differ_name_the_layer_and_field():
    saved = {"quantizer_options": {"conv1": {"weight_granularity": "layer", "psum_granularity": "layer"}}}
    with pytest.raises(ConfigError, match=r"layer 'conv1' was quantized with weight_granularity='layer' but this run "
                                          r"builds 'array'"):
        check_quantizer_options(saved, {"conv1": {"weight_granularity": "array", "psum_granularity": "layer"}}, "ckpt")
    with pytest.raises(ConfigError, match=r"this run has CIM layer 'fc', which the checkpoint's model does not"):
        check_quantizer_options(saved, {"conv1": saved["quantizer_options"]["conv1"], "fc": {}}, "ckpt")
    check_quantizer_options(saved, dict(saved["quantizer_options"]), "ckpt")


def test_keep_probabilities_act_in_training_only_and_are_not_compared():
    """A checkpoint written before ``QuantDropping.int8_layers`` records keep_prob 0.5 on the int8 edge layers."""
    saved = {"quantizer_options": {"conv1": {"input_bits": 8, "input_keep_prob": 0.5, "psum_keep_prob": 0.5}}}
    check_quantizer_options(saved, {"conv1": {"input_bits": 8, "input_keep_prob": None, "psum_keep_prob": None}}, "ckpt")
    with pytest.raises(ConfigError, match="'conv1' was quantized with input_bits=8 but this run builds 4"):
        check_quantizer_options(saved, {"conv1": {"input_bits": 4, "input_keep_prob": 0.5}}, "ckpt")


@pytest.fixture(scope="module")
def conventional_checkpoint(tmp_path_factory):
    """A real conventional PTQ checkpoint (calibration on 32 images) and its test accuracy on 100 images."""
    import wandb

    from cimq_pl.cli import CIMQCLI

    folder = tmp_path_factory.mktemp("provenance")
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        wandb.finish()
        fit = CIMQCLI(args=["fit", *BASE, *CONVENTIONAL, "--data.init_args.calibration_size", "32",
                            "--trainer.limit_val_batches", "0", "--trainer.default_root_dir", str(folder)])
        path = next(cb.checkpoint_path for cb in fit.trainer.callbacks if hasattr(cb, "checkpoint_path"))
        test = CIMQCLI(args=["test", *BASE, *CONVENTIONAL, "--ckpt_path", str(path),
                             "--trainer.default_root_dir", str(folder)])
    finally:
        os.chdir(cwd)
    return path, test.trainer.callback_metrics["test/acc"].item()


def test_the_checkpoint_records_its_run(conventional_checkpoint):
    path, _ = conventional_checkpoint
    record = torch.load(path, map_location="cpu", weights_only=True)["cimq"]
    assert record["cim"]["adc_bits"] == 4 and record["techniques"] == {}
    assert len(record["quantizer_options"]) == 20  # every CIM layer of ResNet-20
    assert record["quantizer_options"]["layer2.0.conv1"]["weight_granularity"] == "layer"  # conventional


def test_a_checkpoint_of_another_macro_or_technique_set_is_refused_before_the_run(conventional_checkpoint, capsys,
                                                                                   monkeypatch):
    path, _ = conventional_checkpoint
    code, err = _run_main(["test", *BASE, *CONVENTIONAL, "--ckpt_path", str(path), "--model.cim.adc_bits", "3"],
                          capsys, monkeypatch)
    _assert_clear(code, err, "was written for model.cim.adc_bits=4 but the config gives 3: pass --model.cim.adc_bits 4")
    assert "Restoring states" not in err  # refused while parsing, before the model or the checkpoint is loaded
    code, err = _run_main(["test", *BASE, *CIMQ, "--model.cim.first_layer", "cim", "--ckpt_path", str(path)], capsys,
                          monkeypatch)
    _assert_clear(code, err, "was written for model.cim.first_layer='int8' but the config gives 'cim'")
    code, err = _run_main(["test", *BASE, *CIMQ, "--ckpt_path", str(path)], capsys, monkeypatch)
    _assert_clear(code, err, "pass --without ArraywiseWeights,BitSparseActivations,PartialSumClipping,QuantDropping")


def test_without_switches_techniques_off(conventional_checkpoint, capsys, monkeypatch, tmp_path):
    """The CIMQ config without its four techniques (and with a calibration-only PTQ) is the conventional one."""
    from cimq_pl.cli import CIMQCLI

    path, accuracy = conventional_checkpoint
    monkeypatch.chdir(REPO)
    test = CIMQCLI(args=["test", *BASE, *CIMQ, "--without", ALL_BUT_PTQ_OF_CIMQ, "--ckpt_path", str(path),
                         "--model.objective.init_args.iters_per_block", "0", "--trainer.default_root_dir", str(tmp_path)])
    names = [type(cb).__name__ for cb in test.trainer.callbacks]
    assert not {"BitSparseActivations", "QuantDropping", "HardwareReport"} & set(names)
    assert test.trainer.callback_metrics["test/acc"].item() == accuracy
    assert test.config["test"]["weights_only"] is True  # the checkpoint was loaded weights-only
    assert os.getcwd() == str(REPO)
    code, err = _run_main(["test", *BASE, *CIMQ, "--without", "BitSparseActivation", "--ckpt_path", str(path)],
                          capsys, monkeypatch)
    _assert_clear(code, err, "--without 'BitSparseActivation': no such callback in trainer.callbacks "
                             "(did you mean BitSparseActivations?)")


def test_more_cpu_processes_than_cores_is_a_warning():
    from cimq_pl.cli import _check_devices

    cores = os.cpu_count()
    with pytest.warns(UserWarning, match=rf"trainer\.devices={cores + 1} CPU processes on a machine with {cores} cores"):
        _check_devices({"devices": str(cores + 1), "accelerator": "cpu"})  # as the command line gives it



def test_auto_adc_ranges_agree_with_what_each_layer_resolved_them_to():
    """A checkpoint made with `PartialSumClipping(observer: mse)` is tested with today's presets (``auto``): the
    technique check lets ``auto`` pass, the layers' recorded observers decide (`check_quantizer_options`)."""
    saved = {"PartialSumClipping": {"granularity": "column", "observer": "mse", "learn_clip": True}}
    record = _record(techniques=saved)
    auto = {"PartialSumClipping": {**saved["PartialSumClipping"], "observer": "auto"}}
    check_config_agrees(record, _model(adc_bits=3), auto, "x.ckpt")
    with pytest.raises(ConfigError, match=r"PartialSumClipping\.observer='mse' but the config gives 'minmax'"):
        check_config_agrees(record, _model(adc_bits=3), {"PartialSumClipping": {**saved["PartialSumClipping"],
                                                                                "observer": "minmax"}}, "x.ckpt")
    layers = {"quantizer_options": {"layer1.0.conv1": {"psum_observer": "mse"}}}
    check_quantizer_options(layers, {"layer1.0.conv1": {"psum_observer": "mse"}}, "x.ckpt")
    with pytest.raises(ConfigError, match=r"psum_observer='mse'"):
        check_quantizer_options(layers, {"layer1.0.conv1": {"psum_observer": "minmax"}}, "x.ckpt")
    # the same for the range shape: a symmetric checkpoint (no ``asymmetric`` then) passes today's ``auto`` at 3 bits,
    # and at 2 bits the layers, which resolve ``auto`` to asymmetric ranges, refuse it
    shaped = {"PartialSumClipping": {**auto["PartialSumClipping"], "asymmetric": "auto"}}
    check_config_agrees(record, _model(adc_bits=3), shaped, "x.ckpt")
    layers = {"quantizer_options": {"layer1.0.conv1": {"psum_asymmetric": False}}}
    with pytest.raises(ConfigError, match=r"psum_asymmetric=False but this run builds True.*asymmetric: true or false"):
        check_quantizer_options(layers, {"layer1.0.conv1": {"psum_asymmetric": True}}, "x.ckpt")
    # a checkpoint written before the field existed had symmetric ranges: refused by the same line, not by the
    # offsets its state dict lacks
    older = {"quantizer_options": {"layer1.0.conv1": {"psum_observer": "mse"}}}
    check_quantizer_options(older, {"layer1.0.conv1": {"psum_observer": "mse", "psum_asymmetric": False}}, "x.ckpt")
    with pytest.raises(ConfigError, match=r"psum_asymmetric=False but this run builds True"):
        check_quantizer_options(older, {"layer1.0.conv1": {"psum_observer": "mse", "psum_asymmetric": True}}, "x.ckpt")


def test_qat_init_from_a_ptq_checkpoint_of_other_range_shapes_names_the_option(tmp_path):
    """QAT's ``init_from`` compares the layers' recorded options that shape their tensors (`STATE_SHAPING_FIELDS`):
    a PTQ checkpoint with asymmetric ADC ranges is refused by the line naming ``psum_asymmetric``, not as missing
    offsets; options QAT may change (the rounding) are not compared."""
    from cimq_pl.callbacks.qat import load_ptq_checkpoint_
    from cimq_pl.module import CIMQModule
    from cimq_pl.provenance import quantizer_options

    module = CIMQModule(cim=CIMSpec(adc_bits=3))
    options = quantizer_options(module.model)
    layer = sorted(options)[1]
    record = _record()
    record["cimq"]["quantizer_options"] = {name: {**opts, "weight_rounding": "adaround"} for name, opts in options.items()}
    torch.save({**record, "state_dict": module.state_dict()}, tmp_path / "ptq.ckpt")
    load_ptq_checkpoint_(module, str(tmp_path / "ptq.ckpt"))  # the PTQ rounding differs from QAT's: loads
    record["cimq"]["quantizer_options"][layer]["psum_asymmetric"] = True
    torch.save({**record, "state_dict": module.state_dict()}, tmp_path / "ptq.ckpt")
    with pytest.raises(ConfigError, match=rf"QAT init_from '.*ptq\.ckpt': layer '{layer}' was quantized with "
                                          r"psum_asymmetric=True but this run builds False.*asymmetric: true or false"):
        load_ptq_checkpoint_(module, str(tmp_path / "ptq.ckpt"))
