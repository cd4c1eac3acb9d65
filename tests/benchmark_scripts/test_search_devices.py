"""Smoke runs of the two longest benchmark scripts, the per-layer search and the device noise, kept apart from
the suite's other smoke runs so that the parallel test run (``pytest -n 2 --dist loadfile``) can put them on another worker.
"""

from __future__ import annotations

import sys

import pytest

from conftest import REPO, csv_rows

sys.path.insert(0, str(REPO / "benchmarks"))

import device_noise  # noqa: E402
import layer_search  # noqa: E402

pytestmark = pytest.mark.slow


def test_layer_search_quick(out):
    """The search at the energy of uniform ADC 4 and its PTQ beside uniform ADC 4's (1 step per unit, tiny data)."""
    rows = {row["point"]: row for row in layer_search.main(["--quick", "--budgets", "energy", "--out-dir", str(out),
                                                              "--work-dir", str(out / "work"),
                                                              "--assignments", "layer1.*=3"])}
    given = "given: layer1.*:3 (others ADC 4)"
    assert set(rows) == {"uniform", layer_search.LABELS["energy"], given}
    searched = rows[layer_search.LABELS["energy"]]
    assert len(searched["assignment"].split()) == 18  # every ResNet-20 layer on the 4-bit arrays (not the int8 edges)
    assert all(0 <= float(row["test/acc"]) <= 1 and float(row["test/energy_per_image_uj"]) > 0 for row in rows.values())
    # the six convs of layer1 at ADC 3 reached the fit: each conversion is a nanosecond shorter, so ~6% less energy
    ratio = float(rows[given]["test/energy_per_image_uj"]) / float(rows["uniform"]["test/energy_per_image_uj"])
    assert 0.88 < ratio < 0.97, ratio
    assert len(csv_rows(out / "layer_search.csv")) == 3 and (out / "layer_search.png").stat().st_size > 0


def test_device_noise_quick(out):
    """Conventional, CIMQ and noise-aware CIMQ PTQ (1 step per unit) tested on 24 images under every kind of device
    condition with 2 chips each; a second run reuses every row; a third calibrates CIMQ's chips only."""
    import torch

    rows = device_noise.main(["--quick", "--out-dir", str(out), "--work-dir", str(out / "work")])
    by = {(r["method"], r["condition"]): r for r in rows}
    assert {method for method, _ in by} == {"conventional", "cimq", "cimq_noise_aware"}
    assert {condition for _, condition in by} == {"ideal", "stuck0.01", "stuck0.01_compensated", "target", "drift",
                                                  "drift_compensated"}
    assert all(int(r["images"]) == 24 for r in rows)
    ideal, noisy = by["cimq", "ideal"], by["cimq", "target"]
    assert int(ideal["samples"]) == 1 and float(ideal["acc_std"]) == 0.0  # ideal cells: every chip is the same
    assert int(noisy["samples"]) == 2 and 0.0 <= float(noisy["acc_min"]) <= float(noisy["acc_max"]) <= 1.0
    for method in ("conventional", "cimq"):  # a year of drift: the compensation is what keeps the network alive
        assert float(by[method, "drift_compensated"]["acc_mean"]) > float(by[method, "drift"]["acc_mean"])
    # 1% stuck-at cells: programming the pair partners around them keeps CIMQ near its ideal-cell accuracy
    assert float(by["cimq", "stuck0.01"]["acc_mean"]) < float(by["cimq", "stuck0.01_compensated"]["acc_mean"])
    record = torch.load(out / "work" / "device_noise_quick" / "cimq_noise_aware-cimq15d-iters1.ckpt", weights_only=True)["cimq"]
    assert record["noise_aware"] is True and record["device"]["programming_sigma"] == 0.05
    assert list((out / "work").rglob("monte_carlo_test_summary.csv"))  # MonteCarloDevices' own files
    assert (out / "device_noise.png").stat().st_size > 0 and len(csv_rows(out / "device_noise-cimq15d-iters1.csv")) == len(rows)
    again = device_noise.main(["--quick", "--out-dir", str(out), "--work-dir", str(out / "work")])
    assert sorted(r["key"] for r in again) == sorted(r["key"] for r in rows)
    # CIMQ's chips calibrated on 16 images: its fitted network is reused, only the calibrated variant is tested
    calibrated = {(r["method"], r["condition"]): r for r in device_noise.main(
        ["--quick", "--methods", "cimq", "--calibrate-chips", "16", "--conditions", "ideal,target", "--out-dir",
         str(out), "--work-dir", str(out / "work")])}
    assert {method for method, _ in calibrated} == {"cimq", "cimq+cal16"}
    # ideal cells: every correction is the identity, the same accuracy
    assert float(calibrated["cimq+cal16", "ideal"]["acc_mean"]) == float(by["cimq", "ideal"]["acc_mean"])
    assert int(calibrated["cimq+cal16", "target"]["samples"]) == 2
    with pytest.raises(SystemExit):  # QAT alone needs the noise-aware PTQ checkpoint of an earlier run
        device_noise.main(["--quick", "--methods", "cimq_qat_noise_aware", "--out-dir", str(out), "--work-dir",
                           str(out / "fresh")])
    with pytest.raises(SystemExit):
        device_noise.main(["--quick", "--methods", "cimq,nope", "--out-dir", str(out)])
