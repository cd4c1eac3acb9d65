"""PTQ and QAT as ordinary trainer fits, through the CLI and the Trainer, on real weights and images."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from cimq_pl.callbacks import (
    ArraywiseWeights,
    BitSparseActivations,
    PartialSumClipping,
    PostTrainingQuantization,
    QuantDropping,
    QuantizationAwareTraining,
)
from cimq_pl.callbacks.calibration import calibration_images, quantizer_state
from cimq_pl.datamodules import CIFAR10DataModule
from cimq_pl.errors import ConfigError
from cimq_pl.module import CIMQModule
from cimq_pl.objectives import BlockReconstruction
from cimq_pl.quant import CIMSpec, cim_layers, iter_quantizers
from cimq_pl.trainer import CIMQTrainer
from conftest import CIFAR10, RESNET20

# 32 calibration images, 2 evaluation batches of 50 test images, no DataLoader worker processes: sized for CI
FAST = ["--data.init_args.calibration_size", "32", "--data.init_args.eval_batch_size", "50",
        "--data.init_args.num_workers", "0", "--trainer.limit_val_batches", "2", "--trainer.limit_test_batches", "2"]


class QuantizerSnapshots(Callback):
    """Records the quantizer state after calibration and at the end of training."""

    @staticmethod
    def _tensors(pl_module) -> dict:
        return {k: {n: t.clone() for n, t in v.items() if torch.is_tensor(t)} for k, v in quantizer_state(pl_module.model).items()}

    def on_train_start(self, trainer, pl_module):
        self.calibrated = self._tensors(pl_module)
        self.weights = {n: p.detach().clone() for n, p in pl_module.model.named_parameters() if n.endswith("weight")}

    def on_train_end(self, trainer, pl_module):
        self.final = self._tensors(pl_module)


class StepLosses(Callback):
    """The ``ptq/rec_loss`` the trainer holds after every training step, and the step's returned loss."""

    def __init__(self):
        self.losses, self.returned = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        value = trainer.callback_metrics.get("ptq/rec_loss")
        self.losses.append(None if value is None else float(value))
        self.returned.append(float(outputs["loss"]))


def _trainer(tmp_path, callbacks, trainer_class=CIMQTrainer, **kwargs):
    kwargs.setdefault("max_epochs", 1)
    return trainer_class(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, default_root_dir=tmp_path,
                         enable_model_summary=False, callbacks=callbacks, **kwargs)


def _datamodule():
    return CIFAR10DataModule(root=str(CIFAR10), num_workers=0, calibration_size=32, eval_batch_size=50)


def test_ptq_learns_only_the_current_block_quantizers(tmp_path):
    snapshots = QuantizerSnapshots()
    ptq = PostTrainingQuantization()
    module = CIMQModule("cifar_resnet20", 10, str(RESNET20), cim=CIMSpec(),
                        objective=BlockReconstruction(iters_per_block=3, batch_size=16))
    callbacks = [BitSparseActivations(max_ones=2, sparsity_weight=0.01), ArraywiseWeights(), PartialSumClipping(),
                 QuantDropping(0.5), ptq, snapshots, steps := StepLosses()]
    trainer = _trainer(tmp_path, callbacks, limit_val_batches=1, log_every_n_steps=1)
    trainer.fit(module, datamodule=_datamodule())
    assert trainer.current_epoch == 1 and trainer.global_step == 11 * 3  # one epoch: 11 units of 3 steps
    for key, before in snapshots.calibrated.items():
        after = snapshots.final[key]
        if key.endswith(".weight"):
            assert torch.equal(before["step"], after["step"]), key  # weight steps stay calibrated
            assert not torch.equal(before["rounding_logits"], after["rounding_logits"]), key  # AdaRound learns
        elif key.endswith(".input"):
            assert not torch.equal(before["step"], after["step"]), key  # activation step sizes learn
        else:
            assert not torch.equal(before["theta"], after["theta"]), key  # ADC clips learn
            assert torch.equal(before["alpha0"], after["alpha0"]), key
    for name, weight in snapshots.weights.items():
        assert torch.equal(weight, dict(module.model.named_parameters())[name]), name  # weights frozen
    assert all(layer.weight_quantizer.hard for _, layer in cim_layers(module.model))
    assert module.objective.block_input_keep_prob == 0.5
    logged = trainer.logged_metrics
    assert "ptq/layer3.2/psum_clip_rate" in logged and 0 < logged["ptq/layer3.2/bit_density"] < 0.5
    for unit, (name, _) in enumerate(module.objective.blocks):  # each unit's mean reconstruction loss
        assert float(logged[f"ptq/{name}/rec_loss"]) == pytest.approx(sum(steps.losses[3 * unit:3 * unit + 3]) / 3, rel=1e-6)
    assert Path(ptq.checkpoint_path).is_file()


