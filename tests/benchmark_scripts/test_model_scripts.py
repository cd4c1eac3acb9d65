"""Smoke runs of the benchmark scripts for other models, the export, the GPU check and low-ADC QAT (tiny data)."""

from __future__ import annotations

import sys

import pytest

from conftest import CIFAR10, REPO, RESNET20, csv_rows, small_cim_module

sys.path.insert(0, str(REPO / "benchmarks"))

import export_check  # noqa: E402
import other_models  # noqa: E402

pytestmark = pytest.mark.slow


def test_gpu_check_dry_run_on_cpu(out):
    import gpu_check

    rows = gpu_check.main(["--device", "cpu", "--data", str(CIFAR10), "--weights", str(RESNET20), "--iters", "1",
                           "--calibration-size", "32", "--batch", "4", "--test-images", "50", "--out-dir", str(out)])
    accuracy = next(r for r in rows if r["check"] == "PTQ test/acc")
    assert accuracy["cpu"] == accuracy["device"]  # the same device twice: the PTQ is deterministic
    assert all(r["ratio cpu/device"] != "" for r in rows if "fwd ms" in r["check"])


def test_export_check_smoke(out, smoke_args):
    row = export_check.main(smoke_args)
    assert row["images"] == 50  # the 2 test batches of 25 the fake-quant model was tested on
    assert row["same_predictions"] == 50
    assert float(row["max_relative_logit_error"]) <= 1e-4
    assert row["export_test_acc"] == row["fake_quant_acc"]
    assert csv_rows(out / "export_check.csv")[0]["same_predictions"] == "50"


def test_gptq_setting_rounds_at_calibration_and_reconstructs_nothing():
    from runner import Setting, derived_config

    config = derived_config(Setting("resnet20", "cimq", iters=0, weight_rounding="gptq"))
    names = [entry["class_path"].rsplit(".", 1)[-1] for entry in config["trainer"]["callbacks"]]
    assert names.index("GPTQRounding") == names.index("PostTrainingQuantization") - 1
    assert config["model"]["objective"]["init_args"]["iters_per_block"] == 0
    assert "weight_roundinggptq" in Setting("resnet20", "cimq", iters=0, weight_rounding="gptq").key
    with pytest.raises(ValueError, match="iters must be 0, not 50"):
        Setting("resnet20", "cimq", iters=50, weight_rounding="gptq")
    with pytest.raises(ValueError, match="'adaround' is unknown"):
        Setting("resnet20", "cimq", weight_rounding="adaround")
    with pytest.raises(ValueError, match="weight_rounding needs model.objective BlockReconstruction"):
        derived_config(Setting("resnet20", "cimq_qat", weight_rounding="gptq"))  # QAT: no reconstruction


