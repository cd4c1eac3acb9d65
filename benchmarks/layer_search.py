"""Per-layer ADC search against uniform ADC resolutions: ResNet-20 W4A4 on 128x128 arrays, CIMQ PTQ preset.

1. ``python -m cimq_pl search`` (run in process, the same CLI) on the CIMQ config, three times: at the energy per
   image of uniform ADC 4 (``--energy_budget adc_bits=4``), at the predicted loss of uniform ADC 5
   (``--loss_budget adc_bits=5``) and at 80% of uniform ADC 5's predicted energy (``--energy_budget
   0.8*adc_bits=5``), candidates ADC 3/4/5/6 on every layer; each writes its ``cim_overrides.yaml``.
2. CIMQ PTQ (`runner.measure`: fit + test on ``cifar10_lossless``, 1,000 images, with the `HardwareReport`) of
   uniform ADC 3/4/5/6 and of both searched assignments (the same config plus ``--config cim_overrides.yaml``).
   Uniform rows already in ``accuracy_levers.csv``/``sweeps.csv``/``ablation.csv`` for the same preset and budget
   are reused unless ``--fresh``.
   ``--assignments`` adds assignments given by hand (globs of layers at other ADC resolutions, the rest at the
   preset's ADC 4), fitted the same way: e.g. whole stages at ADC 3, to check a search against the obvious choices.
   ``--low-adc-steps 3=800`` gives the units that hold a layer at ADC 3 or less 800 reconstruction steps in the
   assignment fits (``BlockReconstruction(unit_iters=...)``), the others the preset's.
   ``--layers conv1,layer*`` lets the searches change the `int8` first conv's ideal ADC too (a uniform budget leaves
   it as configured, as uniform ADC 5 does).
   ``--calibration-size 4000`` fits every point (uniform, searched, given) on all 4,000 lossless train images
   instead of the config's 1,024 (`configs/quant/low_adc.yaml`'s calibration); its rows and points are kept apart.
3. A table with the issue's targets (at the energy of uniform ADC 4: >= 2 points more accuracy than it; at the
   accuracy of uniform ADC 5: >= 20% less energy; both the loss-budget and the 80%-energy searches are checked
   against it), ``layer_search.csv`` and ``layer_search.png`` (accuracy against
   energy per image, uniform points joined, searched points as stars).

    python benchmarks/layer_search.py              # ~25 min on 2 cores (3 new PTQ fits when the suite's rows exist)
    python benchmarks/layer_search.py --fresh      # ~45 min: every PTQ fit measured again
    python benchmarks/layer_search.py --quick      # a few minutes (4.5 min of CPU): tiny data, 1 step per unit,
                                                   # uniform ADC 4 and 5 only; checks the script, numbers are noise
                                                   # (with --budgets energy: uniform ADC 4 and one search, half that)
"""

from __future__ import annotations

import csv
import re
import time
from pathlib import Path
from typing import Iterable, NamedTuple, Optional

import yaml

from runner import (CONFIG_SEED, LOSSLESS, METRICS, MODEL_CONFIGS, SMOKE_ARGS, ResultStore, Setting, base_parser,
                    derived_config, machine, markdown_table, measure, merge_fits, prepare, preset_iters, row_key_name,
                    seeded)

UNIFORM_ADC = (3, 4, 5, 6)
PRESET_ITERS = preset_iters()  # cimq_ptq.yaml's reconstruction steps per unit, the --iters default
SAVING = 0.8  # the "saving" search's energy budget, as a fraction of uniform ADC 5's predicted energy
METRIC_NAMES = ("fisher", "kl", "mse")


class Budget(NamedTuple):
    """A search budget of the benchmark: the `search` option it sets and the uniform ADC resolution it is read from
    (its predicted energy or loss; with ``scaled``, the ``--saving`` fraction of its energy)."""

    flag: str
    uniform_adc: int
    scaled: bool = False

    def value(self, saving: float) -> str:
        """The option's value, e.g. ``adc_bits=4`` or ``0.8*adc_bits=5``."""
        return f"{saving:g}*adc_bits={self.uniform_adc}" if self.scaled else f"adc_bits={self.uniform_adc}"


BUDGETS = {"energy": Budget("energy_budget", 4), "accuracy": Budget("loss_budget", 5),
           "saving": Budget("energy_budget", 5, scaled=True)}
LABELS = {"energy": "searched at the energy of uniform ADC 4", "accuracy": "searched at the loss of uniform ADC 5",
          "saving": "searched at 80% of uniform ADC 5's energy"}
COLUMNS = ("key", "point", "adc_bits", "iters", "seed", "calibration_size", "search_images", *METRICS, "fit_seconds",
           "test_seconds", "search_seconds", "predicted_energy_uj", "assignment", "unit_iters", "config")
QUICK_ARGS = SMOKE_ARGS  # tiny data; no validation inside the fits (it would read the whole test split)


