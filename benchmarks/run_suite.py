"""The whole benchmark suite, one command: every script in turn, timed, then the results written into the README.

    python benchmarks/run_suite.py                 # ~1.5 h on 2 cores; regenerates README's "Benchmark suite"
    python benchmarks/run_suite.py --report-only   # re-render the README section from the CSVs
    python benchmarks/run_suite.py --smoke --out-dir /tmp/suite   # every script on tiny data (test suite)

Scripts resume: a stopped suite re-run skips the settings already in ``benchmarks/results/*.csv`` (delete a
CSV to measure it again). The README section between the ``benchmark-suite`` markers is generated from the
CSVs (machine, date, commands and per-script times included); never edit it by hand.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import runner

# script, whether it takes --work-dir (the runner-based ones do)
SCRIPTS = (
    ("cim_layer_speed.py", False),
    ("other_models.py", True),
    ("ablation.py", True),
    ("sweeps.py", True),
    ("training_time.py", True),
)
BEGIN, END = "<!-- benchmark-suite:begin -->", "<!-- benchmark-suite:end -->"
TIME_COLUMNS = ("script", "command", "seconds")




# gap of CIMQ to FP allowed by the techniques issue, points, per ADC resolution
GAP_TARGETS = {8: 1.0, 4: 3.0, 3: 8.0}


def _float(row: Optional[dict], key: str) -> Optional[float]:
    value = (row or {}).get(key, "")
    return float(value) if value not in ("", None) else None


def ablation_rows(out_dir: Path, iters: int = 100) -> tuple[list[dict], list[str]]:
    """``(rows, missing)``: the rows of ``ablation.csv`` that measure today's grid (`ablation.suite_grid`), and the
    keys of the grid's settings it has no row for yet. The CSV also keeps the rows of earlier configs (their keys
    carry the older row names, `runner.ROW_KEY_NAMES`): a record, not shown beside today's."""
    import ablation

    grid = [setting for model in runner.MODEL_CONFIGS for setting, _ in ablation.suite_grid(model, iters)]
    store = runner.ResultStore(out_dir / "ablation.csv")
    found = {setting.key: store.get(setting) for setting in grid}
    return [row for row in found.values() if row is not None], [key for key, row in found.items() if row is None]


