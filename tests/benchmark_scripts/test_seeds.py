"""Several fits per point: seeded settings, their keys and arguments, and the means the targets are checked on."""

from __future__ import annotations

import sys

import pytest
import yaml

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import accuracy_levers  # noqa: E402
import layer_search  # noqa: E402
from runner import CONFIG_SEED, ROW_KEY_NAMES, WIDE_ADC_KEY_NAMES, Setting, seed_spread, seeded  # noqa: E402


def test_the_config_seed_keeps_the_key_and_other_seeds_extend_it():
    base = Setting("resnet20", "cimq", adc_bits=8, iters=400)
    assert seeded(base, CONFIG_SEED) == base and seeded(base, CONFIG_SEED).key == base.key
    assert seeded(base, 2).key == base.key + "-seed2" and seeded(base, 2).seed == 2
    with pytest.raises(ValueError, match=f"seed {CONFIG_SEED} is the model config's own"):
        Setting("resnet20", "cimq", seed=CONFIG_SEED)
    cells = accuracy_levers.grid([8], [400], ["preset"], seeds=[0, 1, 2])
    assert [setting.seed for _, setting in cells] == [None, 1, 2]
    (_, three_bit), = accuracy_levers.grid([5], [400], ["preset"], input_bits=3)  # one input cycle fewer
    assert three_bit.input_bits == 3 and three_bit.key != accuracy_levers.grid([5], [400], ["preset"])[0][1].key


def test_seed_spread_merges_the_fits_of_one_setting():
    rows = [{"levers": "preset", "adc_bits": bits, "test/acc": accuracy}
            for bits, accuracy in ((8, 0.90), ("8", 0.92), (8, 0.91), (4, 0.5), (4, ""))]  # CSV cells are strings
    merged = {row["adc_bits"]: row for row in seed_spread(rows, ("levers", "adc_bits"))}
    assert merged["8"] == {"levers": "preset", "adc_bits": "8", "fits": 3, "mean": 0.91, "std": 0.01,
                           "range": "0.900-0.920"}
    assert merged["4"]["fits"] == 1 and merged["4"]["std"] == 0.0


def test_layer_search_targets_are_checked_on_each_points_mean():
    def row(key, point, accuracy, energy):
        return key, {"key": key, "point": point, "adc_bits": "", "test/acc": accuracy,
                     "test/energy_per_image_uj": energy}

    uniform5 = layer_search._uniform(5, 400)
    saving = layer_search.searched_key("saving", 400, 256)
    rows = dict([row(uniform5.key, "uniform", "0.900", "1.0"), row(layer_search._uniform(5, 400, 1).key, "uniform",
                                                                    "0.910", "1.0"),
                 row(saving, "80%", "0.905", "0.78"), row(saving + "-seed1", "80%", "0.925", "0.80")])
    (line,) = layer_search.targets(rows, 400, 256)
    # means: uniform ADC 5 0.905 at 1.0 uJ, the search 0.915 at 0.79 uJ: 21% less energy, 1 point more accurate;
    # either single fit of the search against the config seed's uniform fit alone would read differently
    assert line["met"] == "yes", line
    assert "0.915 (mean of 2 fits, 0.905-0.925) at 0.7900 uJ" in line["measured"]
    assert "vs uniform ADC 5 0.905 (mean of 2 fits, 0.900-0.910) at 1.0000 uJ" in line["measured"]
    assert "21.0% less energy, +1.0 points" in line["measured"]
    rows[saving + "-seed2"] = row(saving + "-seed2", "80%", "0.870", "0.79")[1]  # the mean falls below ADC 5's
    (line,) = layer_search.targets(rows, 400, 256)
    assert line["met"] == "**no**" and "mean of 3 fits" in line["measured"]


def test_layer_search_calibration_size_keeps_its_fits_apart_from_the_configs():
    """``--calibration-size 4000``: its uniform, searched and given points have keys of their own, and the targets
    compare a search with the uniform points of the same calibration only."""
    cal = layer_search._uniform(5, 400, calibration_size=4000)
    assert cal.calibration_size == 4000 and cal.key == layer_search._uniform(5, 400).key + "-calibration_size4000"
    # a search that may choose a 6-bit ADC (the default candidates 3-6), and a given point with one, fit the preset
    # whose ADC ranges are min-max from 6 bits: the preset's newer name (`runner.WIDE_ADC_KEY_NAMES`)
    assert layer_search.searched_key("saving", 400, 256, calibration_size=4000) == (
        "searched-saving-cimq15e-iters400-calibration4000-images256")
    assert layer_search.given_key("layer1.*:3", 400, 4000) == "given-cimq15d-iters400-calibration4000-layer1.all:3"
    assert layer_search.given_key("conv1:6/7 layer1.*:3", 400) == "given-cimq15e-iters400-conv1:6-in7_layer1.all:3"

    def row(key, accuracy, energy):
        return key, {"key": key, "point": key, "adc_bits": "", "test/acc": accuracy, "test/energy_per_image_uj": energy}

    rows = dict([row(layer_search._uniform(5, 400).key, "0.900", "1.0"), row(cal.key, "0.920", "1.0"),
                 row(layer_search.searched_key("saving", 400, 256), "0.910", "0.75"),
                 row(layer_search.searched_key("saving", 400, 256, calibration_size=4000), "0.915", "0.70")])
    (default,) = layer_search.targets(rows, 400, 256)
    (calibrated,) = layer_search.targets(rows, 400, 256, 4000)
    assert default["met"] == "yes" and "0.910 at 0.7500 uJ vs uniform ADC 5 0.900" in default["measured"]
    assert calibrated["met"] == "**no**" and "0.915 at 0.7000 uJ vs uniform ADC 5 0.920" in calibrated["measured"]
    assert "30.0% less energy, -0.5 points" in calibrated["measured"]
    # its plot is a file of its own: the preset's front in layer_search.png stays as it was
    assert layer_search.picture_name(None) == "layer_search.png"
    assert layer_search.picture_name(4000) == "layer_search-calibration4000.png"
    assert layer_search.picture_name(4000, 1600) == "layer_search-calibration4000-iters1600.png"


