"""Issue 14's PTQ step-rate target, measured against the code it was filed on, alternating, round after round.

The target is "the PTQ preset at least 3x more reconstruction steps per second than when the issue was filed, at
the same settings". One fit of each side measures it badly on shared machines: a side's step time moves by
10-30% between runs. This script checks out the baseline commit (``--baseline``, default ``1d4390d``, the
commit before issue 14) into a worktree under ``--work-dir``, sets the baseline preset's settings that changed
since to today's (``--baseline-set``, default the input codes: ``BitSparseActivations.max_ones=null``), and runs
``benchmarks/training_time.py --ptq-steps N`` of each side in its own process (the baseline on its eager path or
``--baseline-simulation``, this checkout on ``--simulation``, default compiled), alternating which goes first, for
``--rounds`` rounds. It prints every run and the ratio of the medians (and the range of the per-round ratios), and
adds the runs to ``step_rate_pair.csv`` in ``--out-dir`` (earlier runs are kept; each row names its date, both sides'
commits and its side's simulation path).

Each side runs as its code runs: this checkout's CLI makes its own process settings (`cimq_pl.cpu_runtime`:
glibc keeps freed memory, absent GPUs hidden), the baseline's did not. ``--same-allocator`` gives both processes
glibc's settings through the environment (``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000``), which
leaves only the code's difference.

    python benchmarks/step_rate_pair.py                       # 3 rounds of 2 fits, ~12 min on 2 cores
    python benchmarks/step_rate_pair.py --same-allocator
    python benchmarks/step_rate_pair.py --baseline main --baseline-set --baseline-simulation compiled  # a change's gain
"""

from __future__ import annotations

import datetime
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Optional

import yaml

from cimq_pl.cost.tables import write_csv_atomic
from cimq_pl.cpu_runtime import MALLOC_ENVIRONMENT
from runner import PTQ_PRESET, REPO, base_parser, machine, markdown_table, prepare, read_csv_rows

PRESET = Path(PTQ_PRESET)


def baseline_checkout(rev: str, work_dir: Path, settings: list[str]) -> Path:
    """A worktree of ``rev`` under ``work_dir`` (removed at the end of the run), its preset's callback arguments set from
    ``settings`` (``Callback.arg=yaml value``), and ``work_dir/shared`` pointing at this checkout's ``../shared``
    (the configs read their data and weights from there)."""
    root = work_dir / f"baseline-{rev}"
    if not root.exists():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "--force", str(root), rev], check=True,
                       capture_output=True)
    shared = work_dir / "shared"
    if not shared.exists():
        shared.symlink_to((REPO.parent / "shared").resolve())
    preset = root / PRESET
    config = yaml.safe_load(preset.read_text())
    for setting in settings:
        name, _, value = setting.partition("=")
        callback, _, arg = name.rpartition(".")
        found = [c for c in config["trainer"]["callbacks"] if c["class_path"].rsplit(".", 1)[-1] == callback]
        if not found or not arg:
            remove_checkout(root)
            raise SystemExit(f"--baseline-set {setting!r}: the baseline preset {PRESET} has no callback {callback!r}")
        found[0].setdefault("init_args", {})[arg] = yaml.safe_load(value)
    preset.write_text(yaml.safe_dump(config, sort_keys=False))
    return root


def remove_checkout(root: Path) -> None:
    """Remove the baseline worktree ``root`` (files and git's record of it)."""
    subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(root)], capture_output=True)


