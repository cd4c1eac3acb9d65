"""The paper-style ablation: FP, conventional PTQ, each CIMQ technique alone, all four, plain QDrop.

Every row is a technique config of ``configs/quant/`` on a model config, measured by `runner.measure`
(the CLI's fit + test) on ``cifar10_lossless`` test (1,000 images); the rows marked in the grid are also
tested on ``cifar10_jpeg`` test (10,000 images). Prints one markdown table per model and precision, writes
``ablation.csv`` and ``ablation.png`` (accuracy against ADC bits).

    python benchmarks/ablation.py                   # the suite grid (ResNet-20 and ResNet-32), ~75 min on 2 cores
    python benchmarks/ablation.py --models resnet20 # one model
    python benchmarks/ablation.py --smoke           # seconds: tiny data, 2 steps per unit

Reconstruction rows (qdrop, cimq, qdrop_no_cim) use ``--iters`` steps of 32 images per unit (default 100,
a quarter of the 400 of the CPU preset ``configs/quant/cimq_ptq.yaml``, so that the suite fits in 2 hours on 2 cores).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from runner import ROW_LABELS, ResultStore, Setting, base_parser, markdown_table, prepare, run_settings

CALIBRATION_ROWS = ("conventional", "arraywise", "bit_sparse", "psum_clipping")
TABLE_ROWS = ("fp", *CALIBRATION_ROWS, "qdrop", "cimq", "qdrop_no_cim")
ADC_BITS = (8, 5, 4, 3)


def suite_grid(model: str, iters: int) -> list[tuple[Setting, bool]]:
    """``(setting, test on JPEG too)`` pairs of the suite: what fits in the 2-hour budget on 2 cores.

    ResNet-20: W4A4 at ADC 8/5/4/3 for every calibration row and CIMQ, dropping alone at ADC 4, plain QDrop;
    W2A4 at ADC 4 for conventional, CIMQ and plain QDrop. ResNet-32: W4A4 at ADC 4, every row. JPEG: FP,
    conventional and CIMQ at W4A4/ADC 4.
    """
    w4 = dict(weight_bits=4, input_bits=4)
    grid: list[tuple[Setting, bool]] = [(Setting(model, "fp"), True)]
    adc_bits = ADC_BITS if model == "resnet20" else (4,)
    for adc in adc_bits:
        for row in (*CALIBRATION_ROWS, "cimq"):
            grid.append((Setting(model, row, **w4, adc_bits=adc, iters=iters if row == "cimq" else None),
                         adc == 4 and row in ("conventional", "cimq")))
    grid.append((Setting(model, "qdrop", **w4, adc_bits=4, iters=iters), False))
    grid.append((Setting(model, "qdrop_no_cim", **w4, iters=iters), False))
    if model == "resnet20":
        w2 = dict(weight_bits=2, input_bits=4)
        grid += [(Setting(model, "conventional", **w2, adc_bits=4), False),
                 (Setting(model, "cimq", **w2, adc_bits=4, iters=iters), False),
                 (Setting(model, "qdrop_no_cim", **w2, iters=iters), False)]
    return grid


def smoke_grid(iters: int) -> list[tuple[Setting, bool]]:
    """A few seconds' worth: FP (+JPEG), conventional at ADC 8 (equal to the baseline), CIMQ at ADC 4."""
    w4 = dict(weight_bits=4, input_bits=4)
    return [(Setting("resnet20", "fp"), True),
            (Setting("resnet20", "conventional", **w4, adc_bits=8), False),
            (Setting("resnet20", "cimq", **w4, adc_bits=4, iters=iters), True)]


def _cell(row: Optional[dict], name: str = "test/acc") -> str:
    if row is None or row.get(name, "") in ("", None):
        return ""
    return f"{float(row[name]):.3f}"