@pytest.fixture
def cli_args(monkeypatch, tmp_path):
    """``cli_args(setting, extra_args=())``: the CLI arguments `runner.measure` builds for ``setting`` (the CLI is
    stopped before it runs)."""
    import runner

    seen = []

    def stop(args):
        seen.append(args)
        raise StopIteration

    monkeypatch.setattr(runner, "cli", stop)

    def args_of(setting, extra_args=()):
        with pytest.raises(StopIteration):
            runner.measure(setting, tmp_path, extra_args=extra_args)
        return seen[-1]

    return args_of


def last_value(args, flag):
    """The value the CLI takes for ``flag``: the one after its last occurrence in ``args``."""
    return args[len(args) - 1 - args[::-1].index(flag) + 1]


def test_a_seeded_fit_draws_other_calibration_images_and_ptq_steps(cli_args):
    """`measure` hands the seed to the datamodule (which keys the calibration subset and every PTQ step's draws)
    and to ``seed_everything``; the config's seed adds nothing."""
    plain, other = (cli_args(seeded(Setting("resnet20", "cimq", adc_bits=8, iters=400), seed))
                    for seed in (CONFIG_SEED, 3))
    assert "--data.init_args.seed" not in plain and "--seed_everything" not in plain
    assert other[-4:] == ["--data.init_args.seed", "3", "--seed_everything", "3"]


def test_layer_search_refuses_a_budget_whose_uniform_setting_is_not_a_candidate(capsys):
    """The saving and accuracy budgets are set by uniform ADC 5, the energy budget by ADC 4: the search needs that
    setting among its candidates, so the script says so before fitting anything (it used to fail mid-run)."""
    with pytest.raises(SystemExit):
        layer_search.main(["--budgets", "saving", "--candidates", "3,4"])
    assert "--budgets saving is set by uniform ADC 5, which --candidates='3,4' leaves out: add 5" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        layer_search.main(["--budgets", "energy", "--candidates", "3,5"])
    assert "--budgets energy is set by uniform ADC 4" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        layer_search.main(["--budgets", "none", "--calibration-size", "0"])
    assert "--calibration-size=0: expected a number of train images > 0" in capsys.readouterr().err


def test_layer_search_budgets_give_the_search_options_they_name():
    budgets = layer_search.BUDGETS
    assert (budgets["energy"].flag, budgets["energy"].value(0.8)) == ("energy_budget", "adc_bits=4")
    assert (budgets["accuracy"].flag, budgets["accuracy"].value(0.8)) == ("loss_budget", "adc_bits=5")
    assert (budgets["saving"].flag, budgets["saving"].value(0.78)) == ("energy_budget", "0.78*adc_bits=5")


def test_layer_search_options_name_their_rows_and_points():
    default = layer_search.SearchOptions()
    assert layer_search.searched_key("saving", 400, 256) == (  # the default candidates reach 6 bits (min-max ranges)
        f"searched-saving-{WIDE_ADC_KEY_NAMES[ROW_KEY_NAMES['cimq']]}-iters400-images256")
    assert layer_search.searched_key("saving", 400, 256, layer_search.SearchOptions(candidates=(3, 4, 5))) == (
        f"searched-saving-{ROW_KEY_NAMES['cimq']}-iters400-images256-adc345")
    assert default.suffix("saving") == "" and default.label("saving") == "searched at 80% of uniform ADC 5's energy"
    options = layer_search.SearchOptions("mse", (3, 4, 5, 6, 7), 0.8, 4, ("conv1", "layer*"))
    assert options.suffix("saving") == "-mse-from-adc4-adc34567-layers_conv1_layerall"
    assert options.label("saving") == ("searched at 80% of uniform ADC 5's energy (mse, from the ADC-4 PTQ network, "
                                       "ADC 3/4/5/6/7, layers conv1, layer*)")