def test_setting_fields_reach_the_config():
    from runner import Setting, derived_config

    clipping = [entry["init_args"] for entry in derived_config(Setting("resnet20", "cimq", psum_observer="minmax"))
                ["trainer"]["callbacks"] if entry["class_path"].endswith("PartialSumClipping")]
    assert clipping == [{"granularity": "column", "observer": "minmax", "asymmetric": "auto", "learn_clip": True}]
    # the presets' `observer: auto` changed their config from 6-bit ADCs up only: those keys take a new row name
    assert Setting("resnet20", "cimq", adc_bits=5, iters=400).equivalent_keys == (
        "resnet20-cimq15d-adc_bits5-iters400", "resnet20-cimq15c-adc_bits5-iters400")
    assert Setting("resnet20", "cimq", adc_bits=8, iters=400).equivalent_keys == ("resnet20-cimq15e-adc_bits8-iters400",)
    assert Setting("resnet20", "cimq", adc_bits=8, psum_observer="mse").key == "resnet20-cimq15d-adc_bits8-psum_observermse"

    frozen = derived_config(Setting("resnet20", "cimq", iters=400, lr_scale=1.0, lr_step=0.0))
    assert frozen["model"]["objective"]["init_args"]["lr_step"] == 0.0  # after lr_scale, which sets all three rates
    assert frozen["model"]["objective"]["init_args"]["lr_clip"] == pytest.approx(1e-3)
    wide = Setting("resnet20", "cimq", iters=400, batch_size=64)
    assert derived_config(wide)["model"]["objective"]["init_args"]["batch_size"] == 64  # the preset's is 32
    assert wide.key.endswith("-iters400-batch_size64")
    with pytest.raises(ValueError, match="batch_size needs model.objective BlockReconstruction"):
        derived_config(Setting("resnet20", "cimq_qat", batch_size=64))

    def drop_targets(setting):
        return [entry["init_args"]["targets"] for entry in derived_config(setting)["trainer"]["callbacks"]
                if entry["class_path"].endswith("QuantDropping")]

    assert drop_targets(Setting("resnet20", "cimq")) == [["block_input", "activations"]]  # the preset's own
    assert drop_targets(Setting("resnet20", "cimq", drop_psums=True)) == [["block_input", "activations", "psums"]]
    assert drop_targets(Setting("resnet20", "cimq", drop_psums=False)) == [["block_input", "activations"]]
    assert Setting("resnet20", "cimq", adc_bits=3, drop_psums=True).key == "resnet20-cimq15d-adc_bits3-drop_psumsTrue"
    with pytest.raises(ValueError, match="drop_psums needs QuantDropping"):
        derived_config(Setting("resnet20", "cimq_qat", drop_psums=True))

    def clipping(setting):
        return [entry["init_args"] for entry in derived_config(setting)["trainer"]["callbacks"]
                if entry["class_path"].endswith("PartialSumClipping")][0]

    assert clipping(Setting("resnet20", "cimq"))["asymmetric"] == "auto"  # the preset's own
    assert clipping(Setting("resnet20", "cimq_qat", asymmetric_adc=True))["asymmetric"] is True
    explicit = Setting("resnet20", "cimq", adc_bits=2, asymmetric_adc=True)
    assert explicit.key == "resnet20-cimq15d-adc_bits2-asymmetric_adcTrue"
    # the preset's auto gives ADC 2 asymmetric ranges: a new name, which reuses the explicit setting's rows; ADC 3
    # runs the same config as before and keeps its key
    auto = Setting("resnet20", "cimq", adc_bits=2, iters=800)
    assert auto.key == "resnet20-cimq15d_asym-adc_bits2-iters800"
    assert auto.equivalent_keys[1] == "resnet20-cimq15d-adc_bits2-iters800-asymmetric_adcTrue"
    assert Setting("resnet20", "cimq", adc_bits=3).key == "resnet20-cimq15d-adc_bits3"
    assert Setting("resnet20", "cimq", adc_bits=2, asymmetric_adc=False).key == \
        "resnet20-cimq15d-adc_bits2-asymmetric_adcFalse"
    assert Setting("resnet20", "conventional", adc_bits=2).key == "resnet20-conventional15-adc_bits2"  # no auto there
    assert Setting("resnet20", "cimq", adc_bits=8, iters=400).equivalent_keys == (
        "resnet20-cimq15e-adc_bits8-iters400",)  # unchanged for wide ADCs


def test_low_adc_qat_asymmetric_ranges_reach_ptq_and_qat_and_name_the_checkpoint(tmp_path):
    import types

    import low_adc_qat

    args = types.SimpleNamespace(calibration_size=4000, seed=0, asymmetric_adc=True, symmetric_adc=False, lr=1e-4,
                                 simulation="eager", objective="task", quantizer_lr_scale=None, steps=2,
                                 sparsity_weight=None)
    assert low_adc_qat.ptq_variant(args, 3) == "-calibration4000-asymmetric"
    config = low_adc_qat.qat_config(3, tmp_path / "ptq.ckpt", args)
    clipping = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("PartialSumClipping")]
    assert clipping[0]["init_args"]["asymmetric"] is True

    def variant(bits, **flags):
        return low_adc_qat.ptq_variant(types.SimpleNamespace(**{**vars(args), **flags}), bits)

    # neither flag: the presets' auto, asymmetric at ADC 2 (the explicit fits' checkpoint and rows), not at 3
    assert variant(2, asymmetric_adc=False) == "-calibration4000-asymmetric"
    assert variant(3, asymmetric_adc=False) == "-calibration4000"
    assert variant(2, asymmetric_adc=False, symmetric_adc=True) == "-calibration4000"
    symmetric = low_adc_qat.qat_config(2, tmp_path / "ptq.ckpt", types.SimpleNamespace(
        **{**vars(args), "asymmetric_adc": False, "symmetric_adc": True}))
    assert [c["init_args"]["asymmetric"] for c in symmetric["trainer"]["callbacks"]
            if c["class_path"].endswith("PartialSumClipping")] == [False]


def test_other_models_cifar100_ptq_smoke_calibrates_on_cifar10_and_tests_on_the_sample(out, smoke_args):

    row = other_models.main([*smoke_args, "--ptq"])[0]
    assert row["calibration"] == "cifar10_lossless train (64 images)" and row["test_images"] == 64
    assert row["iters"] == 2  # the smoke budget; the preset's own is the config's
    assert 0.45 < row["fp_acc"] < 0.75  # the pretrained ResNet-56 on the first 64 sample images (60% on all 100)
    assert row["ptq_acc"] > 0.2  # W4A4, ADC 4 after 2 steps per unit: far above chance (1%)
    assert 0 < row["bit_density"] < 0.5 and row["hw_efficiency_vs_baseline"] > 1
    assert (out / "cifar100_ptq.csv").is_file()


