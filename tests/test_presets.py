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


def test_the_low_adc_qat_recipe_is_the_qat_config_but_for_its_objective_budget_and_regulariser():
    """`low_adc_qat.yaml`: `cimq_qat.yaml` at ADC 3 with `QuantizerDistillation` at the PTQ preset's rates, 300
    steps compiled, and no bit-sparsity regulariser; the macro and every technique setting as the PTQ presets."""
    qat = yaml.safe_load((REPO / "configs/quant/cimq_qat.yaml").read_text())
    recipe = yaml.safe_load((REPO / "configs/quant/low_adc_qat.yaml").read_text())
    ptq = yaml.safe_load((REPO / "configs/quant/cimq_ptq.yaml").read_text())
    objective = recipe["model"].pop("objective")
    assert objective == {"class_path": "cimq_pl.objectives.QuantizerDistillation",
                         "init_args": {"temperature": 1.0, "lr_step": ptq["model"]["objective"]["init_args"]["lr_step"],
                                       "lr_clip": ptq["model"]["objective"]["init_args"]["lr_clip"]}}
    assert recipe["model"].pop("cim") == {**qat["model"].pop("cim"), "adc_bits": 3}
    assert recipe["model"] == {"simulation": "compiled"}
    assert (recipe["trainer"]["max_epochs"], recipe["trainer"]["max_steps"]) == (-1, 300)
    assert _callbacks(recipe)["BitSparseActivations"]["sparsity_weight"] == 0.0
    for name, args in _callbacks(recipe).items():
        if name != "BitSparseActivations":
            assert args == _callbacks(qat)[name], name
    assert ({**_callbacks(recipe)["BitSparseActivations"], "sparsity_weight": 0.01}
            == _callbacks(qat)["BitSparseActivations"])
    assert [c["class_path"] for c in recipe["trainer"]["callbacks"]] == [c["class_path"] for c in qat["trainer"]["callbacks"]]
