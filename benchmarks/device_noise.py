"""Real devices: accuracy (mean +- std over chip samples) of conventional quantization, CIMQ and noise-aware CIMQ
on chips with programming variation, stuck-at cells and conductance drift (ResNet-20, W4A4, 128x128 arrays, ADC 4).

Each method is fit once through the project's CLI (`runner.cli`, the configs users run): conventional
(``configs/quant/conventional.yaml``, calibration only), CIMQ PTQ (``cimq_ptq.yaml``, ``--iters`` steps per unit),
noise-aware CIMQ PTQ (the same + `NoiseAwareTraining` on the training device: programming sigma 5%, 0.1%
stuck-at cells) and, with ``--qat``, noise-aware CIMQ QAT (``cimq_qat.yaml`` from the noise-aware PTQ checkpoint,
3 epochs at learning rate 1e-4: the recipe measured best on the earlier preset; see ``QAT_RECIPE``). Each fitted network is then tested (``test`` with `MonteCarloDevices`: ``--samples`` chips, seeds
0, 1, ...) on the first ``--images`` test images of ``cifar10_lossless`` under every device condition:

* programming sigma 0, 2, 5, 10% (``sigma`` sweep);
* stuck-at cells 0, 0.1, 1% (half stuck at g_off, half at g_on; ``stuck`` sweep), and the same with the stuck cells
  programmed around (``DeviceSpec.stuck_compensation``; ``stuck_compensated`` sweep);
* sigma 5% with 0.1% stuck-at cells (``target``: the issue's target condition), and the same programmed around
  (``target_compensated``);
* drift, nu = 0.05 +- 0.01 (aihwkit's PCM fit for cells above a quarter of g_max), read 1 s, 1 h, 1 day and 1 year
  after programming, without and with global drift compensation (``drift`` and ``drift_compensated``).

The equivalent command of one cell: ``python -m cimq_pl test --config configs/resnet20_cifar10.yaml --config
<the method's config> --ckpt_path <its checkpoint> --model.device.programming_sigma 0.05
--trainer.callbacks+=MonteCarloDevices --trainer.callbacks.samples 10``. Writes ``device_noise-<preset>.csv``
(``<preset>``: the CIMQ preset's row name and the steps per unit, e.g. ``cimq15d-iters400``, so that a changed
preset is measured again; one row per method, condition and time; a stopped run resumes: rows already there are
not measured again, the fitted checkpoints of the same preset are reused) and ``device_noise.png`` (three
panels), and prints the tables and the issue's target.

    python benchmarks/device_noise.py                          # 10 chips, 1,000 images, 400 steps/unit: ~2 h 15 min
    python benchmarks/device_noise.py --samples 5 --images 500 # about a quarter of the evaluation time
    python benchmarks/device_noise.py --qat                    # + noise-aware QAT (3 epochs at 1e-4): ~3 h
    python benchmarks/device_noise.py --conditions ideal,target # the issue's target condition only (rows add up)
    python benchmarks/device_noise.py --qat --qat-lr 1e-3 --qat-epochs 1   # another QAT recipe: its own CSV
    python benchmarks/device_noise.py --methods cimq,cimq_qat_noise_aware  # only these (QAT starts from the
                                                               # noise-aware PTQ checkpoint of an earlier run)
    python benchmarks/device_noise.py --quick                  # smoke, ~1 min: 24 images, 2 chips, 1 step/unit
"""

from __future__ import annotations

import csv
import dataclasses
import math
import time
from pathlib import Path
from typing import Optional

import yaml

from runner import (REPO, ROW_KEY_NAMES, Setting, base_parser, cli, derived_config, markdown_table, prepare,
                    preset_iters)

