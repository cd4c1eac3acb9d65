"""Start-up time of cimq-pl: imports and the command line up to a parsed config, against torch and Lightning.

Every command runs in a fresh subprocess from the repository root (so this checkout's ``cimq_pl`` is the one
imported), ``--repeats`` times, the commands interleaved round-robin so that a busy machine slows them alike.
The table gives the median wall time, the median CPU time (user + system, steadier on a shared machine) and
the wall time as a multiple of two baselines measured in the same run: ``import torch`` (the floor of any
PyTorch program) and ``import lightning.pytorch`` (the floor of any Lightning one).

Usage::

    python benchmarks/startup.py [--repeats 5] [--commands 3 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
BASELINES = ("import torch", "import lightning.pytorch")
# (label, arguments after `python`)
COMMANDS = (
    ("import torch", ["-c", "import torch"]),
    ("import lightning.pytorch", ["-c", "import lightning.pytorch"]),
    ("import cimq_pl", ["-c", "import cimq_pl"]),
    ("import cimq_pl.quant", ["-c", "import cimq_pl.quant"]),
    ("python -m cimq_pl fit --help", ["-m", "cimq_pl", "fit", "--help"]),
    ("python -m cimq_pl test --config configs/resnet20_cifar10.yaml --print_config",
     ["-m", "cimq_pl", "test", "--config", "configs/resnet20_cifar10.yaml", "--print_config"]),
)
COLUMNS = ("command", "wall s", "CPU s", "x import torch", "x import lightning.pytorch")


def run_once(args: list[str]) -> tuple[float, float]:
    """Wall and CPU (user + system) seconds of ``python *args`` in a fresh process; raises if it fails."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"python {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def machine() -> str:
    """One line: CPU model and count, OS, Python, torch and Lightning versions."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = ", ".join(f"{name} {metadata.version(name)}" for name in ("torch", "lightning", "timm"))
    return (f"{cpu}, {os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), {platform.system()} "
            f"{platform.release()}, Python {platform.python_version()}, {versions}, "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")


def measure(repeats: int, labels: Optional[list[str]] = None) -> list[dict]:
    """Median wall and CPU seconds per command (those of ``labels`` and the baselines; default all), and the wall
    time as a multiple of each baseline."""
    commands = [(label, args) for label, args in COMMANDS if labels is None or label in labels or label in BASELINES]
    times = {label: [] for label, _ in commands}
    for _ in range(repeats):
        for label, args in commands:
            times[label].append(run_once(args))
    rows = []
    for label, _ in commands:
        rows.append({"command": label, "wall s": statistics.median(w for w, _ in times[label]),
                     "CPU s": statistics.median(c for _, c in times[label])})
    walls = {row["command"]: row["wall s"] for row in rows}
    for row in rows:
        for base in BASELINES:
            row[f"x {base}"] = row["wall s"] / walls[base]
    return rows


def table(rows: list[dict]) -> str:
    """The rows as a markdown table."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [f"`{row['command']}`", *(f"{row[c]:.2f}" for c in COLUMNS[1:])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="runs per command (the median is shown)")
    parser.add_argument("--commands", type=int, nargs="+", metavar="N", default=None,
                        help=f"time only these commands (1-{len(COMMANDS)}, in the table's order) beside the two "
                             "baselines (default: all)")
    args = parser.parse_args(argv)
    if args.commands is not None and not all(1 <= n <= len(COMMANDS) for n in args.commands):
        parser.error(f"--commands {' '.join(map(str, args.commands))}: each must be 1-{len(COMMANDS)}: "
                     + "; ".join(f"{n} = {label}" for n, (label, _) in enumerate(COMMANDS, 1)))
    labels = None if args.commands is None else [COMMANDS[n - 1][0] for n in args.commands]
    rows = measure(args.repeats, labels)
    print(f"# Start-up time, median of {args.repeats} fresh processes: {machine()}")
    print(table(rows), flush=True)
    return rows


if __name__ == "__main__":
    main()
