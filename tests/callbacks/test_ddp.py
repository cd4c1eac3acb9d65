"""PTQ, and the low-ADC QAT recipe, under real Lightning DDP (2 CPU processes, gloo) agree with one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).parents[1] / "ddp_ptq_script.py"  # a helper beside conftest.py


def _run(out: Path, devices: int, iters: int, *mode: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, str(SCRIPT), str(out), str(devices), str(iters), *mode],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def _load(out: Path, tag: str, devices: int, rank: int) -> dict:
    return torch.load(out / f"{tag}_devices{devices}_rank{rank}.pt", weights_only=True)


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        for name, tensor in a[key].items():
            if torch.is_tensor(tensor):
                assert torch.equal(tensor, b[key][name]), f"{key}.{name}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    _run(out, 1, 2)
    _run(out, 2, 2)
    return out


def test_calibration_is_identical_on_every_rank_and_equal_to_one_process(runs):
    one = _load(runs, "calibrated", 1, 0)["quantizers"]
    rank0, rank1 = (_load(runs, "calibrated", 2, r)["quantizers"] for r in (0, 1))
    _assert_same(rank0, rank1)
    _assert_same(one, rank0)


def test_every_rank_holds_identical_quantizers_after_each_block(runs):
    for block in range(11):  # ResNet-20: conv1, 9 residual blocks, fc
        rank0, rank1 = (_load(runs, f"block{block}", 2, r)["quantizers"] for r in (0, 1))
        _assert_same(rank0, rank1)


def test_reconstruction_keeps_ranks_identical_and_accuracy_close_to_one_process(runs):
    rank0, rank1 = (_load(runs, "final", 2, r) for r in (0, 1))
    _assert_same(rank0["quantizers"], rank1["quantizers"])
    _assert_same(rank0["offsets"], rank1["offsets"])  # the output offsets after the ADC (lr_offset) learn in step
    offsets = rank0["offsets"]["output_offset"]
    assert len(offsets) == 20 and all(offset.abs().max() > 0 for offset in offsets.values())
    one = _load(runs, "final", 1, 0)
    assert rank0["val_acc"] == rank1["val_acc"]
    print(f"val/acc on 100 images: 2 processes {rank0['val_acc']}, one process {one['val_acc']}")
    # 100 images, different data order: within noise, 0.05 apart at most (plus float32 rounding: the accuracies are
    # float32, so 0.72 - 0.67 is 0.0500000119)
    assert abs(rank0["val_acc"] - one["val_acc"]) <= 0.05 + 1e-6


@pytest.fixture(scope="module")
def qat_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_qat")
    _run(out, 2, 2, "qat")
    return out


def test_low_adc_qat_recipe_keeps_ranks_identical_and_learns_only_the_quantizers(qat_runs):
    """`QuantizerDistillation` under plain ``ddp`` (its frozen weights are frozen before DDP wraps the model, so no
    rank waits for their gradients): two steps keep both ranks' quantizers equal, move the input steps and ADC
    clips, and leave every weight as calibrated."""
    start, rank0, rank1 = (_load(qat_runs, tag, 2, r) for tag, r in (("qat_calibrated", 0), ("qat_final", 0),
                                                                      ("qat_final", 1)))
    _assert_same(rank0["quantizers"], rank1["quantizers"])
    _assert_same({"weights": rank0["weights"]}, {"weights": rank1["weights"]})
    _assert_same({"weights": start["weights"]}, {"weights": rank0["weights"]})  # frozen: as calibrated
    before = start["quantizers"]
    moved = [key for key, state in rank0["quantizers"].items()
             if any(torch.is_tensor(t) and not torch.equal(t, before[key][name]) for name, t in state.items())]
    assert any(key.endswith(".input") for key in moved) and any(key.endswith(".psum") for key in moved)
    assert not any(key.endswith(".weight") for key in moved)