YEAR = 365 * 86400
TIMES = (1.0, 3600.0, 86400.0, float(YEAR))
# aihwkit's PCMLikeNoiseModel fit: nu = 0.049 +- 0.008 at g_max, 0.049 +- 0.011 at g_max / 4, 0.060 +- 0.023 at g_max / 10
NU = dict(drift_nu_mean=0.05, drift_nu_std=0.01)
TRAINING_DEVICE = dict(programming_sigma=0.05, stuck_off_prob=0.0005, stuck_on_prob=0.0005)  # the target condition
METHODS = {  # name -> (runner row, label)
    "conventional": ("conventional", "conventional quantization (calibration only)"),
    "cimq": ("cimq", "CIMQ PTQ"),
    "cimq_noise_aware": ("cimq", "noise-aware CIMQ PTQ (sigma 5%, 0.1% stuck-at)"),
    "cimq_qat_noise_aware": ("cimq_qat", "noise-aware CIMQ QAT from the noise-aware PTQ"),
}
# QAT's learning rate and epochs for --qat: on the 100-step preset 1e-4 x 3 epochs beat cimq_qat.yaml's 1e-3 x 1 epoch
# (0.651 against 0.565 at the target condition; benchmarks/results/device_noise-cimq-iters100*.csv)
QAT_RECIPE = {"lr": 1e-4, "epochs": 3}
TARGETS = {"target": "sigma 5% + 0.1% stuck", "target_compensated": "the same, stuck cells programmed around"}
CALIBRATED = "+cal"  # a method's name with this and a count: its chips calibrated on that many images before testing


def base_method(method: str) -> str:
    """The fitted method of a row's method name (``cimq+cal256`` -> ``cimq``)."""
    return method.split(CALIBRATED)[0]


def method_label(method: str) -> str:
    """How a method (or its chip-calibrated variant) is named in the tables and the plot."""
    base, _, images = method.partition(CALIBRATED)
    return METHODS[base][1] + (f" + chip calibration ({images} images)" if images else "")


COLUMNS = ("key", "method", "condition", "sweep", "value", "time_s", "drift_compensation", "samples", "images",
           "acc_mean", "acc_std", "acc_min", "acc_max", "eval_seconds", "fit_seconds", "device")


@dataclasses.dataclass(frozen=True)
class Condition:
    """One device condition: the sweep it belongs to, its x value, the device fields and the read times."""

    name: str
    sweep: str
    value: float
    device: dict
    times: tuple = (0.0,)

    @property
    def random(self) -> bool:
        """Whether chips differ (else one sample is the exact answer)."""
        return any(self.device.get(k, 0) for k in ("programming_sigma", "stuck_off_prob", "stuck_on_prob",
                                                    "drift_nu_std", "read_sigma", "adc_noise_lsb", "adc_offset_lsb",
                                                    "adc_gain_sigma"))


def conditions(quick: bool) -> list[Condition]:
    """The device conditions of the benchmark (fewer with ``quick``)."""
    sigmas = () if quick else (0.02, 0.05, 0.10)  # quick: the target condition has sigma 5%
    stucks = (0.01,) if quick else (0.001, 0.01)
    times = (float(YEAR),) if quick else TIMES
    out = [Condition("ideal", "ideal", 0.0, {})]
    out += [Condition(f"sigma{s:g}", "sigma", s, {"programming_sigma": s}) for s in sigmas]
    out += [Condition(f"stuck{r:g}", "stuck", r, {"stuck_off_prob": r / 2, "stuck_on_prob": r / 2}) for r in stucks]
    out += [Condition(f"stuck{r:g}_compensated", "stuck_compensated", r,
                      {"stuck_off_prob": r / 2, "stuck_on_prob": r / 2, "stuck_compensation": True}) for r in stucks]
    out.append(Condition("target", "target", 0.05, dict(TRAINING_DEVICE)))
    if not quick:
        out.append(Condition("target_compensated", "target", 0.05, {**TRAINING_DEVICE, "stuck_compensation": True}))
    out.append(Condition("drift", "drift", 0.0, dict(NU), times))  # nu_std > 0: chips differ
    out.append(Condition("drift_compensated", "drift", 1.0, {**NU, "drift_compensation": True}, times))
    return out


def method_config(method: str, iters: int, training_ckpt: Optional[Path], qat: Optional[dict] = None) -> dict:
    """The method's technique config (runner's derived config), without the hardware report, plus the device
    training and its callback for the noise-aware methods; ``qat`` ({"lr": .., "epochs": ..}) overrides the QAT
    config's learning rate and epochs."""
    row, _ = METHODS[method]
    setting = Setting("resnet20", row, weight_bits=4, input_bits=4, adc_bits=4,
                      iters=iters if row == "cimq" else None)
    config = derived_config(setting)
    callbacks = [c for c in config["trainer"]["callbacks"] if not c["class_path"].endswith("HardwareReport")]
    if method.endswith("noise_aware"):
        config["model"]["device"] = dict(TRAINING_DEVICE)
        callbacks.insert(0, {"class_path": "cimq_pl.callbacks.NoiseAwareTraining"})
    if method == "cimq_qat_noise_aware":
        if qat:
            config["model"]["lr"] = qat["lr"]
            config.setdefault("trainer", {})["max_epochs"] = qat["epochs"]
        for callback in callbacks:
            if callback["class_path"].endswith("QuantizationAwareTraining"):
                callback.setdefault("init_args", {})["init_from"] = str(training_ckpt)
    config["trainer"]["callbacks"] = callbacks
    return config


