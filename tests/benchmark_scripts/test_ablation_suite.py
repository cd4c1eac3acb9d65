"""Smoke runs of the benchmark suite's scripts (``--smoke``: tiny data, 2 steps per unit), with checks on their numbers.

They keep the suite working (`python benchmarks/run_suite.py` regenerates the README's tables); the numbers
they produce on 50 test images are not results, but some of them are exact properties worth asserting. The smoke
runs are spread over the files of this folder so that ``pytest -n 2 --dist loadfile --no-loadscope-reorder``
can balance them; the folder sorts first, so these longest files start first.
"""

from __future__ import annotations

import sys

import pytest

from conftest import REPO, csv_rows

sys.path.insert(0, str(REPO / "benchmarks"))

import ablation  # noqa: E402
import cim_layer_speed  # noqa: E402
import network_speed  # noqa: E402
import other_models  # noqa: E402
import presets  # noqa: E402
import run_suite  # noqa: E402
import sweeps  # noqa: E402
import training_time  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ablation_rows(smoke_args):
    return {row["row"]: row for row in ablation.main(smoke_args)}


def test_ablation_smoke(ablation_rows, out):
    assert set(ablation_rows) == {"fp", "conventional", "cimq"}
    assert 0.8 <= float(ablation_rows["fp"]["test/acc"]) <= 1.0  # 50 lossless test images, FP 0.915 on 1,000
    assert 0.5 <= float(ablation_rows["fp"]["jpeg/acc"]) < float(ablation_rows["fp"]["test/acc"])
    # conventional with an 8-bit ADC is the baseline itself (same calibration images): efficiency exactly 1
    assert float(ablation_rows["conventional"]["test/hw_efficiency_vs_baseline"]) == 1.0
    assert float(ablation_rows["cimq"]["test/hw_efficiency_vs_baseline"]) > 1.0  # a 4-bit ADC costs less
    assert 0.3 < float(ablation_rows["cimq"]["test/acc"]) <= 1.0
    assert len(csv_rows(out / "ablation.csv")) == 3 and (out / "ablation.png").stat().st_size > 0
    assert "CIMQ: all four" in ablation.tables(csv_rows(out / "ablation.csv"))


def test_presets_smoke(out, smoke_args):
    rows = {row["preset"]: row for row in presets.main(smoke_args)}
    assert rows["cimq"]["points_below_full"] == 0.0 and rows["cimq"]["fit_time_vs_full"] == 1.0  # its own baseline
    assert (rows["cimq_quick"]["calibration_images"], rows["cimq"]["calibration_images"]) == (256, 1024)  # the configs'
    assert rows["cimq_quick"]["steps_per_unit"] == rows["cimq"]["steps_per_unit"] == 1  # --smoke budget
    assert 0.3 < float(rows["cimq_quick"]["test/acc"]) <= 1.0
    assert len(csv_rows(out / "presets.csv")) == 2


def test_sweeps_smoke_reuses_the_ablation_and_k1_lowers_bit_density(ablation_rows, out, smoke_args):
    points = {(name, value): row for name, value, row in sweeps.main(smoke_args)}
    base = points[("adc_bits", 4)]
    assert float(base["fit_seconds"]) == float(ablation_rows["cimq"]["fit_seconds"])  # reused from ablation.csv, not re-measured
    assert float(points[("max_ones", 1)]["test/bit_density"]) < float(base["test/bit_density"])
    assert float(points[("array", 64)]["test/energy_per_image_uj"]) != float(base["test/energy_per_image_uj"])
    assert (out / "pareto.png").stat().st_size > 0
    assert sweeps.pareto_front([(1.0, 0.5), (2.0, 0.4), (0.5, 0.3), (3.0, 0.9)]) == [(0.5, 0.3), (1.0, 0.5), (3.0, 0.9)]


def test_other_models_smoke(smoke_args):
    cifar100, resnet18 = other_models.main(smoke_args)
    assert cifar100["fp_acc"] == 0.6  # the README's FP row for the 100-image sample
    for row in (cifar100, resnet18):
        assert row["hw_efficiency_vs_baseline"] > 1.0 and row["cim_vs_fp_time"] > 1.0
        assert row["energy_per_image_uj"] < row["baseline_energy_per_image_uj"]
    assert resnet18["energy_per_image_uj"] > 10 * cifar100["energy_per_image_uj"]  # 224x224 ImageNet vs 32x32


def test_training_time_smoke(ablation_rows, smoke_args):
    rows = training_time.main(smoke_args)
    ptq = next(r for r in rows if r["method"].startswith("PTQ"))
    assert float(ptq["seconds"]) == float(ablation_rows["cimq"]["fit_seconds"])
    qat = next(r for r in rows if r["method"].startswith("QAT"))
    assert qat["method"] == "QAT (cimq_qat.yaml, batch 16)"  # the smoke run's batch; the config's is 128
    assert qat["seconds_per_step"] > 0 and qat["epoch_4k_seconds"] == round(qat["seconds_per_step"] * 250)


def test_cim_layer_speed_smoke(out):
    rows = cim_layer_speed.main(["--smoke", "--out-dir", str(out)])
    assert len(rows) == len(cim_layer_speed.RESNET20_CONV_SHAPES)
    assert all(r["cycles"] == 4 and r["fwd_ratio"] > 0 for r in rows)
    assert len(csv_rows(out / "cim_layer_speed_cpu.csv")) == len(rows)


def test_network_speed_smoke_counts_no_host_syncs_and_refuses_cuda_graphs_on_the_cpu(out, capsys):
    """The CIM paths' evaluation and reconstruction blocks read no tensor value on the host (what CUDA graphs need,
    `HostSyncCounter`); ``--paths graphed`` names the device it needs."""
    rows = network_speed.main(["--smoke", "--out-dir", str(out)])
    assert [r["path"] for r in rows] == ["fp", "eager"]
    eager = rows[1]
    assert eager["eval_host_syncs"] == 0 and eager["ptq_host_syncs"] == 0 and eager["units"] == 11
    assert eager["eval_img_per_s"] > 0 and eager["ptq_step_s"] > 0
    assert len(csv_rows(out / "network_speed_cpu.csv")) == 2
    with pytest.raises(SystemExit):
        network_speed.main(["--paths", "eager,graphed", "--out-dir", str(out)])
    assert "--paths graphed records CUDA graphs: it needs --device cuda (got --device cpu)" in capsys.readouterr().err


def test_suite_report_renders_every_table(ablation_rows, out):
    section = run_suite.render(out, iters=2)
    for title in ("Against the targets", "Ablation", "Sweeps", "CIFAR-100 and ImageNet", "PTQ and QAT wall time", "CIM layer speed"):
        assert title in section, title
    readme = out / "README.md"
    readme.write_text(f"head\n{run_suite.BEGIN}\nold\n{run_suite.END}\ntail\n")
    run_suite.update_readme(readme, section)
    text = readme.read_text()
    assert text.startswith("head\n") and text.endswith("tail\n") and "old" not in text and section in text
