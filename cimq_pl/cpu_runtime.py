"""Process settings that make CPU fits faster; `CIMQCLI` applies them once per process.

`keep_freed_memory`: keep freed tensor memory in the process on Linux (glibc), so that a CPU fit stops paying page
faults each step. A reconstruction step allocates and frees the same tensors of a few MB every step (partial sums
of every input cycle, their gradients, digit planes). glibc serves blocks above its mmap threshold with fresh
``mmap`` pages and hands freed memory at the top of the heap back to the system, so the next step touches new
pages again: page faults and zeroing that cost several percent of a PTQ step on 2 CPU cores (README, "Simulation
paths"). With ``M_MMAP_MAX = 0`` every block comes from the heap and with a large ``M_TRIM_THRESHOLD`` freed
blocks stay there for reuse: the environment variables ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...`` do the
same before a process starts. The price is that the process keeps its peak memory until it exits (a fit needs
it again at the next unit anyway). Left alone where the user chose an allocator (``LD_PRELOAD``, e.g. jemalloc
or tcmalloc) or glibc's settings (``MALLOC_MMAP_MAX_``, ``MALLOC_TRIM_THRESHOLD_``), off the Linux C library, and
with ``CIMQ_MALLOC_TUNING=0``.

`hide_absent_gpus`: on a machine without a usable GPU, a CUDA build of PyTorch asks NVML for the device count
again at every call of ``torch.cuda.is_available()`` (it caches the count only once CUDA is initialised), and
``torch.optim.Adam`` calls it at every step: a library load and a failed NVML probe, about 0.3 ms a step.
``CUDA_VISIBLE_DEVICES=""`` answers "no devices" at once; it is set only where no GPU is usable anyway and the
user has not set the variable.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

__all__ = ["MALLOC_ENVIRONMENT", "hide_absent_gpus", "keep_freed_memory", "set_malloc_options"]

_M_TRIM_THRESHOLD = -1  # mallopt parameters, <malloc.h>
_M_MMAP_MAX = -4
_TRIM_THRESHOLD_BYTES = 2**31 - 1  # the largest value mallopt takes (an int): freed memory stays below 2 GiB
#: The same setting as environment variables, read by glibc when a process starts (subprocesses, other tools)
MALLOC_ENVIRONMENT = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "100000000000"}
_USER_CHOICES = ("LD_PRELOAD", *MALLOC_ENVIRONMENT)
_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Ask glibc to serve large blocks from the heap and keep freed memory (once per process).

    Returns:
        Whether the settings are in effect (False where skipped or refused: see the module docstring).
    """
    global _applied
    if _applied is None:
        _applied = _apply()
    return _applied


def _apply() -> bool:
    if os.environ.get("CIMQ_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    if any(name in os.environ for name in _USER_CHOICES) or platform.libc_ver()[0] != "glibc":
        return False
    return set_malloc_options()


def set_malloc_options() -> bool:
    """Set glibc's ``M_MMAP_MAX`` to 0 and ``M_TRIM_THRESHOLD`` to its largest value in this process, whatever the
    environment says (`keep_freed_memory` checks the user's choices first).

    Returns:
        Whether glibc took both (False off glibc).
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES))


def hide_absent_gpus() -> bool:
    """Set ``CUDA_VISIBLE_DEVICES=""`` where PyTorch sees no usable GPU and the variable is unset.

    Returns:
        Whether it was set.
    """
    import torch

    if "CUDA_VISIBLE_DEVICES" in os.environ or not torch.backends.cuda.is_built() or torch.cuda.is_available():
        return False
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    return True