def _build(method: str, config: dict, work_dir: Path, extra: list[str]):
    path = work_dir / f"device_noise-{method}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    from runner import LOSSLESS, MODEL_CONFIGS

    args = ["--config", MODEL_CONFIGS["resnet20"], "--config", str(path), "--data.init_args.root", str(LOSSLESS),
            "--trainer.logger.init_args.save_dir", str(work_dir), "--trainer.enable_progress_bar", "false",
            "--trainer.limit_val_batches", "0", *extra]
    return cli(args)


def fit(built, method: str, checkpoint: Path) -> float:
    """Fit ``method`` (the built CLI) and save its network to ``checkpoint``; the fit seconds (0 when reused)."""
    if checkpoint.is_file():
        print(f"[bench] {method}: reusing {checkpoint}", flush=True)
        return 0.0
    print(f"[bench] fitting {method}", flush=True)
    start = time.perf_counter()
    built.trainer.fit(built.model, datamodule=built.datamodule)
    seconds = round(time.perf_counter() - start, 1)
    built.trainer.save_checkpoint(checkpoint)
    return seconds


def evaluate(built, method: str, checkpoint: Path, todo: list[Condition], samples: int,
             calibration_images: int = 0) -> list[dict]:
    """Test ``checkpoint`` on every condition of ``todo`` with `MonteCarloDevices`; one row per condition and time
    (``calibration_images``: every chip calibrated first, `MonteCarloDevices.calibration_images`).

    Each condition sets ``model.device`` (every field, as ``--model.device`` on the command line) and runs
    ``trainer.test`` from the checkpoint with a fresh `MonteCarloDevices` (one chip when chips cannot differ).
    """
    from cimq_pl.callbacks import MonteCarloDevices
    from cimq_pl.quant import DeviceSpec, attach_device_

    trainer, module, datamodule = built.trainer, built.model, built.datamodule
    base = list(trainer.callbacks)
    rows = []
    for condition in todo:
        spec = DeviceSpec(**condition.device)
        module.device_spec = spec
        attach_device_(module.model, spec, mode="ideal")
        monte_carlo = MonteCarloDevices(samples=samples if condition.random else 1, times=list(condition.times), seed=0,
                                        calibration_images=calibration_images)
        trainer.callbacks = [*base, monte_carlo]
        start = time.perf_counter()
        trainer.test(module, datamodule=datamodule, ckpt_path=str(checkpoint), verbose=False, weights_only=True)
        seconds = round(time.perf_counter() - start, 1)
        for summary in monte_carlo.summary:
            rows.append({"key": f"{method}-{condition.name}-t{summary['time_s']:g}", "method": method,
                         "condition": condition.name, "sweep": condition.sweep, "value": condition.value,
                         "time_s": summary["time_s"], "drift_compensation": spec.drift_compensation,
                         "samples": summary["samples"], "images": summary["images"],
                         **{k: round(summary[k], 4) for k in ("acc_mean", "acc_std", "acc_min", "acc_max")},
                         "eval_seconds": round(seconds / len(monte_carlo.summary), 1),
                         "device": spec.describe()})
            print(f"[bench]   {method} {condition.name} t={summary['time']}: {summary['acc_mean']:.4f} +- "
                  f"{summary['acc_std']:.4f} ({summary['samples']} chips, {seconds} s)", flush=True)
    trainer.callbacks = base
    return rows


