"""Smoke runs of every benchmark script (``--smoke``: tiny data, 2 steps per unit), with checks on their numbers.

They keep the suite working (`python benchmarks/run_suite.py` regenerates the README's tables); the numbers
they produce on 100 images are not results, but some of them are exact properties worth asserting.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CIFAR10, REPO, RESNET20, csv_rows

sys.path.insert(0, str(REPO / "benchmarks"))

import ablation  # noqa: E402
import cim_layer_speed  # noqa: E402
import export_check  # noqa: E402
import other_models  # noqa: E402
import presets  # noqa: E402
import run_suite  # noqa: E402
import startup  # noqa: E402
import sweeps  # noqa: E402
import training_time  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("bench")


def _args(out: Path) -> list[str]:
    return ["--smoke", "--out-dir", str(out), "--work-dir", str(out / "work")]


@pytest.fixture(scope="module")
def ablation_rows(out):
    return {row["row"]: row for row in ablation.main(_args(out))}


def test_ablation_smoke(ablation_rows, out):
    assert set(ablation_rows) == {"fp", "conventional", "cimq"}
    assert 0.8 <= float(ablation_rows["fp"]["test/acc"]) <= 1.0  # 100 lossless test images, FP 0.915 on 1,000
    assert 0.5 <= float(ablation_rows["fp"]["jpeg/acc"]) < float(ablation_rows["fp"]["test/acc"])
    # conventional with an 8-bit ADC is the baseline itself (same calibration images): efficiency exactly 1
    assert float(ablation_rows["conventional"]["test/hw_efficiency_vs_baseline"]) == 1.0
    assert float(ablation_rows["cimq"]["test/hw_efficiency_vs_baseline"]) > 1.0  # a 4-bit ADC costs less
    assert 0.3 < float(ablation_rows["cimq"]["test/acc"]) <= 1.0
    assert len(csv_rows(out / "ablation.csv")) == 3 and (out / "ablation.png").stat().st_size > 0
    assert "CIMQ: all four" in ablation.tables(csv_rows(out / "ablation.csv"))


def test_presets_smoke(out):
    rows = {row["preset"]: row for row in presets.main(_args(out))}
    assert rows["cimq"]["points_below_full"] == 0.0 and rows["cimq"]["fit_time_vs_full"] == 1.0  # its own baseline
    assert (rows["cimq_quick"]["calibration_images"], rows["cimq"]["calibration_images"]) == (256, 1024)  # the configs'
    assert rows["cimq_quick"]["steps_per_unit"] == rows["cimq"]["steps_per_unit"] == 1  # --smoke budget
    assert 0.3 < float(rows["cimq_quick"]["test/acc"]) <= 1.0
    assert len(csv_rows(out / "presets.csv")) == 2


def test_sweeps_smoke_reuses_the_ablation_and_k1_lowers_bit_density(ablation_rows, out):
    points = {(name, value): row for name, value, row in sweeps.main(_args(out))}
    base = points[("adc_bits", 4)]
    assert float(base["fit_seconds"]) == float(ablation_rows["cimq"]["fit_seconds"])  # reused from ablation.csv, not re-measured
    assert float(points[("max_ones", 1)]["test/bit_density"]) < float(base["test/bit_density"])
    assert float(points[("array", 64)]["test/energy_per_image_uj"]) != float(base["test/energy_per_image_uj"])
    assert (out / "pareto.png").stat().st_size > 0
    assert sweeps.pareto_front([(1.0, 0.5), (2.0, 0.4), (0.5, 0.3), (3.0, 0.9)]) == [(0.5, 0.3), (1.0, 0.5), (3.0, 0.9)]


def test_other_models_smoke(out):
    cifar100, resnet18 = other_models.main(["--smoke", "--out-dir", str(out), "--work-dir", str(out / "work")])
    assert cifar100["fp_acc"] == 0.6  # the README's FP row for the 100-image sample
    for row in (cifar100, resnet18):
        assert row["hw_efficiency_vs_baseline"] > 1.0 and row["cim_vs_fp_time"] > 1.0
        assert row["energy_per_image_uj"] < row["baseline_energy_per_image_uj"]
    assert resnet18["energy_per_image_uj"] > 10 * cifar100["energy_per_image_uj"]  # 224x224 ImageNet vs 32x32


def test_training_time_smoke(ablation_rows, out):
    rows = training_time.main(_args(out))
    ptq = next(r for r in rows if r["method"].startswith("PTQ"))
    assert float(ptq["seconds"]) == float(ablation_rows["cimq"]["fit_seconds"])
    qat = next(r for r in rows if r["method"].startswith("QAT"))
    assert qat["seconds_per_step"] > 0 and qat["epoch_4k_seconds"] == round(qat["seconds_per_step"] * 32)


def test_cim_layer_speed_smoke(out):
    rows = cim_layer_speed.main(["--smoke", "--out-dir", str(out)])
    assert len(rows) == len(cim_layer_speed.RESNET20_CONV_SHAPES)
    assert all(r["cycles"] == 4 and r["fwd_ratio"] > 0 for r in rows)
    assert len(csv_rows(out / "cim_layer_speed_cpu.csv")) == len(rows)


def test_suite_report_renders_every_table(ablation_rows, out):
    section = run_suite.render(out, iters=2)
    for title in ("Against the targets", "Ablation", "Sweeps", "CIFAR-100 and ImageNet", "PTQ and QAT wall time", "CIM layer speed"):
        assert title in section, title
    readme = out / "README.md"
    readme.write_text(f"head\n{run_suite.BEGIN}\nold\n{run_suite.END}\ntail\n")
    run_suite.update_readme(readme, section)
    text = readme.read_text()
    assert text.startswith("head\n") and text.endswith("tail\n") and "old" not in text and section in text


def test_gpu_check_dry_run_on_cpu(out):
    import gpu_check

    rows = gpu_check.main(["--device", "cpu", "--data", str(CIFAR10), "--weights", str(RESNET20), "--iters", "1",
                           "--calibration-size", "32", "--batch", "4", "--out-dir", str(out)])
    accuracy = next(r for r in rows if r["check"] == "PTQ test/acc")
    assert accuracy["cpu"] == accuracy["device"]  # the same device twice: the PTQ is deterministic
    assert all(r["ratio cpu/device"] != "" for r in rows if "fwd ms" in r["check"])


def test_export_check_smoke(out):
    row = export_check.main(_args(out))
    assert row["images"] == 100  # the 2 test batches of 50 the fake-quant model was tested on
    assert row["same_predictions"] == 100
    assert float(row["max_relative_logit_error"]) <= 1e-4
    assert row["export_test_acc"] == row["fake_quant_acc"]
    assert csv_rows(out / "export_check.csv")[0]["same_predictions"] == "100"


def _imported_by(statement: str, modules: tuple[str, ...]) -> list[str]:
    """Which of ``modules`` a fresh interpreter has imported after ``statement`` (run from the repository root)."""
    code = f"import json, sys; {statement}; print(json.dumps([m for m in {list(modules)!r} if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    return json.loads(out.stdout)


def test_startup_smoke_prints_a_table_of_ratios(capsys):
    rows = startup.main(["--repeats", "1"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header == list(startup.COLUMNS) and set(lines[1]) == {"|", "-"}
    table = {cells[0].strip("`"): [float(c) for c in cells[1:]]
             for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}
    assert list(table) == [label for label, _ in startup.COMMANDS] == [row["command"] for row in rows]
    assert all(value > 0 for values in table.values() for value in values)
    assert table["import torch"][2] == 1.0 and table["import lightning.pytorch"][3] == 1.0  # each baseline is 1x itself


def test_startup_import_leaves_wandb_export_and_plots_for_later():
    """`import cimq_pl` registers the models (timm) without W&B, the export package or matplotlib; the CLI module
    does not import W&B or the export package either (Lightning imports matplotlib through torchmetrics)."""
    heavy = ("wandb", "matplotlib", "cimq_pl.export", "lightning")
    assert _imported_by("import cimq_pl, timm; timm.create_model('cifar_resnet20')", heavy) == []
    assert _imported_by("import cimq_pl.quant", heavy) == []
    assert _imported_by("import cimq_pl.cli", ("wandb", "cimq_pl.export")) == []


def test_startup_timm_still_reaches_wandb_on_first_use():
    """timm's own `update_summary(log_wandb=True)` finds W&B: the stand-in imports it when first used."""
    code = "import cimq_pl, timm.utils.summary as s; import wandb; assert s.wandb.log is wandb.log"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


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
    frozen = derived_config(Setting("resnet20", "cimq", iters=400, lr_scale=1.0, lr_step=0.0))
    assert frozen["model"]["objective"]["init_args"]["lr_step"] == 0.0  # after lr_scale, which sets all three rates
    assert frozen["model"]["objective"]["init_args"]["lr_clip"] == pytest.approx(1e-3)