def tables(rows: list[dict]) -> str:
    """Markdown: one table per (model, precision); accuracy per ADC resolution, JPEG accuracy and cost at ADC 4."""
    out = []
    groups = sorted({(r["model"], str(r["weight_bits"]), str(r["input_bits"])) for r in rows if r["row"] != "fp"})
    for model, weight_bits, input_bits in groups:
        fp = next((r for r in rows if r["model"] == model and r["row"] == "fp"), None)
        present = [b for b in ADC_BITS if any(str(r["adc_bits"]) == str(b) and r["model"] == model
                                               and str(r["weight_bits"]) == weight_bits for r in rows)]
        lines = []
        for name in TABLE_ROWS:
            if name == "fp":
                if fp is not None:
                    lines.append({"row": ROW_LABELS["fp"], **{f"adc{b}": _cell(fp) for b in present},
                                  "jpeg": _cell(fp, "jpeg/acc")})
                continue
            mine = [r for r in rows if r["model"] == model and r["row"] == name
                    and str(r["weight_bits"]) == weight_bits and str(r["input_bits"]) == input_bits]
            if not mine:
                continue
            by_adc = {str(r["adc_bits"]): r for r in mine}
            at4 = by_adc.get("4") or by_adc.get("")
            line = {"row": ROW_LABELS[name], "jpeg": _cell(at4, "jpeg/acc"),
                    "energy": _cell(at4, "test/energy_per_image_uj"),
                    "efficiency": _cell(at4, "test/hw_efficiency_vs_baseline"),
                    "density": _cell(at4, "test/bit_density"), "fit": (at4 or {}).get("fit_seconds", "")}
            for b in present:
                line[f"adc{b}"] = _cell(by_adc.get(str(b)) or by_adc.get(""))
            lines.append(line)
        columns = ["row", *[f"adc{b}" for b in present], "jpeg", "energy", "efficiency", "density", "fit"]
        headers = ["setting", *[f"ADC {b}" for b in present], "JPEG 10k (ADC 4)", "uJ/image (ADC 4)",
                   "efficiency vs baseline", "bit density", "fit s"]
        out.append(f"**{model}, W{weight_bits}A{input_bits}** (test/acc on cifar10_lossless, 1,000 images; "
                   f"plain QDrop has an ideal ADC, the same number in every column)\n\n"
                   + markdown_table(lines, columns, headers))
    return "\n\n".join(out)


def plot(rows: list[dict], path: Path) -> Optional[Path]:
    """Accuracy against ADC bits for each row of every W4A4 model (PNG); None when nothing to draw."""
    from cimq_pl.cost.plots import new_figure, save_figure

    models = sorted({r["model"] for r in rows if str(r["weight_bits"]) == "4"})
    if not models:
        return None
    figure = new_figure(5.0 * len(models), 4.0)
    for index, model in enumerate(models, 1):
        axes = figure.add_subplot(1, len(models), index)
        for name in (*CALIBRATION_ROWS, "qdrop", "cimq"):
            points = sorted((int(r["adc_bits"]), float(r["test/acc"])) for r in rows
                            if r["model"] == model and r["row"] == name and str(r["weight_bits"]) == "4"
                            and str(r["adc_bits"]) != "")
            if points:
                axes.plot(*zip(*points), "o-", label=name)
        for name, style in (("fp", "k--"), ("qdrop_no_cim", "k:")):
            ref = [float(r["test/acc"]) for r in rows if r["model"] == model and r["row"] == name
                   and str(r["weight_bits"]) in ("", "4")]
            if ref:
                axes.axhline(ref[0], color="k", linestyle=style[1:], linewidth=1, label=name)
        axes.set(xlabel="ADC bits", ylabel="top-1 accuracy (cifar10_lossless)")
        axes.set_title(f"{model}, W4A4, 128x128 arrays", fontsize=9)
        axes.legend(fontsize=7)
    figure.tight_layout()
    return save_figure(figure, path)


def main(argv: Optional[list[str]] = None) -> list[dict]:
    parser = base_parser(__doc__.split("\n")[0], models=True)
    parser.add_argument("--iters", type=int, default=100, help="reconstruction steps per unit (suite preset: 100)")
    args = parser.parse_args(argv)
    extra = prepare(args)
    if args.smoke:
        grid = smoke_grid(iters=2)
    else:
        grid = [item for model in args.models for item in suite_grid(model, args.iters)]
    store = ResultStore(args.out_dir / "ablation.csv")
    rows = run_settings(grid, store, args.work_dir, extra)
    print("\n" + tables(rows))
    picture = plot(rows, args.out_dir / "ablation.png")
    print(f"\nwrote {store.path}" + (f" and {picture}" if picture else ""))
    return rows


if __name__ == "__main__":
    main()
