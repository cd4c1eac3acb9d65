"""`cimq_pl.cpu_runtime`: the CLI's glibc settings are in effect (a large tensor comes from the heap, not from mmap)
and are left alone where the user opted out or chose an allocator; absent GPUs are hidden only where none is
usable and the user has not chosen. Each case runs in a fresh process: the settings are process-wide."""

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                                reason="glibc's mallopt (Linux)")

# mallinfo2().hblkhd: bytes in blocks glibc serves with mmap (glibc >= 2.33); the probe prints what a new
# 64 MiB tensor adds to it
PROBE = """
import ctypes, sys
import torch
from cimq_pl.cpu_runtime import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
applied = keep_freed_memory() if sys.argv[1] == "tune" else False
before = libc.mallinfo2().hblkhd  # (blocks mapped while importing stay mapped)
tensor = torch.empty(64 * 2**20, dtype=torch.uint8)  # 64 MiB, far above glibc's default mmap threshold
print(int(applied), libc.mallinfo2().hblkhd - before)
"""


def _probe(mode: str, **env) -> tuple[int, int]:
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("CIMQ_MALLOC_TUNING", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD")}
    environment.update(env)
    result = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=environment,
                            check=True)
    applied, mmapped = result.stdout.split()
    return int(applied), int(mmapped)


def test_tuned_process_serves_large_tensors_from_the_heap():
    applied, mmapped = _probe("tune")
    assert applied == 1 and mmapped == 0
    untouched, mmapped = _probe("plain")  # glibc's defaults: the 64 MiB block is an mmap of its own
    assert untouched == 0 and mmapped >= 64 * 2**20


@pytest.mark.parametrize("env", [{"CIMQ_MALLOC_TUNING": "0"}, {"MALLOC_MMAP_MAX_": "65536"},
                                 {"MALLOC_TRIM_THRESHOLD_": "131072"}])
def test_user_choices_are_left_alone(env):
    applied, mmapped = _probe("tune", **env)
    assert applied == 0 and mmapped >= 64 * 2**20


GPU_PROBE = """
import os
import torch
from cimq_pl.cpu_runtime import hide_absent_gpus
usable = torch.cuda.is_available()
print(int(hide_absent_gpus()), int(usable), repr(os.environ.get("CUDA_VISIBLE_DEVICES")), int(torch.cuda.is_available()))
"""


@pytest.mark.parametrize("visible", [None, "0"])
def test_absent_gpus_are_hidden_only_where_none_is_usable_and_the_user_did_not_choose(visible):
    environment = {key: value for key, value in os.environ.items() if key != "CUDA_VISIBLE_DEVICES"}
    if visible is not None:
        environment["CUDA_VISIBLE_DEVICES"] = visible
    out = subprocess.run([sys.executable, "-c", GPU_PROBE], capture_output=True, text=True, env=environment,
                         check=True).stdout.split()
    hidden, usable, value, usable_after = int(out[0]), int(out[1]), out[2], int(out[3])
    if visible is not None or usable:  # the user's choice, or a usable GPU: untouched
        assert hidden == 0 and value == (repr(visible) if visible is not None else "None") and usable_after == usable
    else:
        assert hidden == 1 and value == "''" and usable_after == 0