class SearchOptions(NamedTuple):
    """What a search of the benchmark changes from the defaults (each one carried by its row keys, folders and
    label): the sensitivity metric, the ADC resolutions a layer may take, the saving budget's fraction, the uniform
    PTQ network it starts from (None: the calibrated one) and the layers it searches (None: those in ``cim``
    mode; e.g. ``("conv1", "layer*")`` to let the `int8` first conv's ideal ADC go down too)."""

    metric: str = "fisher"
    candidates: tuple = UNIFORM_ADC
    saving: float = SAVING
    from_ptq: Optional[int] = None
    layers: Optional[tuple] = None
    layer_candidates: Optional[str] = None  # search --layer_candidates, a YAML mapping, e.g. "{conv1: {input_bits: [7, 8]}}"

    def suffix(self, kind: str = "") -> str:
        """Row keys and folders of a search with other options than the defaults carry them."""
        suffix = "" if self.metric == "fisher" else f"-{self.metric}"
        if self.from_ptq is not None:
            suffix += f"-from-adc{self.from_ptq}"
        if tuple(self.candidates) != UNIFORM_ADC:
            suffix += "-adc" + "".join(map(str, self.candidates))
        if kind == "saving" and self.saving != SAVING:
            suffix += f"-budget{self.saving:g}"
        if self.layers is not None:
            suffix += "-layers_" + "_".join(_glob_name(pattern) for pattern in self.layers)
        if self.layer_candidates is not None:
            suffix += "-own_" + re.sub(r"[^A-Za-z0-9.]+", "_", _glob_name(self.layer_candidates)).strip("_")
        return suffix

    def label(self, kind: str) -> str:
        """How a search is named in the tables: its budget, then what differs from the defaults."""
        text = LABELS[kind] if kind != "saving" else f"searched at {100 * self.saving:g}% of uniform ADC 5's energy"
        notes = [self.metric] if self.metric != "fisher" else []
        if self.from_ptq is not None:
            notes.append(f"from the ADC-{self.from_ptq} PTQ network")
        if tuple(self.candidates) != UNIFORM_ADC:
            notes.append("ADC " + "/".join(map(str, self.candidates)))
        if self.layers is not None:
            notes.append("layers " + ", ".join(self.layers))
        if self.layer_candidates is not None:
            notes.append(f"own candidates {self.layer_candidates}")
        return text + (f" ({', '.join(notes)})" if notes else "")


def _glob_name(pattern: str) -> str:
    """A layer glob as a file-name piece (``layer1.*`` -> ``layer1.all``)."""
    return pattern.replace("*", "all").replace("?", "any")


def _fit_name(iters: int, calibration_size: Optional[int], adc_bits: Iterable[Optional[int]] = ()) -> str:
    """The key piece of the fits' budget: the preset's version (`runner.row_key_name` for the ADC resolutions
    ``adc_bits`` its layers may have, so that a changed preset measures again), its steps per unit and, where not the
    model config's 1,024, its calibration images."""
    images = "" if calibration_size is None else f"-calibration{calibration_size}"
    return f"{row_key_name('cimq', adc_bits)}-iters{iters}{images}"


def searched_key(kind: str, iters: int, images: int, options: SearchOptions = SearchOptions(),
                 calibration_size: Optional[int] = None) -> str:
    """Row key of a searched assignment (its fits' budget as `_fit_name`, as the uniform rows' keys name theirs)."""
    own = yaml.safe_load(options.layer_candidates) if options.layer_candidates else {}
    candidates = [*options.candidates, *(bits for fields in own.values() for bits in fields.get("adc_bits", []))]
    return f"searched-{kind}-{_fit_name(iters, calibration_size, candidates)}-images{images}{options.suffix(kind)}"


def _uniform(adc: int, iters: int, seed: int = CONFIG_SEED, calibration_size: Optional[int] = None) -> Setting:
    return seeded(Setting("resnet20", "cimq", weight_bits=4, input_bits=4, adc_bits=adc, iters=iters,
                          calibration_size=calibration_size), seed)


def _seed_suffix(seed: int) -> str:
    """What a fit with another seed than the config's adds to a row key (as `runner.Setting.key` does)."""
    return "" if seed == CONFIG_SEED else f"-seed{seed}"


def _point_key(key: str) -> str:
    """A row key without its seed: the fits of one point (uniform setting or searched assignment) share it."""
    return re.sub(r"-seed\d+$", "", key)