# ------------------------------------------------------------------ results
def _read(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    with open(path, newline="") as stream:
        return {row["key"]: row for row in csv.DictReader(stream)}


def _cell(row: Optional[dict]) -> str:
    if row is None:
        return ""
    return f"{float(row['acc_mean']):.3f} +- {float(row['acc_std']):.3f}"


def tables(rows: list[dict], methods: list[str]) -> str:
    """Markdown: accuracy (mean +- std over chips) per method against sigma, stuck-at rate and time."""
    def find(method, condition, time_s=0.0):
        return next((r for r in rows if r["method"] == method and r["condition"] == condition
                     and float(r["time_s"]) == time_s), None)

    labels = {name: method_label(name) for name in methods}
    out = []
    sweeps = (("programming sigma", "sigma", lambda v: f"{float(v):.0%}"),
              ("stuck-at cells", "stuck", lambda v: f"{float(v):.1%}"),
              ("stuck-at cells, programmed around (stuck_compensation)", "stuck_compensated",
               lambda v: f"{float(v):.1%}"))
    for title, sweep, fmt in sweeps:
        names = ["ideal"] + sorted({r["condition"] for r in rows if r["sweep"] == sweep},
                                   key=lambda n: float(next(r["value"] for r in rows if r["condition"] == n)))
        values = ["0%"] + [fmt(next(r["value"] for r in rows if r["condition"] == n)) for n in names[1:]]
        lines = [{"method": labels[m], **{v: _cell(find(m, n)) for n, v in zip(names, values)}} for m in methods]
        out.append(f"**accuracy against {title}** (mean +- std over chips)\n\n"
                   + markdown_table(lines, ["method", *values]))
    times = sorted({float(r["time_s"]) for r in rows if r["sweep"] == "drift"})
    if times:
        from cimq_pl.callbacks.monte_carlo import time_label

        heads = [time_label(t) for t in times]
        lines = []
        for m in methods:
            for name, label in (("drift", "no compensation"), ("drift_compensated", "global drift compensation")):
                lines.append({"method": f"{labels[m]}, {label}",
                              **{h: _cell(find(m, name, t)) for h, t in zip(heads, times)}})
        out.append(f"**accuracy against time after programming** (nu = {NU['drift_nu_mean']} +- "
                   f"{NU['drift_nu_std']})\n\n" + markdown_table(lines, ["method", *heads]))
    lines = [{"method": labels[m], **{name: _cell(find(m, name)) for name in TARGETS}} for m in methods]
    out.append("**the target condition** (sigma 5%, 0.1% stuck-at cells)\n\n"
               + markdown_table(lines, ["method", *TARGETS], ["method", *TARGETS.values()]))
    return "\n\n".join(out)


def targets(rows: list[dict]) -> list[dict]:
    """The issue's targets at sigma 5% and 0.1% stuck-at cells, measured (empty when a number is missing): every
    method and variant (chips calibrated, stuck cells programmed around) against plain CIMQ on the plain target."""
    acc = {(r["method"], r["condition"]): float(r["acc_mean"]) for r in rows if float(r["time_s"]) == 0.0}
    out = []
    for method in sorted(m for m in {r["method"] for r in rows} if base_method(m) != "conventional"):
        for condition in TARGETS:
            needed = [("cimq", "ideal"), ("cimq", "target"), (method, "ideal"), (method, condition)]
            if (method, condition) == ("cimq", "target") or not all(key in acc for key in needed):
                continue
            name = method + ("" if condition == "target" else " (stuck cells programmed around)")
            lost = acc["cimq", "ideal"] - acc["cimq", "target"]
            recovered = acc[method, condition] - acc["cimq", "target"]
            own_drop = acc[method, "ideal"] - acc[method, condition]
            out.append({"target": f"{name}: keeps >= half of what CIMQ loses to the noise",
                        "measured": f"CIMQ loses {lost:.3f}; {name} recovers {recovered:.3f}",
                        "met": "yes" if lost <= 0 or recovered >= 0.5 * lost else "**no**"})
            out.append({"target": f"{name}: within 2 points of its own noiseless accuracy",
                        "measured": f"{acc[method, 'ideal']:.3f} -> {acc[method, condition]:.3f} "
                                    f"({own_drop * 100:.1f} points)",
                        "met": "yes" if own_drop <= 0.02 else "**no**"})
    return out


def plot(rows: list[dict], methods: list[str], path: Path) -> Path:
    """Three panels: accuracy against sigma, stuck-at rate and time (solid: compensated), error bars = std."""
    from cimq_pl.cost.plots import new_figure, save_figure

    figure = new_figure(13, 4)
    panels = [figure.add_subplot(1, 3, i + 1) for i in range(3)]
    colors = dict(zip(METHODS, ("tab:gray", "tab:blue", "tab:green", "tab:red")))
    for method in methods:
        color, label = colors[base_method(method)], method_label(method)
        mine = [r for r in rows if r["method"] == method]
        ideal = [r for r in mine if r["condition"] == "ideal"]
        for axes, sweep, suffix in ((panels[0], "sigma", ""), (panels[1], "stuck", ""),
                                    (panels[1], "stuck_compensated", ", programmed around")):
            points = sorted([(0.0, r) for r in ideal] + [(float(r["value"]), r) for r in mine if r["sweep"] == sweep],
                            key=lambda p: p[0])
            if len(points) > 1:
                axes.errorbar([x * 100 for x, _ in points], [float(r["acc_mean"]) for _, r in points],
                              yerr=[float(r["acc_std"]) for _, r in points], marker="o", capsize=3, color=color,
                              label=label + suffix,
                              linestyle=":" if CALIBRATED in method else "--" if suffix else "-")
        for name, style in (("drift_compensated", "-"), ("drift", "--")):
            points = sorted([(float(r["time_s"]), r) for r in mine if r["condition"] == name], key=lambda p: p[0])
            if points:
                panels[2].errorbar([x for x, _ in points], [float(r["acc_mean"]) for _, r in points],
                                   yerr=[float(r["acc_std"]) for _, r in points], marker="o", capsize=3,
                                   linestyle=style, color=color,
                                   label=f"{label}{'' if style == '-' else ', uncompensated'}")
    titles = (("programming sigma (%)", "conductance variation"), ("stuck-at cells (%)", "stuck-at faults"),
              ("seconds after programming", f"drift, nu {NU['drift_nu_mean']} +- {NU['drift_nu_std']}"))
    for axes, (xlabel, title) in zip(panels, titles):
        axes.set_xlabel(xlabel)
        axes.set_ylabel("top-1 accuracy, mean +- std over chips")
        axes.set_title(f"ResNet-20 W4A4 ADC 4: {title}", fontsize=9)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=6)
    panels[2].set_xscale("log")
    figure.tight_layout()
    return save_figure(figure, path)