def targets(out_dir: Path, iters: int = 100) -> str:
    """Markdown: each target of the techniques issue beside what the suite measured, and whether it is met."""
    import sweeps

    lines = []
    measured, _ = ablation_rows(out_dir, iters)
    for model in ("resnet20", "resnet32"):
        fp = next((r for r in measured if r["model"] == model and r["row"] == "fp"), None)
        for adc, allowed in GAP_TARGETS.items():
            cimq = next((r for r in measured if r["model"] == model and r["row"] == "cimq"
                         and r["weight_bits"] == "4" and r["adc_bits"] == str(adc)), None)
            if fp is None or cimq is None:
                continue
            gap = 100 * (_float(fp, "test/acc") - _float(cimq, "test/acc"))
            lines.append({"target": f"{model} W4A4, CIMQ within {allowed:g} points of FP with a {adc}-bit ADC",
                          "measured": f"{_float(cimq, 'test/acc'):.3f} vs FP {_float(fp, 'test/acc'):.3f}: gap {gap:.1f} points",
                          "met": "yes" if gap <= allowed else "**no**"})
    sweep_rows = {r["key"]: r for r in runner.read_csv_rows(out_dir / "sweeps.csv")}
    by_k = {value: sweep_rows.get(s.key) for name, value, s in sweeps.sweep_settings(iters) if name == "max_ones"}
    if by_k.get(0) and by_k.get(2):
        uniform, sparse = by_k[0], by_k[2]
        drop = 100 * (1 - _float(sparse, "test/bit_density") / _float(uniform, "test/bit_density"))
        cost = 100 * (_float(uniform, "test/acc") - _float(sparse, "test/acc"))
        lines.append({"target": "bit-sparse codes (k = 2): >= 30% lower input bit density than uniform codes, <= 1 point",
                      "measured": f"density {_float(uniform, 'test/bit_density'):.3f} -> {_float(sparse, 'test/bit_density'):.3f} "
                                  f"(-{drop:.0f}%) for {cost:.1f} points of accuracy",
                      "met": "yes" if drop >= 30 and cost <= 1 else "**no**"})
    ptq_times = [row for row in runner.read_csv_rows(out_dir / "training_time.csv")
                 if row["model"] == "resnet20" and row["method"].startswith("PTQ")]
    for row in ptq_times[-1:]:  # the latest measurement (the CSV keeps earlier ones)
        minutes = float(row["seconds"]) / 60
        lines.append({"target": "PTQ of ResNet-20 in under 15 minutes on this machine",
                      "measured": f"{minutes:.1f} min ({row['budget']})", "met": "yes" if minutes < 15 else "**no**"})
    speed = runner.read_csv_rows(out_dir / "cim_layer_speed_cpu.csv")
    if speed:
        worst = max(float(r["fwd_bwd_ratio"]) for r in speed)
        lines.append({"target": "CIM layer forward+backward within 1.5x of (cycles x plain conv)",
                      "measured": f"up to {worst:.1f}x (CPU)", "met": "yes" if worst <= 1.5 else "**no**"})
        if all(r.get("compiled_fwd_ratio") for r in speed):  # issue 14, the compiled simulation
            for column, limit, what in (("compiled_fwd_ratio", 2.0, "forward"), ("compiled_fwd_bwd_ratio", 3.0,
                                                                                  "forward+backward")):
                worst = max(float(r[column]) for r in speed)
                lines.append({"target": f"compiled CIM layer {what} within {limit}x of (cycles x plain conv)",
                              "measured": f"up to {worst:.1f}x (CPU)", "met": "yes" if worst <= limit else "**no**"})
    return runner.markdown_table(lines, ["target", "measured", "met"])


def render(out_dir: Path, iters: int = 100) -> str:
    """The README section: machine, date, per-script times and every table, from the CSVs in ``out_dir``."""
    import ablation
    import other_models
    import sweeps
    import training_time

    info_path = out_dir / "suite_info.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    parts = [f"Generated by `python benchmarks/run_suite.py` from `benchmarks/results/*.csv`. "
             f"Machine: {info.get('machine', runner.machine())}. Date: {info.get('date', 'not recorded')}."]
    script_times = runner.read_csv_rows(out_dir / "suite_times.csv")
    if script_times:
        measured: set = set()  # a setting reused from an earlier script's CSV counts for that script only
        for row in script_times:  # fit + test seconds of the settings a script measured (no process start-up)
            settings = [r for r in runner.read_csv_rows(out_dir / row["script"].replace(".py", ".csv")) if r.get("key") not in measured]
            if settings and "fit_seconds" in settings[0] and "test_seconds" in settings[0]:
                row["work"] = f"{sum((_float(r, 'fit_seconds') or 0) + (_float(r, 'test_seconds') or 0) for r in settings):.0f}"
                measured.update(r["key"] for r in settings)
        total = sum(float(r["seconds"]) for r in script_times)
        parts.append("#### Per-script wall time\n\n" + runner.markdown_table(
            [*script_times, {"script": "**total**", "seconds": f"{total:.0f} ({total / 3600:.2f} h)"}],
            [*TIME_COLUMNS, "work"], ["script", "command", "wall seconds", "fit + test seconds of its settings"]))
    checks = targets(out_dir, iters)
    if checks.count("\n") > 1:
        parts.append("#### Against the targets of the techniques issue\n\n" + checks)
    rows, missing = ablation_rows(out_dir, iters)
    if rows:
        note = (f"\n\nNot measured with today's configs yet ({len(missing)} of the grid's settings; "
                f"`python benchmarks/ablation.py` measures them): " + ", ".join(f"`{key}`" for key in missing)
                if missing else "")
        parts.append("#### Ablation (`python benchmarks/ablation.py`)\n\n" + ablation.tables(rows) + note
                     + "\n\n![accuracy vs ADC bits](benchmarks/results/ablation.png)")
    sweep_rows = {r["key"]: r for r in runner.read_csv_rows(out_dir / "sweeps.csv")}
    points = [(name, value, sweep_rows[s.key]) for name, value, s in sweeps.sweep_settings(iters) if s.key in sweep_rows]
    if points:
        parts.append("#### Sweeps (`python benchmarks/sweeps.py`)\n\n" + sweeps.tables(points)
                     + "\n\n![accuracy vs energy, Pareto front](benchmarks/results/pareto.png)")
    rows = runner.read_csv_rows(out_dir / "other_models.csv")
    if rows:
        parts.append("#### CIFAR-100 and ImageNet models (`python benchmarks/other_models.py`)\n\n"
                     + other_models.tables(rows))
    rows = runner.read_csv_rows(out_dir / "training_time.csv")
    if rows:
        parts.append("#### PTQ and QAT wall time (`python benchmarks/training_time.py`)\n\n" + training_time.tables(rows))
    rows = runner.read_csv_rows(out_dir / "cim_layer_speed_cpu.csv")
    if rows:
        headers = ["conv", "arrays", "cycles", "conv fwd ms", "CIM fwd ms", "fwd ratio", "fwd+bwd ratio", "peak MiB",
                   "compiled fwd ms", "compiled fwd ratio", "compiled fwd+bwd ratio", "compiled peak MiB", "compile s"]
        parts.append("#### CIM layer speed, CPU (`python benchmarks/cim_layer_speed.py`)\n\n" + runner.markdown_table(
            rows, list(rows[0]), headers[: len(rows[0])]))
    return "\n\n".join(parts)