def run_search(kind: str, iters: int, images: int, work_dir: Path, extra: list[str],
               options: SearchOptions = SearchOptions(), init_from: Optional[Path] = None) -> dict:
    """One ``python -m cimq_pl search`` (in process) on the CIMQ config at budget ``kind``, every searched layer
    (``options.layers``) choosing among the ADC resolutions ``options.candidates``, from the PTQ checkpoint
    ``init_from`` of uniform ADC ``options.from_ptq`` when given; returns the written ``cim_overrides.yaml``, the
    wall time, the predicted energy and the assignment."""
    import sys

    import wandb

    from cimq_pl.cli import CIMQCLI

    setting = _uniform(4 if options.from_ptq is None else options.from_ptq, iters)  # a checkpoint must match its config
    derived = work_dir / f"{setting.key}.yaml"
    derived.parent.mkdir(parents=True, exist_ok=True)
    derived.write_text(yaml.safe_dump(derived_config(setting), sort_keys=False))
    flag, value = BUDGETS[kind].flag, BUDGETS[kind].value(options.saving)
    output = work_dir / f"search-{kind}-images{images}{options.suffix(kind)}"
    args = ["search", "--config", MODEL_CONFIGS["resnet20"], "--config", str(derived),
            "--data.init_args.root", str(LOSSLESS), "--trainer.enable_progress_bar", "false",
            "--candidates", "{adc_bits: [" + ", ".join(map(str, options.candidates)) + "]}", f"--{flag}", value,
            "--images", str(images), "--metric", options.metric, "--verify", "false", "--output_dir", str(output),
            *extra]
    if options.layers is not None:  # a uniform budget leaves int8 edge layers as configured (search.layers)
        args += ["--layers", "[" + ", ".join(repr(pattern) for pattern in options.layers) + "]"]
    if options.layer_candidates is not None:
        args += ["--layer_candidates", options.layer_candidates]
    if init_from is not None:
        args += ["--init_from", str(init_from)]
    if "--data.init_args.calibration_size" not in extra:
        args += ["--data.init_args.calibration_size", str(max(images, 1024))]
    wandb.finish()
    argv, sys.argv = sys.argv, sys.argv[:1]  # the script's own flags are not the CLI's
    start = time.perf_counter()
    try:
        CIMQCLI(args=args)
    finally:
        sys.argv = argv
    seconds = round(time.perf_counter() - start, 1)
    overrides = output / "cim_overrides.yaml"
    chosen = yaml.safe_load(overrides.read_text())["model"]["cim_overrides"]
    with open(output / "points.csv", newline="") as stream:
        searched = next(row for row in csv.DictReader(stream) if row["kind"] == "searched")
    return {"overrides": overrides, "seconds": seconds, "predicted_energy_uj": round(float(searched["predicted_energy_uj"]), 4),
            "assignment": " ".join(f"{name}:{layer_bits(fields)}" for name, fields in chosen.items())}


def layer_fields(bits: str) -> dict:
    """The override fields of one layer's ``bits`` in an assignment: ``ADC`` (``3``; ``None``: an ideal ADC) or
    ``ADC/INPUT`` (``7/7``: a 7-bit ADC fed 7-bit input codes, one bit-serial cycle fewer than 8).

    Raises:
        ValueError: when either part is not an integer (the ADC part may be ``None``).
    """
    adc, sep, inputs = bits.partition("/")
    if not (adc == "None" or adc.isdigit()) or (sep and not inputs.isdigit()):
        raise ValueError(f"layer bits {bits!r} are invalid: expected ADC or ADC/INPUT bits, e.g. 3 or 7/7 (ADC an "
                         f"integer or None, INPUT an integer)")
    fields = {"adc_bits": None if adc == "None" else int(adc)}
    if sep:
        fields["input_bits"] = int(inputs)
    return fields


def layer_bits(fields: dict) -> str:
    """A layer's override fields as an assignment's bits (`layer_fields` reads them back): ``3``, ``None``, ``7/7``."""
    adc = str(fields.get("adc_bits"))
    return f"{adc}/{fields['input_bits']}" if "input_bits" in fields else adc


def given_assignment(text: str) -> str:
    """An ``--assignments`` item (``glob=bits`` pairs separated by commas, e.g. ``layer1.*=3,layer3.*=3``; bits
    as `layer_fields` reads them, e.g. ``conv1=7/7``) as the CSV's ``name:bits`` pairs.

    Raises:
        ValueError: on a pair without ``=`` or bits `layer_fields` refuses.
    """
    pairs = []
    for item in text.split(","):
        name, sep, bits = item.strip().partition("=")
        try:
            if not sep or not name:
                raise ValueError("no glob=bits")
            layer_fields(bits)
        except ValueError:
            raise ValueError(f"--assignments item {item.strip()!r} of {text!r} is invalid: expected glob=bits, e.g. "
                             f"layer1.*=3 (bits an integer or None), or glob=ADC/INPUT bits, e.g. conv1=7/7") from None
        pairs.append(f"{name}:{bits}")
    return " ".join(pairs)


def given_key(assignment: str, iters: int, calibration_size: Optional[int] = None) -> str:
    """Row key of an assignment given by hand (`given_assignment`'s pairs), its fits' budget named as `searched_key`."""
    slug = re.sub(r"[^A-Za-z0-9.:_-]", "", _glob_name(assignment).replace(" ", "_").replace("/", "-in"))
    adc_bits = [layer_fields(pair.rpartition(":")[2])["adc_bits"] for pair in assignment.split()]
    return f"given-{_fit_name(iters, calibration_size, adc_bits)}-{slug}"


