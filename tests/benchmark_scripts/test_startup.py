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


def test_startup_smoke_prints_a_table_of_ratios(capsys):
    """The baselines, `import cimq_pl` and the CLI's help (each command a fresh process of seconds: not all six)."""
    rows = startup.main(["--repeats", "1", "--commands", "3", "5"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header == list(startup.COLUMNS) and set(lines[1]) == {"|", "-"}
    table = {cells[0].strip("`"): [float(c) for c in cells[1:]]
             for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}
    expected = [label for n, (label, _) in enumerate(startup.COMMANDS, 1) if n in (1, 2, 3, 5)]
    assert list(table) == expected == [row["command"] for row in rows]
    with pytest.raises(SystemExit):  # a command number outside the table
        startup.main(["--commands", "7"])
    assert "--commands 7: each must be 1-6: 1 = import torch" in capsys.readouterr().err
    assert all(value > 0 for values in table.values() for value in values)
    assert table["import torch"][2] == 1.0 and table["import lightning.pytorch"][3] == 1.0  # each baseline is 1x itself


def test_startup_import_leaves_wandb_export_and_plots_for_later_and_timm_still_reaches_wandb():
    """`import cimq_pl` registers the models (timm) without W&B, the export package or matplotlib; the CLI module
    does not import W&B or the export package either (Lightning imports matplotlib through torchmetrics); then
    timm's own `update_summary(log_wandb=True)` finds W&B: the stand-in imports it when first used. One fresh
    interpreter, in that order (a later import cannot undo what an earlier one pulled in; each start costs seconds)."""
    heavy = ("wandb", "matplotlib", "cimq_pl.export", "lightning")
    code = ("import json, sys; modules = lambda names: [m for m in names if m in sys.modules]; "
            "import cimq_pl, timm; timm.create_model('cifar_resnet20'); "  # cimq_pl.quant too
            f"package = modules({heavy!r}); "
            "import cimq_pl.cli; cli = modules(('wandb', 'cimq_pl.export')); "
            "import timm.utils.summary as summary; import wandb; reaches = summary.wandb.log is wandb.log; "
            "print(json.dumps([package, cli, reaches]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [[], [], True]