def _names(parser, flag: str, value: str, known: list[str]) -> list[str]:
    """The comma-separated names of ``flag``; an unknown name (or none) is a parser error listing the known ones."""
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = sorted(set(names) - set(known))
    if unknown or not names:
        parser.error(f"{flag}={value!r}: unknown {', '.join(unknown) or '(none given)'}; known: {', '.join(known)}")
    return names


def main(argv: Optional[list[str]] = None) -> list[dict]:
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="~1-2 minute smoke run (same as --smoke)")
    parser.add_argument("--samples", type=int, default=10, help="chips per condition (default 10)")
    parser.add_argument("--images", type=int, default=1000,
                        help="first test images (default 1000: all of cifar10_lossless; rounded up to whole batches)")
    preset_steps = preset_iters()
    parser.add_argument("--iters", type=int, default=preset_steps,
                        help=f"PTQ steps per unit ({preset_steps}: the CPU preset's, cimq_ptq.yaml)")
    parser.add_argument("--qat", action="store_true", help="also noise-aware QAT (from the noise-aware PTQ)")
    parser.add_argument("--qat-lr", type=float, default=QAT_RECIPE["lr"],
                        help=f"QAT learning rate (default {QAT_RECIPE['lr']:g}; another recipe gets its own CSV)")
    parser.add_argument("--qat-epochs", type=int, default=QAT_RECIPE["epochs"],
                        help=f"QAT epochs (default {QAT_RECIPE['epochs']}; another recipe gets its own CSV)")
    parser.add_argument("--calibrate-chips", type=int, default=0,
                        help="also test every method with its chips calibrated on this many calibration images "
                             "(MonteCarloDevices.calibration_images; rows '<method>+cal<N>'); 0: not")
    parser.add_argument("--methods", default=None,
                        help=f"comma-separated methods to measure (default: all but QAT, which --qat adds): "
                             f"{', '.join(METHODS)}")
    parser.add_argument("--conditions", default=None,
                        help="comma-separated condition names to measure (default: all): ideal, sigma0.02, sigma0.05, "
                             "sigma0.1, stuck0.001, stuck0.01, stuck0.001_compensated, stuck0.01_compensated, target, "
                             "target_compensated, drift, drift_compensated; "
                             "'ideal,target' measures the issue's target first")
    args = parser.parse_args(argv)
    quick = args.quick or args.smoke
    args.smoke = False  # the shrink below replaces runner's smoke arguments
    prepare(args)
    samples, images, iters = (2, 24, 1) if quick else (args.samples, args.images, args.iters)
    batch = min(250, math.ceil(images / 2))  # >= 2 batches: Lightning reads limit_test_batches 1 as "all" (1.0)
    batches = math.ceil(images / batch)
    if batch * batches != images:
        images = min(batch * batches, 1000)
        print(f"[bench] testing on {images} images ({batches} batches of {batch})", flush=True)
    extra = ["--data.init_args.eval_batch_size", str(batch), "--trainer.limit_test_batches", str(batches)]
    if quick:
        extra += ["--data.init_args.calibration_size", "32", "--data.init_args.num_workers", "0"]
    qat_extra = ["--trainer.limit_train_batches", "2"] if quick else []  # QAT only: PTQ's epoch is units x steps
    methods = ["conventional", "cimq", "cimq_noise_aware"] + (["cimq_qat_noise_aware"] if args.qat else [])
    if args.methods:
        methods = _names(parser, "--methods", args.methods, list(METHODS))
    work = args.work_dir / ("device_noise_quick" if quick else "device_noise")
    work.mkdir(parents=True, exist_ok=True)
    preset = f"{ROW_KEY_NAMES['cimq']}-iters{iters}"  # rows and checkpoints of another preset are not reused
    store = args.out_dir / f"device_noise-{preset}.csv"
    done = _read(store)
    from cimq_pl.cost.tables import write_csv_atomic

    grid = conditions(quick)
    if args.conditions:
        wanted = _names(parser, "--conditions", args.conditions, [c.name for c in grid])
        grid = [c for c in grid if c.name in wanted]
    qat = {"lr": args.qat_lr, "epochs": args.qat_epochs}
    if qat != QAT_RECIPE:  # another QAT recipe: its own checkpoint and CSV
        store = args.out_dir / f"device_noise-{preset}_qat-lr{qat['lr']:g}-epochs{qat['epochs']}.csv"
        done = {**{k: v for k, v in done.items() if not k.startswith("cimq_qat_noise_aware")}, **_read(store)}
    training_ckpt = work / f"cimq_noise_aware-{preset}.ckpt"
    if "cimq_qat_noise_aware" in methods and "cimq_noise_aware" not in methods and not training_ckpt.is_file():
        parser.error(f"--methods: cimq_qat_noise_aware starts from the noise-aware PTQ checkpoint {training_ckpt}, "
                     "which does not exist yet: list cimq_noise_aware too")
    for method in methods:
        suffix = f"-lr{qat['lr']:g}-epochs{qat['epochs']}" if method == "cimq_qat_noise_aware" else ""
        checkpoint = work / f"{method}-{preset}{suffix}.ckpt"
        config = method_config(method, iters, training_ckpt, qat)
        variants = {method: 0, **({f"{method}{CALIBRATED}{args.calibrate_chips}": args.calibrate_chips}
                                  if args.calibrate_chips else {})}
        todo = {name: [c for c in grid if not all(f"{name}-{c.name}-t{t:g}" in done and
                                                  int(done[f"{name}-{c.name}-t{t:g}"]["images"]) == images
                                                  for t in c.times)] for name in variants}
        if not any(todo.values()):
            print(f"[bench] {method}: every condition already in {store}", flush=True)
            continue
        built = _build(method, config, work, extra + (qat_extra if method == "cimq_qat_noise_aware" else []))
        fit_seconds = fit(built, method, checkpoint)
        for name, calibration_images in variants.items():
            for row in evaluate(built, name, checkpoint, todo[name], samples, calibration_images):
                row["fit_seconds"] = fit_seconds
                done[row["key"]] = row
                write_csv_atomic(store, list(done.values()), COLUMNS)
    methods = [name for method in methods for name in
               [method, *([f"{method}{CALIBRATED}{args.calibrate_chips}"] if args.calibrate_chips else [])]]
    rows = [row for row in done.values() if row["method"] in methods]
    print("\n" + tables(rows, methods))
    measured = targets(rows)
    if measured:
        print("\n" + markdown_table(measured, ["target", "measured", "met"]))
    picture = plot(rows, methods, args.out_dir / "device_noise.png")
    print(f"\nwrote {store} and {picture}")
    return rows


if __name__ == "__main__":
    main()