def stored_overrides(assignment: str, path: Path) -> Path:
    """The ``cim_overrides.yaml`` of a stored search's ``assignment`` (``name:bits`` pairs, the CSV's column), written
    to ``path``: further fits of that search use its choice as measured, whatever a new search here would pick."""
    chosen = {}
    for pair in assignment.split():
        name, _, bits = pair.rpartition(":")
        chosen[name] = layer_fields(bits)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"model": {"cim_overrides": chosen}}, sort_keys=False))
    return path


class LowAdcSteps(NamedTuple):
    """``--low-adc-steps BITS=STEPS``: the units that hold a layer at ADC ``bits`` or less reconstruct ``steps``
    steps in the assignment fits (with ``--low-adc-lr-step`` / ``--low-adc-keep``: at that input-step rate / QDrop
    keep probability)."""

    bits: int
    steps: int
    lr_step: Optional[float] = None  # their input steps' learning rate (None: the preset's)
    keep_prob: Optional[float] = None  # their QDrop keep probability (None: the preset's)

    @classmethod
    def parse(cls, text: str, lr_step: Optional[float] = None, keep_prob: Optional[float] = None) -> "LowAdcSteps":
        bits, sep, steps = text.partition("=")
        if not (sep and bits.strip().isdigit() and steps.strip().isdigit() and int(steps) > 0):
            raise ValueError(f"--low-adc-steps={text!r} is invalid: expected BITS=STEPS, e.g. 3=800")
        if lr_step is not None and not lr_step >= 0:
            raise ValueError(f"--low-adc-lr-step={lr_step!r} is invalid: expected a learning rate >= 0")
        if keep_prob is not None and not 0 < keep_prob <= 1:
            raise ValueError(f"--low-adc-keep={keep_prob!r} is invalid: expected a probability in (0, 1]")
        return cls(int(bits), int(steps), lr_step, keep_prob)

    def suffix(self) -> str:
        return (f"-low{self.bits}x{self.steps}" + ("" if self.lr_step is None else f"-lrstep{self.lr_step:g}")
                + ("" if self.keep_prob is None else f"-keep{self.keep_prob:g}"))

    def label(self) -> str:
        rate = "" if self.lr_step is None else f", lr_step {self.lr_step:g}"
        keep = "" if self.keep_prob is None else f", QDrop keep {self.keep_prob:g}"
        return f" (units with ADC <= {self.bits}: {self.steps} steps{rate}{keep})"

    def cli_args(self, assignment: str) -> list[str]:
        """The fit's options: ``unit_iters`` (``unit_learning_rates``, ``unit_keep_prob``) of the units of
        ``assignment``."""
        units = self.unit_iters(assignment)
        per_unit = {"unit_iters": units}
        if self.lr_step is not None:
            per_unit["unit_learning_rates"] = {unit: {"lr_step": self.lr_step} for unit in units}
        if self.keep_prob is not None:
            per_unit["unit_keep_prob"] = {unit: self.keep_prob for unit in units}
        flow = {option: yaml.safe_dump(value, default_flow_style=True).strip() for option, value in per_unit.items()}
        return [arg for option, value in flow.items() for arg in (f"--model.objective.init_args.{option}", value)]

    def unit_iters(self, assignment: str) -> dict[str, int]:
        """``unit_iters`` of the fit of ``assignment`` (``name:bits`` pairs): the unit of each layer or glob at
        ``bits`` or less (ResNet names: ``layer1.0.conv2`` and ``layer1.*.conv2`` are in ``layer1.0`` and
        ``layer1.*``; ``conv1`` and ``fc`` are units of their own)."""
        units = {}
        for pair in assignment.split():
            name, _, bits = pair.rpartition(":")
            adc_bits = layer_fields(bits)["adc_bits"]
            if adc_bits is not None and adc_bits <= self.bits:
                parts = name.split(".")
                units[".".join(parts[:2]) if parts[0].startswith("layer") and len(parts) > 1 else name] = self.steps
        return units


def _stored(path: Path) -> dict:
    if not path.is_file():
        return {}
    with open(path, newline="") as stream:
        return {row["key"]: row for row in csv.DictReader(stream)}


