"""Run a short CIMQ PTQ of ResNet-20 under Lightning DDP on CPU (gloo); each rank dumps its quantizers.

Usage: python tests/ddp_ptq_script.py OUT_DIR DEVICES ITERS_PER_BLOCK [qat]. Run by tests/callbacks/test_ddp.py in a
subprocess (Lightning's DDP launcher starts the other ranks by re-running this script). With ``qat``, ITERS_PER_BLOCK
optimizer steps of the low-ADC QAT recipe (`QuantizerDistillation`) from the calibrated network instead; each rank
dumps its quantizers and weights as ``qat_*`` files.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from lightning.pytorch import Callback, seed_everything

sys.path.insert(0, str(Path(__file__).parent))

from conftest import CIFAR10, RESNET20  # noqa: E402

from cimq_pl.callbacks.ptq import PTQ_DDP_STRATEGY
from cimq_pl.callbacks import (ArraywiseWeights, BitSparseActivations, PartialSumClipping,  # noqa: E402
                               PostTrainingQuantization, QuantDropping, QuantizationAwareTraining)
from cimq_pl.callbacks.calibration import quantizer_state  # noqa: E402
from cimq_pl.datamodules import CIFAR10DataModule  # noqa: E402
from cimq_pl.module import CIMQModule  # noqa: E402
from cimq_pl.objectives import BlockReconstruction, QuantizerDistillation  # noqa: E402
from cimq_pl.quant import CIMSpec, cim_layers  # noqa: E402
from cimq_pl.trainer import CIMQTrainer  # noqa: E402


class DumpQuantizers(Callback):
    """Saves every rank's quantizer state after calibration, after each unit and after the fit, and its val/acc."""

    def __init__(self, out: Path, devices: int):
        self.out, self.devices = out, devices

    def _save(self, trainer, pl_module, tag: str) -> None:
        path = self.out / f"{tag}_devices{self.devices}_rank{trainer.global_rank}.pt"
        acc = trainer.callback_metrics.get("val/acc")
        offsets = {name: layer.output_offset.detach().clone() for name, layer in cim_layers(pl_module.model)
                   if layer.output_offset is not None}  # learned after the ADC (lr_offset)
        torch.save({"quantizers": quantizer_state(pl_module.model), "offsets": {"output_offset": offsets},
                    "val_acc": None if acc is None else float(acc)}, path)

    def on_fit_start(self, trainer, pl_module):
        self._save(trainer, pl_module, "calibrated")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # after PTQ hardened a unit
        schedule = getattr(pl_module.objective, "schedule", None)  # QAT has no units
        if schedule is not None and schedule.ends_unit(batch_idx):
            self._save(trainer, pl_module, f"block{schedule.unit(batch_idx)}")

    def on_train_end(self, trainer, pl_module):
        self._save(trainer, pl_module, "final")


class DumpQAT(DumpQuantizers):
    """Saves every rank's quantizers and weights after calibration and after the fit, as ``qat_*`` files."""

    def _save(self, trainer, pl_module, tag: str) -> None:
        weights = {name: p.detach().clone() for name, p in pl_module.model.named_parameters()
                   if name.endswith("weight")}
        torch.save({"quantizers": quantizer_state(pl_module.model), "weights": weights},
                   self.out / f"qat_{tag}_devices{self.devices}_rank{trainer.global_rank}.pt")


def main_qat(out: str, devices: int, steps: int) -> None:
    seed_everything(0)
    out_dir = Path(out)
    cim = CIMSpec(adc_bits=3, first_layer="int8", last_layer="int8")
    module = CIMQModule("cifar_resnet20", 10, str(RESNET20), cim=cim, objective=QuantizerDistillation())
    data = CIFAR10DataModule(root=str(CIFAR10), num_workers=0, calibration_size=32, batch_size=8)
    callbacks = [BitSparseActivations(max_ones=None, step_scale=2.0), ArraywiseWeights(), PartialSumClipping(),
                 QuantizationAwareTraining(), DumpQAT(out_dir, devices)]
    trainer = CIMQTrainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", logger=False,
                          enable_progress_bar=False, enable_model_summary=False, default_root_dir=out_dir,
                          max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0, callbacks=callbacks)
    trainer.fit(module, datamodule=data)


def main(out: str, devices: int, iters: int) -> None:
    seed_everything(0)
    out_dir = Path(out)
    module = CIMQModule("cifar_resnet20", 10, str(RESNET20), cim=CIMSpec(),
                        objective=BlockReconstruction(iters_per_block=iters, batch_size=16, lr_offset=1e-3))
    data = CIFAR10DataModule(root=str(CIFAR10), num_workers=0, calibration_size=32, eval_batch_size=50)
    callbacks = [BitSparseActivations(max_ones=2), ArraywiseWeights(), PartialSumClipping(), QuantDropping(0.5),
                 PostTrainingQuantization(), DumpQuantizers(out_dir, devices)]
    trainer = CIMQTrainer(accelerator="cpu", devices=devices, strategy=PTQ_DDP_STRATEGY if devices > 1 else "auto",
                          logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=out_dir,
                          max_epochs=1, limit_val_batches=2, num_sanity_val_steps=0, callbacks=callbacks)
    trainer.fit(module, datamodule=data)


if __name__ == "__main__":
    (main_qat if sys.argv[4:] == ["qat"] else main)(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