def test_low_adc_qat_smoke_runs_qat_from_the_ptq_checkpoint_and_reuses_its_row(out):
    import low_adc_qat

    args = ["--quick", "--adc-bits", "3", "--out-dir", str(out), "--work-dir", str(out / "work"), "--objective",
            "distill-quantizers"]
    with pytest.raises(SystemExit):  # a temperature without distillation is refused, not ignored
        low_adc_qat.main([*args[:-2], "--temperature", "2"])
    with pytest.raises(SystemExit):  # so is a quantizer rate that would not learn
        low_adc_qat.main([*args, "--quantizer-lr-scale", "0"])
    row = low_adc_qat.main(args)[0]
    assert (int(row["adc_bits"]), int(row["steps"]), row["train"]) == (3, 2, "lossless")
    assert row["objective"] == "distill T=1, quantizers only"
    assert 0.2 < row["ptq/acc"] <= 1  # ADC 3 after calibration and 1 step per unit: far above chance (10%)
    assert abs(row["qat/acc"] - row["ptq/acc"]) < 0.1  # two QAT steps of the steps and clips from that checkpoint
    assert 0 < row["qat/bit_density"] < 0.5 and row["qat/efficiency"] > 1  # the QAT test's hardware report
    assert (out / "work" / "low_adc_qat_quick" / "ptq-adc3-iters1.ckpt").is_file()
    again = low_adc_qat.main(args)[0]  # the CSV's row: nothing fitted again
    assert float(again["qat/acc"]) == row["qat/acc"] and len(csv_rows(out / "low_adc_qat_quick.csv")) == 1


def test_joint_distillation_adds_the_weights_at_their_own_rate():
    """`low_adc_qat.JointDistillation`: the input steps and ADC clips at the PTQ preset's rates, and every other
    learnable parameter (weights, biases, weight steps) in a third Adam group at ``weight_lr``, none frozen at the
    fit's setup; 0 is refused."""
    import low_adc_qat

    from cimq_pl.errors import ConfigError
    from cimq_pl.quant import iter_quantizers

    objective = low_adc_qat.JointDistillation(weight_lr=3e-5, lr_scale=2.0)
    module = small_cim_module(objective)
    model = module.model
    before = {id(p) for p in model.parameters() if p.requires_grad}
    objective.setup(module, "fit")
    config = objective.configure_optimizers(module)
    groups = config["optimizer"].param_groups
    assert [g["lr"] for g in groups] == pytest.approx([8e-4, 2e-2, 3e-5])
    quantizers = {id(q.step) for _, role, q in iter_quantizers(model) if role == "input"} | {
        id(q.theta) for _, role, q in iter_quantizers(model) if role == "psum"}
    weights = {id(p) for p in groups[2]["params"]}
    assert weights == before - quantizers and len(weights) >= 4  # two convs' weights and biases at least
    assert {id(m.weight) for m in model if hasattr(m, "weight")} <= weights
    assert {id(p) for p in model.parameters() if p.requires_grad} == before  # nothing frozen
    with pytest.raises(ConfigError, match=r"weight_lr=0 is invalid: expected > 0"):
        low_adc_qat.JointDistillation(weight_lr=0)


def test_step_rate_pair_smoke(out, smoke_args):
    """Both sides fit in processes of their own (the baseline from a worktree of the commit, its preset's input
    codes set as asked), the ratio is the one of the medians; a setting the baseline preset lacks is refused."""
    import step_rate_pair

    earlier = "round,side,simulation,seconds_per_step,baseline,same_allocator\n1,baseline,eager,0.0955,1d4390d,False\n"
    (out / "step_rate_pair.csv").write_text(earlier)  # a run of the older format, kept below the new ones
    args = [*smoke_args, "--baseline", "HEAD", "--rounds", "1", "--ptq-steps", "3", "--simulation", "eager",
            "--baseline-set", "BitSparseActivations.max_ones=2"]
    result = step_rate_pair.main(args)
    assert [(run["side"], run["simulation"]) for run in result["runs"]] == [("baseline", "eager"),
                                                                           ("this checkout", "eager")]
    seconds = [run["seconds_per_step"] for run in result["runs"]]
    assert all(0 < s < 10 for s in seconds)
    assert result["ratio of medians"] == round(seconds[0] / seconds[1], 2)
    rows = csv_rows(out / "step_rate_pair.csv")
    assert [float(row["seconds_per_step"]) for row in rows] == [0.0955, *seconds]
    assert rows[0]["date"] == "" and rows[0]["baseline"] == "1d4390d"
    assert all(row["date"] and row["checkout"] and row["baseline"] == "HEAD" for row in rows[1:])
    config = (out / "work" / "round0-baseline" / "work" / "config.yaml").read_text()  # what the baseline fit ran
    assert "max_ones: 2" in config and "max_ones: null" not in config
    with pytest.raises(SystemExit, match="has no callback 'NoSuchCallback'"):
        step_rate_pair.main([*args, "--baseline-set", "NoSuchCallback.x=1"])