def fit_assignment(rows: dict, path: Path, key: str, point: str, overrides: Path, assignment: str, iters: int,
                   seeds: list[int], work_dir: Path, extra: list[str], low_adc: Optional[LowAdcSteps] = None,
                   calibration_size: Optional[int] = None, **fields) -> None:
    """Fit the CIMQ preset (ADC 4) with the per-layer ``overrides`` once per seed not yet in ``rows`` (row
    ``key`` plus the seed's suffix, labelled ``point``, with ``fields`` such as the search's columns), writing the
    CSV at ``path`` after each fit. With ``low_adc``, the units of its low-ADC layers get its steps; with
    ``calibration_size``, the fits calibrate on (and reconstruct from) that many train images."""
    if low_adc is not None:
        unit_iters = low_adc.unit_iters(assignment)
        key, point = key + low_adc.suffix(), point + low_adc.label()
        extra = [*extra, *low_adc.cli_args(assignment)]
        fields = {**fields, "unit_iters": " ".join(f"{unit}:{steps}" for unit, steps in unit_iters.items())}
    for seed in seeds:
        if key + _seed_suffix(seed) in rows:
            continue
        print(f"[bench] {point}, seed {seed}: CIMQ PTQ, {iters} steps per unit", flush=True)
        measured = measure(_uniform(4, iters, seed, calibration_size), work_dir,
                           extra_args=[*extra, "--config", str(overrides)])
        rows[key + _seed_suffix(seed)] = {
            **{k: measured.get(k, "") for k in COLUMNS}, "key": key + _seed_suffix(seed), "point": point,
            "adc_bits": "per layer", "iters": iters, "seed": seed, **fields, "assignment": assignment,
            "config": str(overrides)}
        _write(path, rows)


def _write(path: Path, rows: dict) -> None:
    from cimq_pl.cost.tables import write_csv_atomic

    write_csv_atomic(path, list(rows.values()), COLUMNS)


def _float(row: Optional[dict], key: str) -> Optional[float]:
    value = (row or {}).get(key, "")
    return float(value) if value not in ("", None) else None


def _searched_rows(rows: dict, kind: str, iters: int, images: int,
                   calibration_size: Optional[int] = None) -> list[dict]:
    """Every measured search at budget ``kind`` on this preset and budget (any metric, candidates, saving or seed)."""
    prefix = searched_key(kind, iters, images, calibration_size=calibration_size)
    return [row for key, row in rows.items() if key == prefix or key.startswith(prefix + "-")]


def point_means(rows: dict) -> dict[str, dict]:
    """The fits of each point (rows whose keys differ only in the seed) merged (`runner.merge_fits`): mean accuracy
    and energy, their number, the accuracy's range and spread, the point's label and ADC bits; keyed by
    `_point_key`, in the order the points were first measured."""
    merged = merge_fits(rows.values(), lambda row: _point_key(row["key"]), ("test/acc", "test/energy_per_image_uj"))
    return {key: {"point": fits["first"]["point"], "adc_bits": fits["first"]["adc_bits"],
                  **{name: value for name, value in fits.items() if name != "first"}}
            for key, fits in merged.items()}


def _fits(point: dict) -> str:
    return "" if point["fits"] == 1 else f" (mean of {point['fits']} fits, {point['range']})"


def targets(rows: dict, iters: int, images: int, calibration_size: Optional[int] = None) -> list[dict]:
    """The issue's two targets against every measured search (one line each), on the mean over each point's fits;
    uniform and searched points of the same fit budget (``iters``, ``calibration_size``)."""
    means = point_means(rows)
    uniform = {adc: means.get(_uniform(adc, iters, calibration_size=calibration_size).key) for adc in UNIFORM_ADC}
    searched = {kind: [means[key] for key in dict.fromkeys(_point_key(row["key"]) for row in _searched_rows(
                           rows, kind, iters, images, calibration_size))
                       if key in means] for kind in BUDGETS}
    lines = []
    if uniform[4] is not None:
        acc4, e4 = uniform[4]["test/acc"], uniform[4]["test/energy_per_image_uj"]
        for point in searched["energy"]:
            acc, e = point["test/acc"], point["test/energy_per_image_uj"]
            gain = 100 * (acc - acc4)
            lines.append({"target": f"at the energy per image of uniform ADC 4: >= 2 points more accuracy than it "
                                    f"({point['point']})",
                          "measured": f"{acc:.3f}{_fits(point)} at {e:.4f} uJ vs uniform ADC 4 {acc4:.3f}"
                                      f"{_fits(uniform[4])} at {e4:.4f} uJ: {gain:+.1f} points",
                          "met": "yes" if gain >= 2 else "**no**"})
    if uniform[5] is not None and uniform[5]["test/energy_per_image_uj"] is not None:
        acc5, e5 = uniform[5]["test/acc"], uniform[5]["test/energy_per_image_uj"]
        for point in [*searched["accuracy"], *searched["saving"]]:
            acc, e = point["test/acc"], point["test/energy_per_image_uj"]
            if e is None:
                continue
            saving = 100 * (1 - e / e5)
            lines.append({"target": f"at the accuracy of uniform ADC 5: >= 20% less energy ({point['point']})",
                          "measured": f"{acc:.3f}{_fits(point)} at {e:.4f} uJ vs uniform ADC 5 {acc5:.3f}"
                                      f"{_fits(uniform[5])} at {e5:.4f} uJ: {saving:.1f}% less energy, "
                                      f"{100 * (acc - acc5):+.1f} points",
                          "met": "yes" if saving >= 20 and acc >= acc5 else "**no**"})
    return lines


