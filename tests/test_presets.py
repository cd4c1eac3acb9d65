"""The preset variants stay the preset but for what they are for."""

from __future__ import annotations

import yaml

from conftest import REPO


def _callbacks(config: dict) -> dict:
    return {callback["class_path"].rsplit(".", 1)[-1]: callback.get("init_args", {})
            for callback in config["trainer"]["callbacks"]}


def test_the_density_preset_is_the_cpu_preset_with_the_sparsity_regulariser_at_lambda_1():
    preset = yaml.safe_load((REPO / "configs/quant/cimq_ptq.yaml").read_text())
    sparse = yaml.safe_load((REPO / "configs/quant/cimq_ptq_sparse.yaml").read_text())
    assert _callbacks(preset)["BitSparseActivations"]["sparsity_weight"] == 0.0
    assert _callbacks(sparse)["BitSparseActivations"]["sparsity_weight"] == 1.0
    _callbacks(sparse)["BitSparseActivations"]["sparsity_weight"] = 0.0  # (the same dict as in ``sparse``)
    assert sparse == preset  # nothing else differs
