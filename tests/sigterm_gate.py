"""A callback for the pre-emption tests: at a known point it says so on stdout and waits for SIGTERM.

The test process sends the signal when it reads the line, so the command is stopped at a known place, exactly
as a cluster's pre-emption would stop it (the real SIGTERM handling of the CLI and of Lightning,
`ModelCheckpoint(save_on_exception=True)` and the CLI's exit status are all on the real path):

* ``stage="fit"``: after training step ``step`` (1-based global step), in the middle of a reconstruction unit;
* ``stage="calibration"``: in the first forward of the first CIM layer during calibration (before Lightning's
  own SIGTERM handler is in place);
* ``stage="test"``: after test batch ``step`` (0-based), with DataLoader workers running.
"""

from __future__ import annotations

import time

from lightning.pytorch import Callback

from cimq_pl import preemption


class SigtermGate(Callback):
    """At the point chosen by ``stage``/``step`` print ``SIGTERM-GATE`` and wait (at most ``timeout_s``) for SIGTERM."""

    def __init__(self, step: int = 0, stage: str = "fit", timeout_s: float = 120.0):
        self.step, self.stage, self.timeout_s = step, stage, timeout_s
        self._hook = None

    def _wait(self, received) -> None:
        print(f"SIGTERM-GATE {self.stage} {self.step}", flush=True)
        deadline = time.monotonic() + self.timeout_s
        while not received():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no SIGTERM within {self.timeout_s} s")
            time.sleep(0.05)

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.stage != "calibration" or pl_module.quantizers_initialized():  # a resumed fit does not calibrate
            return
        from cimq_pl.quant import cim_layers

        _, first = cim_layers(pl_module.model)[0]

        def gate(module, inputs):
            self._hook.remove()
            self._wait(preemption.requested)

        self._hook = first.register_forward_pre_hook(gate)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.stage == "fit" and trainer.global_step == self.step:
            self._wait(lambda: trainer.received_sigterm)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.stage == "test" and batch_idx == self.step:
            self._wait(lambda: trainer.received_sigterm)