def plot(rows: list[dict], path: Path) -> Path:
    """Accuracy against energy per image: uniform ADC points joined, searched assignments as stars (the mean of a
    point's fits where it was fitted with several seeds)."""
    from cimq_pl.cost.plots import finish_figure, new_figure

    figure = new_figure(6.5, 4.5)
    axes = figure.add_subplot(1, 1, 1)
    points = point_means({row["key"]: row for row in rows}).values()  # a point fitted with several seeds: its mean
    uniform = sorted((p["test/energy_per_image_uj"], p["test/acc"], p["adc_bits"]) for p in points
                     if p["point"] == "uniform" and p["test/energy_per_image_uj"] is not None)
    if uniform:
        axes.plot([u[0] for u in uniform], [u[1] for u in uniform], "o-", color="tab:blue", label="uniform ADC")
        for energy, accuracy, bits in uniform:
            axes.annotate(f"ADC {bits}", (energy, accuracy), textcoords="offset points", xytext=(4, -10), fontsize=7)
    for point in points:
        if point["point"] != "uniform" and point["test/energy_per_image_uj"] is not None:
            axes.plot(point["test/energy_per_image_uj"], point["test/acc"], "*", markersize=13, label=point["point"])
    return finish_figure(figure, axes, path, "energy per image (uJ, NeuroSim 22 nm table)",
                         "top-1 accuracy after CIMQ PTQ (cifar10_lossless)",
                         "ResNet-20 W4A4, 128x128: per-layer ADC search vs uniform ADC")


def picture_name(calibration_size: Optional[int], iters: int = PRESET_ITERS) -> str:
    """The plot's file name: a run whose fits calibrate on other images or take other steps per unit draws a picture
    of its own, so it does not replace the front of the preset's runs (``layer_search.png``) with its few points."""
    suffix = ("" if calibration_size is None else f"-calibration{calibration_size}") + \
        ("" if iters == PRESET_ITERS else f"-iters{iters}")
    return f"layer_search{suffix}.png"