def test_layer_search_reads_assignments_given_by_hand():
    assert layer_search.given_assignment("layer1.*=3, layer3.*.conv2=None") == "layer1.*:3 layer3.*.conv2:None"
    assert layer_search.given_key("layer1.*:3 layer3.*:3", 400) == (
        f"given-{ROW_KEY_NAMES['cimq']}-iters400-layer1.all:3_layer3.all:3")
    for bad in ("layer1.*", "layer1.*=three", "=3", "conv1=7/", "conv1=7/None", "conv1=/7"):
        with pytest.raises(ValueError, match="expected glob=bits"):
            layer_search.given_assignment(bad)


def test_layer_search_assignments_give_input_bits_too(tmp_path):
    """``conv1=7/7``: ADC and input bits of a layer, in the written overrides and the row key; the low-ADC units
    read the ADC part."""
    assignment = layer_search.given_assignment("conv1=7/7,layer1.*=3")
    assert assignment == "conv1:7/7 layer1.*:3"
    assert layer_search.given_key(assignment, 400).endswith("-iters400-conv1:7-in7_layer1.all:3")
    written = layer_search.stored_overrides(assignment, tmp_path / "overrides.yaml")
    assert yaml.safe_load(written.read_text()) == {"model": {"cim_overrides": {
        "conv1": {"adc_bits": 7, "input_bits": 7}, "layer1.*": {"adc_bits": 3}}}}
    assert layer_search.LowAdcSteps.parse("3=800").unit_iters("conv1:None/6 layer1.*:3 conv1:3/7") == {
        "layer1.*": 800, "conv1": 800}
    for fields in ({"adc_bits": 7, "input_bits": 7}, {"adc_bits": None, "input_bits": 6}, {"adc_bits": 3}):
        assert layer_search.layer_fields(layer_search.layer_bits(fields)) == fields  # a searched layer, as a CSV pair
    options = layer_search.SearchOptions("mse", (3, 4, 5), 0.8, 4, ("conv1", "layer*"),
                                         "{conv1: {input_bits: [7, 8], adc_bits: [6, null]}}")
    assert options.suffix("saving").endswith("-layers_conv1_layerall-own_conv1_input_bits_7_8_adc_bits_6_null")
    assert options.label("saving").endswith("own candidates {conv1: {input_bits: [7, 8], adc_bits: [6, null]}})")


def test_layer_search_gives_the_units_of_low_adc_layers_their_steps():
    """``--low-adc-steps 3=800``: the unit of every layer or glob at ADC 3 or less, ResNet names."""
    low = layer_search.LowAdcSteps.parse("3=800")
    assert low == (3, 800, None, None) and low.suffix() == "-low3x800"
    assert low.unit_iters("layer1.*:3 layer2.*:4 layer3.1.conv2:2 conv1:5 layer3.2.conv1:None") == {
        "layer1.*": 800, "layer3.1": 800}
    assert low.unit_iters("conv1:3 layer2.*.conv2:3") == {"conv1": 800, "layer2.*": 800}
    for bad in ("3", "3=0", "x=800"):
        with pytest.raises(ValueError, match="expected BITS=STEPS"):
            layer_search.LowAdcSteps.parse(bad)
    halved = layer_search.LowAdcSteps.parse("3=800", 2e-4)
    assert halved.suffix() == "-low3x800-lrstep0.0002"
    assert halved.cli_args("layer1.*:3 layer2.*:4") == [
        "--model.objective.init_args.unit_iters", "{layer1.*: 800}",
        "--model.objective.init_args.unit_learning_rates", "{layer1.*: {lr_step: 0.0002}}"]
    kept = layer_search.LowAdcSteps.parse("3=400", keep_prob=0.75)
    assert kept.suffix() == "-low3x400-keep0.75" and "QDrop keep 0.75" in kept.label()
    assert kept.cli_args("layer1.*:3 layer2.*:4") == [
        "--model.objective.init_args.unit_iters", "{layer1.*: 400}",
        "--model.objective.init_args.unit_keep_prob", "{layer1.*: 0.75}"]
    with pytest.raises(ValueError, match=r"--low-adc-keep=1.5 is invalid: expected a probability in \(0, 1\]"):
        layer_search.LowAdcSteps.parse("3=400", keep_prob=1.5)


def test_a_setting_with_its_own_calibration_size_hands_it_to_the_datamodule(cli_args):
    """`Setting.calibration_size` reaches the CLI as ``data.calibration_size`` and names the row; the smoke runs'
    shrink (``extra_args``, after it) still wins; unset, the model config's 1,024 stays."""
    flag = "--data.init_args.calibration_size"
    four_k = Setting("resnet20", "cimq", adc_bits=3, iters=800, calibration_size=4000)
    assert four_k.key.endswith("-iters800-calibration_size4000")
    assert last_value(cli_args(four_k), flag) == "4000"
    assert last_value(cli_args(four_k, (flag, "32")), flag) == "32"
    assert flag not in cli_args(Setting("resnet20", "cimq", adc_bits=3, iters=800))
    assert dict(accuracy_levers.grid([3], [800], ["calibration on 4,000 images"]))[
        "calibration on 4,000 images"].calibration_size == 4000
