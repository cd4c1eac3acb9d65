"""A callback for the pre-emption test: at one training step it says so on stdout and waits for SIGTERM.

The test process sends the signal when it reads the line, so the fit is stopped at a known step in the
middle of a reconstruction unit, exactly as a cluster's pre-emption would stop it (Lightning's own SIGTERM
handling, `ModelCheckpoint(save_on_exception=True)` and the CLI's exit status are all on the real path).
"""

from __future__ import annotations

import time

from lightning.pytorch import Callback


class SigtermGate(Callback):
    """After training step ``step`` (1-based global step), print ``SIGTERM-GATE <step>`` and wait for SIGTERM."""

    def __init__(self, step: int, timeout_s: float = 120.0):
        self.step, self.timeout_s = step, timeout_s

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.step:
            return
        print(f"SIGTERM-GATE {trainer.global_step}", flush=True)
        deadline = time.monotonic() + self.timeout_s
        while not trainer.received_sigterm:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no SIGTERM within {self.timeout_s} s")
            time.sleep(0.05)