def main(argv: Optional[list[str]] = None) -> list[dict]:
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the same as --smoke: tiny data, 1 step per unit")
    parser.add_argument("--iters", type=int, default=PRESET_ITERS,
                        help=f"PTQ reconstruction steps per unit ({PRESET_ITERS}: the preset's; the suite's rows use 100)")
    parser.add_argument("--uniform", default=",".join(map(str, UNIFORM_ADC)),
                        help="uniform ADC resolutions measured beside the searches (default 3,4,5,6; the targets "
                             "need 4 and 5)")
    parser.add_argument("--images", type=int, default=256, help="calibration images the search measures on")
    parser.add_argument("--fresh", action="store_true", help="measure the uniform rows again instead of reusing "
                                                             "the suite's (sweeps.csv, ablation.csv)")
    parser.add_argument("--metric", choices=METRIC_NAMES, default="fisher",
                        help="the search's sensitivity metric (search --metric); rows of other metrics are kept apart")
    parser.add_argument("--budgets", default="energy,accuracy,saving",
                        help="which searches: energy (at the energy of uniform ADC 4), accuracy (at the loss of "
                             "uniform ADC 5), saving (at --saving of uniform ADC 5's energy); default: all three; none: only the "
                             "uniform points and --assignments")
    parser.add_argument("--candidates", default=",".join(map(str, UNIFORM_ADC)),
                        help="ADC resolutions each searched layer may take (default 3,4,5,6)")
    parser.add_argument("--saving", type=float, default=SAVING,
                        help="the saving search's energy budget as a fraction of uniform ADC 5's predicted energy (0.8)")
    parser.add_argument("--from-ptq", type=int, default=None, metavar="ADC_BITS",
                        help="search from the PTQ network of this uniform ADC resolution (search --init_from; its "
                             "checkpoint is low_adc_qat.py's, fitted once and reused) instead of the calibrated one")
    parser.add_argument("--seeds", nargs="+", type=int, default=[CONFIG_SEED],
                        help=f"fit every point (uniform and searched) once per seed (the data seed: calibration images "
                             f"and PTQ draws; default {CONFIG_SEED}, the config's); the targets are then checked on "
                             "each point's mean")
    parser.add_argument("--assignments", nargs="+", default=[], metavar="GLOB=BITS,...",
                        help="also fit these per-layer ADC assignments given by hand (each: glob=bits pairs separated "
                             "by commas, e.g. 'layer1.*=3,layer3.*=3'; ADC/INPUT bits give a layer's input codes too, e.g. "
                             "'conv1=7/7'; the other layers at the preset's ADC 4), as "
                             "points of the table and the plot beside the searched ones")
    parser.add_argument("--layers", default=None, metavar="GLOB,...",
                        help="the layers the searches change (search --layers; default: those mapped in cim mode), "
                             "e.g. 'conv1,layer*' to let the int8 first conv's ideal ADC (charged as 8 bits) go down "
                             "too; a uniform budget leaves it as configured, as uniform ADC 5 does")
    parser.add_argument("--layer-candidates", default=None, metavar="YAML",
                        help="candidates of their own for some searched layers (search --layer_candidates), e.g. "
                             "'{conv1: {input_bits: [6, 7, 8], adc_bits: [5, 6, 7, null]}}' with --layers 'conv1,layer*': "
                             "the first conv's input bits searched beside the others' ADC")
    parser.add_argument("--low-adc-steps", default=None, metavar="BITS=STEPS",
                        help="in the fits of searched and given assignments, the units that hold a layer at ADC BITS "
                             "or less reconstruct STEPS steps (model.objective.init_args.unit_iters), the others "
                             "--iters; e.g. 3=800 (rows and points get the suffix)")
    parser.add_argument("--low-adc-lr-step", type=float, default=None, metavar="RATE",
                        help="with --low-adc-steps: those units' input-step learning rate (unit_learning_rates), e.g. "
                             "half the preset's 4e-4 for twice its steps, so their input steps move as far (none)")
    parser.add_argument("--low-adc-keep", type=float, default=None, metavar="P",
                        help="with --low-adc-steps: those units' QDrop keep probability (unit_keep_prob), e.g. 0.75 "
                             "against the preset's 0.5 (none)")
    parser.add_argument("--calibration-size", type=int, default=None, metavar="IMAGES",
                        help="train images every fit (uniform, searched and given points) calibrates on and draws its "
                             "reconstruction batches from (data.calibration_size; default the model config's 1,024), "
                             "e.g. 4000: every lossless train image, as configs/quant/low_adc.yaml; the searches "
                             "themselves keep --images; rows and points get the suffix")
    args = parser.parse_args(argv)
    if args.calibration_size is not None and args.calibration_size <= 0:
        parser.error(f"--calibration-size={args.calibration_size}: expected a number of train images > 0")
    calibration = args.calibration_size
    try:
        given = [given_assignment(text) for text in args.assignments]
        for name, value in (("--low-adc-lr-step", args.low_adc_lr_step), ("--low-adc-keep", args.low_adc_keep)):
            if value is not None and args.low_adc_steps is None:
                raise ValueError(f"{name} sets a value of the units --low-adc-steps names: give both (e.g. "
                                 "--low-adc-steps 3=400, the preset's steps)")
        low_adc = (None if args.low_adc_steps is None
                   else LowAdcSteps.parse(args.low_adc_steps, args.low_adc_lr_step, args.low_adc_keep))
    except ValueError as error:
        parser.error(str(error))
    candidates = tuple(int(bits) for bits in args.candidates.split(",") if bits.strip())
    layers = None if args.layers is None else tuple(p.strip() for p in args.layers.split(",") if p.strip())
    if layers == ():
        parser.error(f"--layers={args.layers!r}: expected layer names or globs separated by commas, "
                     "e.g. 'conv1,layer*'")
    options = SearchOptions(args.metric, candidates, args.saving, args.from_ptq, layers, args.layer_candidates)
    kinds = [] if args.budgets == "none" else [kind.strip() for kind in args.budgets.split(",") if kind.strip()]
    if (not kinds and args.budgets != "none") or set(kinds) - set(BUDGETS):
        parser.error(f"--budgets={args.budgets!r}: expected a comma-separated subset of {', '.join(BUDGETS)}, or "
                     "none (only the uniform points and --assignments)")
    for kind in kinds:  # each budget names a uniform setting, which the search needs among its candidates
        bits = BUDGETS[kind].uniform_adc
        if bits not in candidates:
            parser.error(f"--budgets {kind} is set by uniform ADC {bits}, which --candidates={args.candidates!r} "
                         f"leaves out: add {bits}")
    args.smoke = args.smoke or args.quick
    prepare(args)
    extra = list(QUICK_ARGS) if args.smoke else []
    iters, images = (1, 32) if args.smoke else (args.iters, args.images)
    adc_points = (tuple(sorted({BUDGETS[kind].uniform_adc for kind in kinds}))
                  if args.smoke else tuple(int(bits) for bits in args.uniform.split(",") if bits.strip()))
    path = args.out_dir / "layer_search.csv"
    rows = _stored(path)
    reuse = {} if (args.fresh or args.smoke) else {
        **ResultStore(args.out_dir / "ablation.csv").rows, **ResultStore(args.out_dir / "sweeps.csv").rows,
        **ResultStore(args.out_dir / "accuracy_levers.csv").rows}
    for adc in adc_points:
        for seed in args.seeds:
            setting = _uniform(adc, iters, seed, calibration)
            if setting.key in rows:
                continue
            reused = next((key for key in setting.equivalent_keys if key in reuse), None)
            if reused is not None:
                found = reuse[reused]
                print(f"[bench] uniform ADC {adc}, seed {seed}: reused from the suite's CSV", flush=True)
            else:
                print(f"[bench] uniform ADC {adc}, seed {seed}: CIMQ PTQ, {iters} steps per unit", flush=True)
                found = measure(setting, args.work_dir, extra_args=extra)
            rows[setting.key] = {**{k: found.get(k, "") for k in COLUMNS}, "key": setting.key, "point": "uniform",
                                 "adc_bits": adc, "iters": iters, "seed": seed, "config": found.get("config", "")}
            _write(path, rows)
    for kind in kinds:
        key = searched_key(kind, iters, images, options, calibration)
        fitted = key + (low_adc.suffix() if low_adc else "")
        if all(fitted + _seed_suffix(seed) in rows for seed in args.seeds):
            continue
        point = options.label(kind)
        stored = next((row for other, row in rows.items() if _point_key(other) == key), None)  # a fit of this search
        init_from = None
        if options.from_ptq is not None and stored is None:
            from low_adc_qat import ptq

            from cimq_pl.quant.psum import resolve_psum_asymmetric

            checkpoints = args.work_dir / "low_adc_qat"
            checkpoints.mkdir(parents=True, exist_ok=True)
            asymmetric = resolve_psum_asymmetric("auto", options.from_ptq)  # the preset's range shape at those bits
            init_from = ptq(options.from_ptq, iters, checkpoints, extra, "-asymmetric" if asymmetric else "",
                            asymmetric)[0]
        if stored is not None:  # more fits of a measured search: its stored assignment, not a new search
            found = {"overrides": stored_overrides(stored["assignment"], args.work_dir / f"{key}.yaml"),
                     "seconds": stored.get("search_seconds", ""), "assignment": stored["assignment"],
                     "predicted_energy_uj": stored.get("predicted_energy_uj", "")}
            print(f"[bench] {point}: the stored assignment ({found['assignment']})", flush=True)
        else:
            print(f"[bench] search: {point} ({images} calibration images)", flush=True)
            found = run_search(kind, iters, images, args.work_dir, extra, options, init_from)
            print(f"[bench]   {found['seconds']} s: {found['assignment']}", flush=True)
        fit_assignment(rows, path, key, point, found["overrides"], found["assignment"], iters, args.seeds,
                       args.work_dir, extra, low_adc, calibration, search_images=images,
                       search_seconds=found["seconds"], predicted_energy_uj=found["predicted_energy_uj"])
    for assignment in given:
        key = given_key(assignment, iters, calibration)
        fit_assignment(rows, path, key, f"given: {assignment} (others ADC 4)",
                       stored_overrides(assignment, args.work_dir / f"{key}.yaml"), assignment, iters, args.seeds,
                       args.work_dir, extra, low_adc, calibration)
    uniform_keys = {_uniform(adc, iters, calibration_size=calibration).key for adc in adc_points}
    given_keys = {given_key(assignment, iters, calibration) + (low_adc.suffix() if low_adc else "")
                  for assignment in given}
    shown = [r for key, r in rows.items() if _point_key(key) in uniform_keys] + [
        row for kind in BUDGETS for row in _searched_rows(rows, kind, iters, images, calibration)] + [
        row for key, row in rows.items() if _point_key(key) in given_keys]
    columns = ["point", "adc_bits", "seed", "test/acc", "test/energy_per_image_uj", "test/hw_efficiency_vs_baseline",
               "test/bit_density", "fit_seconds", "search_seconds"]
    headers = ["setting", "ADC bits", "seed", "test/acc", "uJ/image", "efficiency vs baseline", "bit density", "fit s",
               "search s"]
    fits = f"{iters} steps per unit" + ("" if calibration is None else f", {calibration} calibration images")
    print(f"\n**ResNet-20 W4A4, 128x128, CIMQ PTQ ({fits})**: uniform ADC vs per-layer search "
          f"({images} calibration images); {machine()}\n")
    print(markdown_table(shown, columns, headers))
    means = [point for key, point in point_means({row["key"]: row for row in shown}).items() if point["fits"] > 1]
    if means:
        print("\nPoints fitted more than once (every seed's fit of the same setting):\n")
        print(markdown_table([{**point, "point": (f"uniform ADC {point['adc_bits']}" if point["point"] == "uniform"
                                                  else point["point"]),
                               "test/acc": f"{point['test/acc']:.4f}", "std": f"{point['std']:.4f}",
                               "test/energy_per_image_uj": f"{point['test/energy_per_image_uj']:.4f}"}
                              for point in means],
                             ["point", "fits", "test/acc", "std", "range", "test/energy_per_image_uj"],
                             ["setting", "fits", "mean test/acc", "std", "range", "mean uJ/image"]))
    lines = targets(rows, iters, images, calibration)
    if lines:
        print("\n" + markdown_table(lines, ["target", "measured", "met"]))
    for row in shown:
        if row.get("assignment") and _point_key(row["key"]) == row["key"]:
            print(f"\n{row['point']}: {row['assignment']}")
    picture = plot(shown, args.out_dir / picture_name(calibration, args.iters))  # --smoke draws as the preset
    print(f"\nwrote {path} and {picture}")
    return shown


if __name__ == "__main__":
    main()