def test_low_adc_qat_names_other_ptq_fits_by_calibration_size_and_seed(out):
    """``--calibration-size`` and ``--seed`` reach the CLI of both fits and name the PTQ checkpoint and row key, so
    a fit with other data is never taken for the preset's; the config's own values keep the old names."""
    import types

    import low_adc_qat

    preset = types.SimpleNamespace(calibration_size=None, seed=0, asymmetric_adc=False, symmetric_adc=False)
    assert low_adc_qat.ptq_variant(preset, 3) == "" and low_adc_qat.data_args(None, 0) == []  # runner.data_args
    other = types.SimpleNamespace(calibration_size=4000, seed=1, asymmetric_adc=False, symmetric_adc=False)
    assert low_adc_qat.ptq_variant(other, 3) == "-calibration4000-seed1"
    assert low_adc_qat.data_args(4000, 1) == ["--data.init_args.calibration_size", "4000", "--data.init_args.seed", "1",
                                            "--seed_everything", "1"]
    for bad in (["--calibration-size", "0"], ["--seed", "-1"]):
        with pytest.raises(SystemExit):
            low_adc_qat.main(["--quick", "--out-dir", str(out), *bad])


@pytest.mark.parametrize("objective, rates", [
    ("distill-quantizers", {"lr_step": 4e-4 * 3, "lr_clip": 1e-2 * 3, "weight_lr": 0.0}),
    ("distill-joint", {"lr_step": 4e-4 * 3, "lr_clip": 1e-2 * 3, "weight_lr": 3e-5}),
])
def test_low_adc_qat_config_carries_the_command_lines_rates_into_the_objective(objective, rates, tmp_path):
    """`low_adc_qat.qat_config`: ``--quantizer-lr-scale 3`` reaches the objective's ``lr_scale`` (the PTQ preset's
    rates x3) and, with distill-joint, ``--lr`` its ``weight_lr``; the objective built from the config has them."""
    import argparse
    import importlib

    import low_adc_qat

    args = argparse.Namespace(lr=3e-5, simulation="compiled", objective=objective, temperature=2.0,
                              quantizer_lr_scale=3.0, steps=1200, sparsity_weight=0.0, asymmetric_adc=False,
                              symmetric_adc=False)
    config = low_adc_qat.qat_config(2, tmp_path / "ptq.ckpt", args)
    spec = config["model"]["objective"]
    assert spec["class_path"] == low_adc_qat.OBJECTIVES[objective]
    module, name = spec["class_path"].rsplit(".", 1)
    built = getattr(importlib.import_module(module), name)(**spec["init_args"])
    assert {key: getattr(built, key) for key in rates} == pytest.approx(rates)
    assert built.temperature == 2.0 and config["trainer"]["max_steps"] == 1200
    (qat_callback,) = [c for c in config["trainer"]["callbacks"]
                       if c["class_path"].endswith("QuantizationAwareTraining")]
    assert qat_callback["init_args"]["init_from"] == str(tmp_path / "ptq.ckpt")


def test_adc_range_shapes_on_the_low_adc_checkpoint(out):
    """The range-shape analysis on the smoke PTQ checkpoint of the test above: one row per layer with an ADC and a
    total, the yardstick (one bit more) far below today's shape."""
    import adc_range_shapes

    checkpoint = out / "work" / "low_adc_qat_quick" / "ptq-adc3-iters1.ckpt"
    rows = adc_range_shapes.main(["--checkpoint", str(checkpoint), "--adc-bits", "3", "--images", "2", "--points",
                                  "8", "--test-batches", "2", "--out-dir", str(out), "--work-dir", str(out / "work")])
    errors, tests = rows[:19], rows[19:]
    assert errors[-1]["layer"].startswith("all layers")  # 18 layers with an ADC (int8 edges), then the total
    assert all(row["symmetric"] == 1.0 for row in errors)
    assert errors[-1]["symmetric, one bit more"] < 0.5
    assert len(csv_rows(out / "adc_range_shapes-adc3.csv")) == 19
    assert [row["ranges"].split(",")[-1].strip() for row in tests] == ["as the checkpoint learned them", "symmetric",
                                                                       "asymmetric"]
    assert all(0.0 <= row["test/acc"] <= 1.0 for row in tests) and len(tests) == 3
    with pytest.raises(SystemExit):
        adc_range_shapes.main(["--checkpoint", str(out / "missing.ckpt"), "--adc-bits", "3", "--out-dir", str(out)])