def step_seconds(root: Path, simulation: str, steps: int, out: Path, smoke: bool, env: dict) -> float:
    """Seconds per reconstruction step of ``root``'s code (its own ``training_time.py``, in a process of its own)."""
    command = [sys.executable, "benchmarks/training_time.py", "--models", "resnet20", "--steps", "0", "--ptq-steps",
               str(steps), "--simulations", simulation, "--out-dir", str(out), "--work-dir", str(out / "work"),
               *(["--smoke"] if smoke else [])]
    environment = {**os.environ, **env, "PYTHONPATH": str(root), "WANDB_MODE": "offline"}
    result = subprocess.run(command, cwd=root, env=environment, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{' '.join(command)} in {root} failed:\n{result.stderr[-3000:]}")
    rows = [row for row in read_csv_rows(out / "training_time.csv") if row["method"].startswith("PTQ step rate")]
    return float(rows[-1]["seconds_per_step"])


CSV_FIELDS = ["date", "round", "side", "simulation", "seconds_per_step", "baseline", "checkout", "same_allocator"]


def append_runs(path: Path, rows: list[dict]) -> None:
    """Add ``rows`` to the CSV at ``path`` after the runs it holds (written atomically; fields an older row lacks
    stay empty)."""
    write_csv_atomic(path, [*read_csv_rows(path), *rows], CSV_FIELDS)


def main(argv: Optional[list[str]] = None) -> dict:
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--baseline", default="1d4390d", help="the commit the target compares with (1d4390d)")
    parser.add_argument("--baseline-set", nargs="*", default=["BitSparseActivations.max_ones=null"],
                        metavar="CALLBACK.ARG=VALUE", help="the baseline preset's settings made today's")
    parser.add_argument("--baseline-simulation", choices=("eager", "compiled"), default="eager",
                        help="the baseline's path (eager, the issue's; compiled where the baseline has it)")
    parser.add_argument("--simulation", choices=("eager", "compiled"), default="compiled", help="this checkout's path")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of one fit per side (3)")
    parser.add_argument("--ptq-steps", type=int, default=40, help="reconstruction steps per unit (40)")
    parser.add_argument("--same-allocator", action="store_true", help="glibc's settings for both sides")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.ptq_steps < 3:
        parser.error(f"--rounds {args.rounds} --ptq-steps {args.ptq_steps}: expected >= 1 round and >= 3 steps")
    prepare(args)
    work_dir = args.work_dir.resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    sides = {"baseline": (baseline_checkout(args.baseline, work_dir, args.baseline_set), args.baseline_simulation),
             "this checkout": (REPO, args.simulation)}
    env = MALLOC_ENVIRONMENT if args.same_allocator else {}
    runs = []
    try:
        for round_ in range(args.rounds):
            order = list(sides) if round_ % 2 == 0 else list(sides)[::-1]
            for side in order:
                root, simulation = sides[side]
                seconds = step_seconds(root, simulation, args.ptq_steps,
                                       work_dir / f"round{round_}-{side.split()[0]}", args.smoke, env)
                runs.append({"round": round_ + 1, "side": side, "simulation": simulation, "seconds_per_step": seconds})
                print(f"round {round_ + 1}: {side} ({simulation}) {seconds:.4f} s per step", flush=True)
    finally:
        remove_checkout(sides["baseline"][0])
    per_side = {side: [r["seconds_per_step"] for r in runs if r["side"] == side] for side in sides}
    ratios = [base / mine for base, mine in zip(per_side["baseline"], per_side["this checkout"])]
    summary = {"baseline": args.baseline, "baseline median s": round(statistics.median(per_side["baseline"]), 4),
               "this checkout median s": round(statistics.median(per_side["this checkout"]), 4),
               "ratio of medians": round(statistics.median(per_side["baseline"])
                                         / statistics.median(per_side["this checkout"]), 2),
               "per-round ratios": f"{min(ratios):.2f}-{max(ratios):.2f}", "same allocator": args.same_allocator}
    checkout = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
    record = {"date": datetime.date.today().isoformat(), "baseline": args.baseline, "checkout": checkout,
              "same_allocator": args.same_allocator}
    append_runs(args.out_dir / "step_rate_pair.csv", [{**run, **record} for run in runs])
    print(f"\n{machine()}; {args.ptq_steps} steps per unit, {args.rounds} rounds\n")
    print(markdown_table(runs, ["round", "side", "simulation", "seconds_per_step"],
                         ["round", "code", "simulation", "s per step"]))
    print("\n" + markdown_table([summary], list(summary), list(summary)))
    return {"runs": runs, **summary}


if __name__ == "__main__":
    main()
