"""The start-up benchmark: its table of ratios, and what `import cimq_pl` leaves for later."""

from __future__ import annotations

import sys
import json
import subprocess

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import startup  # noqa: E402

pytestmark = pytest.mark.slow


def _imported_by(statement: str, modules: tuple[str, ...]) -> list[str]:
    """Which of ``modules`` a fresh interpreter has imported after ``statement`` (run from the repository root)."""
    code = f"import json, sys; {statement}; print(json.dumps([m for m in {list(modules)!r} if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    return json.loads(out.stdout)


def test_startup_smoke_prints_a_table_of_ratios(capsys):
    rows = startup.main(["--repeats", "1"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header == list(startup.COLUMNS) and set(lines[1]) == {"|", "-"}
    table = {cells[0].strip("`"): [float(c) for c in cells[1:]]
             for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}
    assert list(table) == [label for label, _ in startup.COMMANDS] == [row["command"] for row in rows]
    assert all(value > 0 for values in table.values() for value in values)
    assert table["import torch"][2] == 1.0 and table["import lightning.pytorch"][3] == 1.0  # each baseline is 1x itself


def test_startup_import_leaves_wandb_export_and_plots_for_later():
    """`import cimq_pl` registers the models (timm) without W&B, the export package or matplotlib; the CLI module
    does not import W&B or the export package either (Lightning imports matplotlib through torchmetrics)."""
    heavy = ("wandb", "matplotlib", "cimq_pl.export", "lightning")
    assert _imported_by("import cimq_pl, timm; timm.create_model('cifar_resnet20')", heavy) == []  # cimq_pl.quant too
    assert _imported_by("import cimq_pl.cli", ("wandb", "cimq_pl.export")) == []


def test_startup_timm_still_reaches_wandb_on_first_use():
    """timm's own `update_summary(log_wandb=True)` finds W&B: the stand-in imports it when first used."""
    code = "import cimq_pl, timm.utils.summary as s; import wandb; assert s.wandb.log is wandb.log"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
