"""SIGTERM (pre-emption) handled from the CLI's first line, not only once Lightning's loops run.

Lightning installs its SIGTERM handler when ``trainer.fit`` enters its loops, after ``setup`` and
``on_fit_start``; a SIGTERM before that (while the model loads, or while PTQ calibrates) would kill the process
with no message and nothing to resume from. :func:`install` puts a handler in place at start-up:

* before a trainer runs, SIGTERM stops the command at once (`SIGTERMException`; nothing is worth saving yet);
* while a trainer runs (:func:`deferring`), it only records the request: Lightning's handler (which calls ours
  too) stops the loops after the current step, and `PostTrainingQuantization` checks :func:`requested` when
  calibration ends, saves the calibrated quantizers and stops. DataLoader workers forked meanwhile inherit the
  recording handler, so a SIGTERM sent to the whole process group does not kill them under the main process.
"""

from __future__ import annotations

import contextlib
import shlex
import signal
import threading
from pathlib import Path
from typing import Iterator

from lightning.pytorch.utilities.exceptions import SIGTERMException

__all__ = ["Preempted", "deferring", "describe", "install", "requested"]

_state = {"requested": False, "defer": False}


def _on_sigterm(signum, frame) -> None:
    _state["requested"] = True
    if not _state["defer"]:
        raise SIGTERMException()


def install() -> None:
    """Handle SIGTERM as described above (main thread only; elsewhere Python cannot set handlers)."""
    _state["requested"] = False
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


@contextlib.contextmanager
def deferring() -> Iterator[None]:
    """While a trainer runs: SIGTERM is recorded, and the loops and callbacks stop at a safe point."""
    previous = _state["defer"]
    _state["defer"] = True
    try:
        yield
    finally:
        _state["defer"] = previous


def requested() -> bool:
    """Whether a SIGTERM arrived since :func:`install`."""
    return _state["requested"]


class Preempted(SIGTERMException):
    """A command stopped by SIGTERM: its stage and the checkpoint that resumes it (None: nothing to resume)."""

    def __init__(self, stage: str, resume_from: Path | None):
        super().__init__(128 + signal.SIGTERM)
        self.stage, self.resume_from = stage, resume_from


def describe(stop: BaseException, argv: list[str]) -> str:
    """The one line the CLI prints for a SIGTERM: what stopped and the exact command that resumes it."""
    if isinstance(stop, Preempted) and stop.resume_from is not None:
        args = list(argv)
        if "--ckpt_path" in args:  # a resumed run stopped again: resume from its newest checkpoint
            index = args.index("--ckpt_path")
            del args[index:index + 2]
        args = [arg for arg in args if not arg.startswith("--ckpt_path=")]
        command = " ".join(shlex.quote(arg) for arg in ["python", "-m", "cimq_pl", *args, "--ckpt_path",
                                                          str(stop.resume_from)])
        return f"stopped by SIGTERM during {stop.stage}; resume with: {command}"
    stage = stop.stage if isinstance(stop, Preempted) else "start-up"
    return f"stopped by SIGTERM during {stage}; nothing to resume: run the command again"
