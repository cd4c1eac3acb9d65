"""Fixtures of the benchmark smoke runs: an output folder per test file and the scripts' smoke arguments."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """The file's output folder (CSV, PNG) with a ``work`` folder for runs and checkpoints."""
    return tmp_path_factory.mktemp("bench")


@pytest.fixture(scope="module")
def smoke_args(out) -> list[str]:
    """A benchmark script's arguments for a smoke run writing into ``out``."""
    return ["--smoke", "--out-dir", str(out), "--work-dir", str(out / "work")]
