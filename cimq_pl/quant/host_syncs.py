"""Count where a computation reads a tensor's value on the host: what stalls a GPU and rules out CUDA graphs.

A CUDA graph replays recorded kernels without Python, so whatever it records must not ask the host for a value
(``float(t)``, ``t.item()``, ``if t.any():``, ``nonzero``, ``torch.equal``): on CUDA each of these waits for the
device, and inside a capture it fails. `HostSyncCounter` counts such calls by their nearest ``cimq_pl`` caller on
any device, so the CPU tests can check that a CIM forward (and a reconstruction step's forward and backward) is
free of them before a GPU ever runs it.

    with HostSyncCounter() as syncs:
        model(images)
    assert syncs.total == 0, syncs.describe()
"""

from __future__ import annotations

import collections
import traceback

from torch.utils._python_dispatch import TorchDispatchMode

from cimq_pl.quant import fused

__all__ = ["HOST_SYNC_OPERATORS", "HostSyncCounter"]

#: ATen operators whose result the host must wait for: a scalar read (``item``, ``float(t)``, ``bool(t)``) or an
#: output whose size depends on the values.
HOST_SYNC_OPERATORS = frozenset({"_local_scalar_dense", "is_nonzero", "equal", "nonzero", "masked_select",
                                 "unique", "_unique2", "unique_consecutive", "bincount", "repeat_interleave"})


def _caller() -> str:
    """The innermost ``cimq_pl`` frame of the current stack as ``quant/fused.py:189``, else ``(outside cimq_pl)``."""
    for frame in reversed(traceback.extract_stack()):
        path = frame.filename.replace("\\", "/")
        if "cimq_pl/" in path and not path.endswith("/host_syncs.py"):  # this module's own frames: the counter
            return f"{path.split('cimq_pl/')[-1]}:{frame.lineno}"
    return "(outside cimq_pl)"


class HostSyncCounter(TorchDispatchMode):
    """Within ``with``, count the calls of `HOST_SYNC_OPERATORS` by (operator, nearest ``cimq_pl`` caller).

    A dispatch mode: it sees every ATen call of the block, forward and backward, on CPU and CUDA alike (the calls
    would sync on CUDA; on the CPU they are merely counted). The compiled path's kernels run uncompiled inside
    (`fused.COMPILE_KERNELS`, the same code): Dynamo traces nothing under a dispatch mode, and a failed compilation
    would switch the process to the eager path. Nothing else changes.
    """

    def __init__(self):
        super().__init__()
        self.calls: collections.Counter = collections.Counter()
        self._compile_kernels = None

    def __enter__(self):
        self._compile_kernels, fused.COMPILE_KERNELS = fused.COMPILE_KERNELS, False
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            fused.COMPILE_KERNELS = self._compile_kernels

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if name in HOST_SYNC_OPERATORS:
            self.calls[(name, _caller())] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        """Host syncs counted so far."""
        return sum(self.calls.values())

    def describe(self) -> str:
        """The counted calls, most frequent first: ``"3 x _local_scalar_dense at quant/fused.py:189; ..."``."""
        if not self.calls:
            return "no host syncs"
        return "; ".join(f"{count} x {name} at {where}" for (name, where), count in self.calls.most_common())