def test_other_models_cifar100_ptq_smoke_calibrates_on_cifar10_and_tests_on_the_sample(out):
    import other_models

    row = other_models.main([*_args(out), "--ptq"])[0]
    assert row["calibration"] == "cifar10_lossless train (64 images)" and row["test_images"] == 64
    assert row["iters"] == 2  # the smoke budget; the preset's own is the config's
    assert 0.45 < row["fp_acc"] < 0.75  # the pretrained ResNet-56 on the first 64 sample images (60% on all 100)
    assert row["ptq_acc"] > 0.2  # W4A4, ADC 4 after 2 steps per unit: far above chance (1%)
    assert 0 < row["bit_density"] < 0.5 and row["hw_efficiency_vs_baseline"] > 1
    assert (out / "cifar100_ptq.csv").is_file()


def test_low_adc_qat_smoke_runs_qat_from_the_ptq_checkpoint_and_reuses_its_row(out):
    import low_adc_qat

    args = ["--quick", "--adc-bits", "3", "--out-dir", str(out), "--work-dir", str(out / "work")]
    row = low_adc_qat.main(args)[0]
    assert (int(row["adc_bits"]), int(row["steps"]), row["train"]) == (3, 2, "lossless")
    assert 0.2 < row["ptq/acc"] <= 1  # ADC 3 after calibration and 1 step per unit: far above chance (10%)
    assert abs(row["qat/acc"] - row["ptq/acc"]) < 0.1  # two QAT steps at lr 1e-4 from that checkpoint
    assert (out / "work" / "low_adc_qat_quick" / "ptq-adc3-iters1.ckpt").is_file()
    again = low_adc_qat.main(args)[0]  # the CSV's row: nothing fitted again
    assert float(again["qat/acc"]) == row["qat/acc"] and len(csv_rows(out / "low_adc_qat_quick.csv")) == 1