class UnitsOfSteps(Callback):
    """The reconstruction unit the objective trained at every training step, and the input steps' learning rate."""

    def __init__(self):
        self.units, self.step_rates = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        group = next(g for g in trainer.optimizers[0].param_groups if g["name"] == "step")
        self.step_rates.append(group["lr"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.units.append(pl_module.objective.current)


def test_units_with_their_own_steps_run_them_in_the_fit(tmp_path):
    """``unit_iters``: layer2's blocks 3 steps and the classifier 2, the other units 1; each unit is finished
    (AdaRound hardened) when its own steps end. ``unit_learning_rates``: layer2's input steps learn at 1e-5 instead
    of 4e-5; every unit's first step runs at its full rate and step s of n at the cosine factor (1 + cos(pi s / n)) / 2."""
    module = CIMQModule("cifar_resnet20", 10, str(RESNET20), cim=CIMSpec(),
                        objective=BlockReconstruction(iters_per_block=1, batch_size=8, lr_step=4e-5,
                                                      unit_iters={"layer2.*": 3, "fc": 2},
                                                      unit_learning_rates={"layer2.*": {"lr_step": 1e-5}}))
    trainer = _trainer(tmp_path, [PostTrainingQuantization(), units := UnitsOfSteps()], limit_val_batches=1)
    trainer.fit(module, datamodule=_datamodule())
    counts = [units.units.count(unit) for unit in range(11)]
    assert counts == [1, 1, 1, 1, 3, 3, 3, 1, 1, 1, 2] and units.units == sorted(units.units)
    assert trainer.global_step == 18
    assert all(layer.weight_quantizer.hard for _, layer in cim_layers(module.model))
    layer2 = [1e-5, 0.75e-5, 0.25e-5]  # 3 steps: factors 1, 0.75, 0.25
    assert units.step_rates == pytest.approx([4e-5] * 4 + layer2 * 3 + [4e-5] * 3 + [4e-5, 2e-5])


class UnitKeeps(Callback):
    """At every training step: the QDrop keep probability of the unit input and of the current unit's first layer."""

    def __init__(self):
        self.inputs, self.layers = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        objective = pl_module.objective
        self.inputs.append(objective.unit_block_input_keep_prob)
        first = next(layer for _, layer in cim_layers(objective.block[1]))
        self.layers.append(first.input_quantizer.keep_prob)


def test_units_with_their_own_keep_probability_drop_with_it_in_the_fit(tmp_path):
    """``unit_keep_prob``: layer2's units drop their input and their layers' inputs with p = 0.75 while they learn,
    every other unit with QuantDropping's 0.5; afterwards every layer is back at 0.5. Without QuantDropping the fit
    is refused."""
    objective = BlockReconstruction(iters_per_block=1, batch_size=8, unit_keep_prob={"layer2.*": 0.75})
    module = CIMQModule("cifar_resnet20", 10, str(RESNET20), cim=CIMSpec(), objective=objective)
    trainer = _trainer(tmp_path, [QuantDropping(), PostTrainingQuantization(), keeps := UnitKeeps()],
                       limit_val_batches=0)
    trainer.fit(module, datamodule=_datamodule())
    assert keeps.inputs == [0.5] * 4 + [0.75] * 3 + [0.5] * 4
    assert keeps.layers == [0.5] * 4 + [0.75] * 3 + [0.5] * 4  # CIMSpec(): the edge layers on the arrays too
    assert {layer.options.input_keep_prob for _, layer in cim_layers(module.model)} == {0.5}
    module = CIMQModule("cifar_resnet20", 10, str(RESNET20), cim=CIMSpec(), objective=BlockReconstruction(
        iters_per_block=1, unit_keep_prob={"layer2.*": 0.75}))
    with pytest.raises(ConfigError, match="unit_keep_prob=.* but no QuantDropping was applied"):
        _trainer(tmp_path, [PostTrainingQuantization()]).fit(module, datamodule=_datamodule())


def test_ptq_step_metrics_are_logged_on_the_loggers_steps_only(tmp_path):
    """With ``log_every_n_steps=3`` the step's reconstruction loss is logged on steps 3, 6, ... (the ones the
    loggers get) and holds there in between; the unit means still count every step."""
    module = CIMQModule("cifar_resnet20", 10, str(RESNET20), cim=CIMSpec(),
                        objective=BlockReconstruction(iters_per_block=2, batch_size=8, rounding_weight=0.0))
    steps = StepLosses()
    trainer = _trainer(tmp_path, [ArraywiseWeights(), PostTrainingQuantization(), steps], limit_val_batches=0,
                       log_every_n_steps=3)
    trainer.fit(module, datamodule=_datamodule())
    assert len(steps.returned) == 22  # 11 units x 2 steps; no regulariser: the returned loss is the reconstruction
    shown = None
    for batch_idx, (logged, returned) in enumerate(zip(steps.losses, steps.returned)):
        if (batch_idx + 1) % 3 == 0:
            shown = returned
        assert logged == (None if shown is None else pytest.approx(shown, rel=1e-6)), batch_idx
    for unit, (name, _) in enumerate(module.objective.blocks):
        mean = sum(steps.returned[2 * unit:2 * unit + 2]) / 2
        assert float(trainer.logged_metrics[f"ptq/{name}/rec_loss"]) == pytest.approx(mean, rel=1e-6), name


def test_unit_statistics_from_the_cached_unit_inputs_equal_a_forward_through_the_network(tmp_path):
    """The clip rate and bit density PTQ logs after each unit come from the unit alone on its cached inputs; the
    reference inputs come from a forward of every unit before it on the same calibration images."""
    from cimq_pl.callbacks.ptq import block_statistics
    from cimq_pl.quant.reconstruction import capture_block_input, eval_mode

    ptq = PostTrainingQuantization()
    module = CIMQModule("cifar_resnet20", 10, str(RESNET20), cim=CIMSpec(adc_bits=3),
                        objective=BlockReconstruction(iters_per_block=1, batch_size=8))
    trainer = _trainer(tmp_path, [PartialSumClipping(), ptq], limit_val_batches=0)
    trainer.fit(module, datamodule=_datamodule())
    objective = module.objective
    for index in (0, 4, 7, 10):  # the stem, a block of each stage (a stride-2 one among them), the classifier
        objective.start_unit(index)
        objective.cache_block_io(module.model, ptq._calibration_images)
        name, block = objective.blocks[index]
        with torch.no_grad(), eval_mode(module.model):
            through = capture_block_input(module.model, block, ptq._calibration_images[:8])
        assert torch.equal(objective.cache[2][:8], through), name
        cached = block_statistics(name, block, objective.cache[2][:8])
        assert cached == block_statistics(name, block, through) and 0 < cached[f"ptq/{name}/bit_density"] < 1, name
        assert float(trainer.logged_metrics[f"ptq/{name}/bit_density"]) == pytest.approx(cached[f"ptq/{name}/bit_density"])


class QuantizerModes(Callback):
    """The quantizers in the wrong train/eval mode: eval in a training step, training in a validation step."""

    def __init__(self):
        self.eval_in_training, self.training_in_validation, self.edge_input_drops = set(), set(), []
        self.validation_batches = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.eval_in_training |= {f"{n}.{r}" for n, r, q in iter_quantizers(pl_module.model) if not q.training}
        self.edge_input_drops.append(pl_module.model.conv1.input_quantizer.dropping)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.validation_batches += 1
        self.training_in_validation |= {f"{n}.{r}" for n, r, q in iter_quantizers(pl_module.model) if q.training}


def test_every_quantizer_trains_in_a_fit_and_the_int8_edge_inputs_drop(tmp_path):
    """The network is built in eval mode and Lightning keeps modes, so without the module's switch the quantizers
    no technique rebuilt (here the ``int8`` edge layers' inputs, whose ``keep_prob`` `QuantDropping` sets in
    place) stayed in eval mode and never dropped."""
    modes = QuantizerModes()
    module = CIMQModule("cifar_resnet20", 10, str(RESNET20), cim=CIMSpec(first_layer="int8", last_layer="int8"),
                        objective=BlockReconstruction(iters_per_block=2, batch_size=8))
    callbacks = [ArraywiseWeights(), PartialSumClipping(), QuantDropping(0.5, int8_layers=True), PostTrainingQuantization(),
                 modes]
    trainer = _trainer(tmp_path, callbacks, limit_val_batches=1, val_check_interval=11, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=CIFAR10DataModule(root=str(CIFAR10), num_workers=0, calibration_size=64,
                                                     eval_batch_size=16))  # validations at steps 11 and 22
    assert module.model.conv1.input_quantizer.keep_prob == module.model.fc.input_quantizer.keep_prob == 0.5
    assert len(modes.edge_input_drops) == 22 and all(modes.edge_input_drops)
    assert modes.eval_in_training == set()
    assert modes.validation_batches == 2 and modes.training_in_validation == set()  # and restored after the first


def test_ptq_learns_output_offsets_after_the_adc_and_qat_takes_them_into_the_biases(tmp_path):
    """``lr_offset``: every layer with an ADC learns its output offset (the ``int8`` edges, ideal ADC, get none); the
    weights and biases, and so the float network, stay as they were; QAT's ``init_from`` adds the offsets to the
    biases and computes what the PTQ network computes."""
    import copy

    from cimq_pl.callbacks.qat import load_ptq_checkpoint_
    from cimq_pl.quant.techniques import reconfigure_

    ptq = PostTrainingQuantization()
    module = CIMQModule("cifar_resnet20", 10, str(RESNET20), cim=CIMSpec(adc_bits=3, first_layer="int8", last_layer="int8"),
                        objective=BlockReconstruction(iters_per_block=2, batch_size=8, lr_offset=1e-2))
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    trainer = _trainer(tmp_path, [ArraywiseWeights(), PartialSumClipping(), ptq], limit_val_batches=0)
    trainer.fit(module, datamodule=_datamodule())
    layers = dict(cim_layers(module.model))
    assert layers["conv1"].output_offset is None and layers["fc"].output_offset is None
    offsets = {name: layer.output_offset for name, layer in layers.items() if name not in ("conv1", "fc")}
    assert len(offsets) == 18 and all(offset is not None and offset.abs().max() > 0 for offset in offsets.values())
    for name, value in dict(module.model.named_parameters()).items():
        if name in before and name.endswith(("weight", "bias")):
            assert torch.equal(value, before[name]), name
    state = torch.load(ptq.checkpoint_path, map_location="cpu", weights_only=False)["state_dict"]
    assert torch.equal(state["model.layer2.0.conv1.output_offset"], offsets["layer2.0.conv1"])
    qat = copy.deepcopy(module)  # the same network, as QAT builds it: no AdaRound logits, no offsets
    reconfigure_(qat.model, weight_rounding="nearest")
    for layer in dict(cim_layers(qat.model)).values():
        layer.output_offset = None
    load_ptq_checkpoint_(qat, ptq.checkpoint_path)
    qat_layer = dict(cim_layers(qat.model))["layer2.0.conv1"]
    assert torch.equal(qat_layer.bias, before["layer2.0.conv1.bias"] + offsets["layer2.0.conv1"])
    images = calibration_images(trainer.datamodule, torch.device("cpu"))[:4]
    module.eval(), qat.eval()
    with torch.no_grad():
        torch.testing.assert_close(qat(images), module(images), rtol=1e-5, atol=1e-5)


def test_qat_trains_weights_and_quantizers_with_sparsity_penalty(tmp_path):
    snapshots = QuantizerSnapshots()
    module = CIMQModule("cifar_resnet20", 10, str(RESNET20), cim=CIMSpec(), lr=1e-3)
    callbacks = [BitSparseActivations(max_ones=2, sparsity_weight=0.05), PartialSumClipping(), QuantizationAwareTraining(), snapshots]
    trainer = _trainer(tmp_path, callbacks, max_steps=2, limit_val_batches=1, num_sanity_val_steps=0)
    dm = _datamodule()
    dm.batch_size = 16
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 2
    assert trainer.logged_metrics["train/sparsity_penalty"] > 0
    changed = [n for n, w in snapshots.weights.items() if not torch.equal(w, dict(module.model.named_parameters())[n])]
    assert len(changed) == len(snapshots.weights)
    key = "layer2.1.conv1.weight"
    assert not torch.equal(snapshots.calibrated[key]["step"], snapshots.final[key]["step"])


def test_cli_cimq_ptq_then_test_with_its_checkpoint(run_cli, tmp_path):
    fit = run_cli("fit", "--config", "configs/resnet20_cifar10.yaml", "--config", "configs/quant/cimq_ptq.yaml",
                  "--data.root", str(CIFAR10), "--model.pretrained", str(RESNET20), *FAST,
                  "--model.objective.init_args.iters_per_block", "2", "--model.objective.init_args.batch_size", "16")
    ptq = next(cb for cb in fit.trainer.callbacks if isinstance(cb, PostTrainingQuantization))
    val_acc = fit.trainer.callback_metrics["val/acc"].item()
    test = run_cli("test", "--config", "configs/resnet20_cifar10.yaml", "--config", "configs/quant/cimq_ptq.yaml",
                   "--data.root", str(CIFAR10), "--model.pretrained", str(RESNET20), *FAST,
                   "--ckpt_path", str(ptq.checkpoint_path))
    # validation and test read the same 100 test images: the reloaded model must score exactly the same
    assert test.trainer.callback_metrics["test/acc"].item() == pytest.approx(val_acc, abs=1e-6)
    assert val_acc > 0.5  # W4A4 with a 4-bit ADC after a 2-step-per-block PTQ; FP is 0.915 on these images


def test_cli_test_of_uncalibrated_cim_model_is_refused(tmp_path, capsys, monkeypatch):
    from cimq_pl.cli import main
    from conftest import REPO

    monkeypatch.chdir(REPO)
    monkeypatch.setattr("sys.argv", ["cimq_pl"])
    with pytest.raises(SystemExit) as exit_info:
        main(["test", "--config", "configs/resnet20_cifar10.yaml", "--config", "configs/quant/conventional.yaml",
              "--data.root", str(CIFAR10), "--trainer.logger.init_args.save_dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "quantizers are not calibrated; run `fit`" in capsys.readouterr().err


def test_user_example_cifar100_config_runs_cimq_ptq(run_cli, tmp_path):
    """`fit --config configs/resnet_cifar100.yaml` as written (all four techniques + PTQ), on a tiny budget.

    Plumbing check only: ../shared holds no CIFAR-100 train split, so the 100 sample images serve as both
    the calibration ("train") and the evaluated split here; no accuracy claim is made from it.
    """
    import numpy as np

    from conftest import CIFAR100_SAMPLE

    sample = np.load(CIFAR100_SAMPLE)
    both = tmp_path / "cifar100_both.npz"
    np.savez(both, train_images=sample["images"], train_labels=sample["labels"],
             test_images=sample["images"], test_labels=sample["labels"], classes=sample["classes"])
    fit = run_cli("fit", "--config", "configs/resnet_cifar100.yaml", "--data.root", str(both),
                  "--data.init_args.calibration_size", "32", "--data.init_args.eval_batch_size", "25",
                  "--data.init_args.num_workers", "0", "--trainer.limit_val_batches", "2",
                  "--model.objective.init_args.iters_per_block", "1", "--model.objective.init_args.batch_size", "8")
    names = [type(cb).__name__ for cb in fit.trainer.callbacks]
    for expected in ("BitSparseActivations", "ArraywiseWeights", "PartialSumClipping", "QuantDropping", "PostTrainingQuantization"):
        assert expected in names
    assert len(fit.model.objective.blocks) == 29 and fit.trainer.global_step == 29  # stem + 27 blocks + fc, 1 step each
    assert 0.0 <= fit.trainer.callback_metrics["val/acc"].item() <= 1.0


@pytest.mark.parametrize(
    "config,check",
    [
        ("arraywise", lambda layer: layer.weight_quantizer.granularity == "array_channel"
         and layer.weight_quantizer.step.numel() == 3 * 32),  # 3 row blocks x 32 columns
        ("bit_sparse", lambda layer: layer.input_quantizer.max_ones == 1),
        ("psum_clipping", lambda layer: layer.psum_quantizer.granularity == "column" and layer.options.psum_observer == "mse"),
        ("qdrop", lambda layer: layer.input_quantizer.keep_prob == 0.5 and layer.weight_quantizer.hard),
    ],
)
def test_cli_each_technique_alone(run_cli, config, check):
    """Each ablation config (conventional + one technique) through the CLI: the technique reaches the model."""
    fit = run_cli("fit", "--config", "configs/resnet20_cifar10.yaml", "--config", f"configs/quant/ablation/{config}.yaml",
                  "--data.root", str(CIFAR10), "--model.pretrained", str(RESNET20), *FAST,
                  "--model.objective.init_args.iters_per_block", "1" if config == "qdrop" else "0",
                  "--model.objective.init_args.batch_size", "8")
    layer = dict(cim_layers(fit.model.model))["layer2.1.conv1"]  # 288 rows: 3 arrays
    assert fit.model.quantizers_initialized() and check(layer)
    ptq = next(cb for cb in fit.trainer.callbacks if isinstance(cb, PostTrainingQuantization))
    assert Path(ptq.checkpoint_path).is_file()
    assert fit.trainer.global_step == (11 if config == "qdrop" else 0)  # calibration only: no training step
    others = {"arraywise": layer.weight_quantizer.granularity == "layer", "bit_sparse": layer.input_quantizer.max_ones is None,
              "psum_clipping": layer.psum_quantizer.granularity == "layer", "qdrop": layer.input_quantizer.keep_prob is None}
    assert sum(others.values()) == 3  # the three other techniques stay conventional


def _technique_config(callback: str, callback_args: str = "", objective: str = "") -> str:
    """A technique config on the 128x128 W4A4 macro: callback ``cimq_pl.callbacks.<callback>`` with the YAML
    ``callback_args`` as its init_args, and ``objective`` (YAML) as ``model.objective``."""
    model = "model:\n  cim: {rows: 128, cols: 128, weight_bits: 4, input_bits: 4, dac_bits: 1, adc_bits: 4}\n"
    model += f"  objective: {objective}\n" if objective else ""
    init_args = f"\n      init_args: {callback_args}" if callback_args else ""
    return f"{model}trainer:\n  callbacks:\n    - class_path: cimq_pl.callbacks.{callback}{init_args}\n"


PTQ_ARGS = "{iters_per_block: 7, batch_size: 8, adaround: false, lr_step: 1.0e-4}"
OLD_PTQ_KEYS = _technique_config("PostTrainingQuantization", PTQ_ARGS)
NEW_PTQ_KEYS = _technique_config("PostTrainingQuantization",
                                 objective=f"{{class_path: cimq_pl.objectives.BlockReconstruction, init_args: {PTQ_ARGS}}}")
OLD_QAT_KEYS = _technique_config("QuantizationAwareTraining", "{quantizer_lr_scale: 0.5}")
NEW_QAT_KEYS = _technique_config("QuantizationAwareTraining",
                                 objective="{class_path: cimq_pl.objectives.TaskObjective, init_args: {quantizer_lr_scale: 0.5}}")


def _parsed(tmp_path, monkeypatch, name: str, text: str):
    """The CLI's module and callbacks for the resnet20 config plus the technique config ``text`` (not run)."""
    from cimq_pl.cli import CIMQCLI
    from conftest import REPO

    monkeypatch.chdir(REPO)
    monkeypatch.setattr("sys.argv", ["cimq_pl"])
    config = tmp_path / name
    config.write_text(text)
    return CIMQCLI(args=["--config", "configs/resnet20_cifar10.yaml", "--config", str(config), "--data.root", str(CIFAR10),
                         "--model.pretrained", str(RESNET20), "--trainer.logger", "false"], run=False)


@pytest.mark.parametrize("old,new,warning", [
    (OLD_PTQ_KEYS, NEW_PTQ_KEYS, r"PostTrainingQuantization\.iters_per_block/batch_size/adaround/lr_step is deprecated.*"
                                 r"set model\.objective\.init_args\.iters_per_block, .*cimq_pl\.objectives\.BlockReconstruction"),
    (OLD_QAT_KEYS, NEW_QAT_KEYS, r"QuantizationAwareTraining\.quantizer_lr_scale is deprecated.*"
                                 r"set model\.objective\.init_args\.quantizer_lr_scale .*cimq_pl\.objectives\.TaskObjective"),
])
def test_old_callback_keys_warn_and_give_the_objective_of_the_new_keys(tmp_path, monkeypatch, old, new, warning):
    with pytest.warns(FutureWarning, match=warning):
        before = _parsed(tmp_path, monkeypatch, "old.yaml", old)
    after = _parsed(tmp_path, monkeypatch, "new.yaml", new)
    assert type(before.model.objective) is type(after.model.objective)
    assert vars(before.model.objective) == vars(after.model.objective)
    assert before.config.model.objective == after.config.model.objective  # the same config, as --print_config shows it
    assert [type(cb) for cb in before.trainer.callbacks] == [type(cb) for cb in after.trainer.callbacks]


def test_moved_arguments_in_python_name_the_objective():
    with pytest.raises(ConfigError, match=r"CIMQModule\(objective=BlockReconstruction\(iters_per_block=3, batch_size=8\)\)"):
        PostTrainingQuantization(iters_per_block=3, batch_size=8)
    with pytest.raises(ConfigError, match=r"CIMQModule\(objective=TaskObjective\(quantizer_lr_scale=0.5\)\)"):
        QuantizationAwareTraining(quantizer_lr_scale=0.5)


def _fit(tmp_path, objective, callbacks, **kwargs):
    module = CIMQModule("cifar_resnet20", 10, str(RESNET20), cim=CIMSpec(), objective=objective)
    _trainer(tmp_path, callbacks, limit_val_batches=1, num_sanity_val_steps=0, **kwargs).fit(module, datamodule=_datamodule())
    return module


@pytest.mark.parametrize("objective,callbacks,kwargs,message", [
    (BlockReconstruction(iters_per_block=2), [PostTrainingQuantization()], {"max_epochs": 2},
     r"block reconstruction is one epoch of 11 units x 2 steps \(22 training steps\) but trainer.max_epochs=2: set "
     r"trainer.max_epochs 1"),
    (BlockReconstruction(iters_per_block=2), [PostTrainingQuantization()], {"max_steps": 5},
     r"trainer.max_steps=5 stops it earlier: set trainer.max_steps -1"),
    (None, [PostTrainingQuantization()], {},
     r"PostTrainingQuantization drives block reconstruction, but model.objective is TaskObjective: add model.objective: "
     r"\{class_path: cimq_pl.objectives.BlockReconstruction"),
    (BlockReconstruction(iters_per_block=2), [], {},
     r"BlockReconstruction needs the PostTrainingQuantization callback .*: add cimq_pl.callbacks.PostTrainingQuantization"),
    (BlockReconstruction(iters_per_block=2), [QuantizationAwareTraining()], {},
     r"QuantizationAwareTraining trains with the task loss, but model.objective is BlockReconstruction"),
])
def test_a_reconstruction_fit_that_cannot_run_as_one_epoch_is_refused_at_setup(tmp_path, objective, callbacks, kwargs,
                                                                                 message):
    with pytest.raises(ConfigError, match=message):
        _fit(tmp_path, objective, callbacks, **kwargs)


def test_a_plain_trainer_without_the_objectives_loader_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"trains on its own loader of 11 units x 2 steps \(22 batches\) but the fit "
                                          r"has \d+: fit with cimq_pl.trainer.CIMQTrainer .*module.fit_datamodule\(datamodule\)"):
        _fit(tmp_path, BlockReconstruction(iters_per_block=2, batch_size=4), [PostTrainingQuantization()],
             trainer_class=Trainer, limit_train_batches=3)