def update_readme(readme: Path, section: str) -> None:
    """Replace the text between the suite markers of ``readme`` by ``section`` (atomically)."""
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{readme} has no {BEGIN} ... {END} markers to write the suite's results between")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    temporary = readme.with_name(f".{readme.name}.tmp")
    temporary.write_text(f"{head}{BEGIN}\n{section}\n{END}{tail}")
    os.replace(temporary, readme)


def main(argv: Optional[list[str]] = None) -> str:
    from cimq_pl.cost.tables import write_csv_atomic

    parser = runner.base_parser(__doc__.split("\n")[0])
    parser.add_argument("--report-only", action="store_true", help="only re-render the README section")
    parser.add_argument("--only", nargs="+", default=None, help="run only these scripts (e.g. ablation.py)")
    args = parser.parse_args(argv)
    runner.prepare(args)
    here = Path(__file__).resolve().parent
    if not args.report_only:
        times = {r["script"]: r for r in runner.read_csv_rows(args.out_dir / "suite_times.csv")}
        info = {"machine": runner.machine(), "date": datetime.date.today().isoformat()}
        (args.out_dir / "suite_info.json").write_text(json.dumps(info, indent=1) + "\n")
        for script, takes_work_dir in SCRIPTS:
            if args.only and script not in args.only:
                continue
            command = [sys.executable, str(here / script), "--out-dir", str(args.out_dir),
                       *(["--work-dir", str(args.work_dir)] if takes_work_dir else []),
                       *(["--smoke"] if args.smoke else [])]
            print(f"[suite] {script}", flush=True)
            start = time.perf_counter()
            subprocess.run(command, check=True)
            seconds = time.perf_counter() - start
            times[script] = {"script": script, "command": f"python benchmarks/{script}" + (" --smoke" if args.smoke else ""),
                             "seconds": f"{seconds:.0f}"}
            write_csv_atomic(args.out_dir / "suite_times.csv", list(times.values()), TIME_COLUMNS)
    section = render(args.out_dir, iters=2 if args.smoke else 100)
    if args.smoke or args.out_dir.resolve() != runner.RESULTS.resolve():
        (args.out_dir / "SUITE.md").write_text(section + "\n")
    else:
        update_readme(runner.REPO / "README.md", section)
    print(section)
    return section


if __name__ == "__main__":
    main()
