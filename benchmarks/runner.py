"""What every benchmark script shares: one *setting* measured through the same CLI and configs users run.

A `Setting` names a model config (`configs/<model>.yaml`), a technique config (`configs/quant/...`) and the
changes a sweep makes to it (macro geometry and bits, technique arguments, PTQ budget). `measure` writes
those changes into a derived YAML next to the run (``<work>/<key>.yaml``, so every row's exact config is
on disk), builds the project's `CIMQCLI` from ``--config model --config derived``, runs ``trainer.fit``
(calibration + reconstruction) and ``trainer.test`` on ``cifar10_lossless`` (1,000 images, with the
`HardwareReport`), and optionally tests the same quantized network on ``cifar10_jpeg`` (10,000 images,
accuracy only). It is what ``python -m cimq_pl fit`` then ``test --ckpt_path ptq.ckpt`` gives (the test suite
checks that the two agree exactly), without reloading the checkpoint.

`ResultStore` keeps the rows of a CSV keyed by setting, so a stopped suite resumes where it stopped and
a script can reuse a setting another script already measured (the ADC sweep reuses the ablation's rows).
"""

from __future__ import annotations

import csv
import os
import platform
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable, Hashable, Iterable, Optional, Sequence

import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CIMQ_SHARED", REPO.parent / "shared")).resolve()
LOSSLESS = SHARED / "data" / "cifar10_lossless"
JPEG = SHARED / "data" / "cifar10_jpeg"
RESULTS = REPO / "benchmarks" / "results"

MODEL_CONFIGS = {
    "resnet20": "configs/resnet20_cifar10.yaml",
    "resnet32": "configs/resnet32_cifar10.yaml",
}
# row -> (technique config or None for the float model, changes to its `model.cim`)
ROWS = {
    "fp": (None, {}),
    "conventional": ("configs/quant/conventional.yaml", {}),
    "arraywise": ("configs/quant/ablation/arraywise.yaml", {}),
    "bit_sparse": ("configs/quant/ablation/bit_sparse.yaml", {}),
    "psum_clipping": ("configs/quant/ablation/psum_clipping.yaml", {}),
    "qdrop": ("configs/quant/ablation/qdrop.yaml", {}),
    "cimq": ("configs/quant/cimq_ptq.yaml", {}),
    "cimq_quick": ("configs/quant/cimq_ptq_quick.yaml", {}),
    "qdrop_no_cim": ("configs/quant/ablation/qdrop.yaml", {"adc_bits": None}),
    "brecq": ("configs/quant/ablation/brecq.yaml", {}),
    "cimq_uniform_codes": ("configs/quant/ablation/cimq_uniform_codes.yaml", {}),
    "cimq_qat": ("configs/quant/cimq_qat.yaml", {}),
    "cimq_edges_on_arrays": ("configs/quant/cimq_ptq.yaml", {"first_layer": "cim", "last_layer": "cim"}),
}
# rows whose config changed since results were stored: a new name in the key, so the old rows are never reused
# (issue 15 changed the CIMQ presets: int8 edge layers, learning rates x10 (PTQ), per-column weight scales; and
# every other technique config: int8 edge layers, per-column weight scales where ArraywiseWeights is listed)
# ("15b": the CIMQ presets and the ablation's per-column ADC clips, after "15" had per-array ones)
ROW_KEY_NAMES = {name: f"{name}15" for name in (
    "conventional", "arraywise", "bit_sparse", "qdrop", "qdrop_no_cim", "brecq")}
ROW_KEY_NAMES.update({name: f"{name}15b" for name in ("psum_clipping", "cimq_uniform_codes")})
# ("15c": the CIMQ presets' input codes: uniform codes with twice the calibrated step instead of k = 2)
ROW_KEY_NAMES.update({name: f"{name}15c" for name in ("cimq_quick", "cimq_qat")})
# ("15d": the CPU preset's 400 reconstruction steps per unit instead of 200, where a setting leaves them unset)
ROW_KEY_NAMES.update({name: f"{name}15d" for name in ("cimq", "cimq_edges_on_arrays")})
# ("15e": the CIMQ presets' ADC ranges, `PartialSumClipping(observer: auto)`: min-max instead of the MSE clip for
# ADCs of `AUTO_MINMAX_ADC_BITS` bits and more. Narrower ADCs run the same config as before, so only a setting of
# such an ADC, with the config's own observer, takes the new name.)
WIDE_ADC_KEY_NAMES = {"cimq15d": "cimq15e", "cimq_edges_on_arrays15d": "cimq_edges_on_arrays15e",
                      "cimq_quick15c": "cimq_quick15e", "cimq_qat15c": "cimq_qat15e"}


# ("_asym": the CIMQ presets' ADC range shape, `PartialSumClipping(asymmetric: auto)`: asymmetric ranges for ADCs of
# at most `AUTO_ASYMMETRIC_MAX_ADC_BITS` bits. Wider ADCs run the same config as before, so only a setting of such
# an ADC, with the config's own range shape, takes the suffix; it runs the config that the older name with
# ``asymmetric_adc=True`` ran, whose rows it reuses (`Setting.equivalent_keys`).)
NARROW_ADC_ROWS = frozenset({"cimq", "cimq_edges_on_arrays", "cimq_quick", "cimq_qat"})
NARROW_ADC_SUFFIX = "_asym"


def row_key_name(row: str, adc_bits: Iterable[Optional[int]] = (), *, observer_auto: bool = True,
                 asymmetric_auto: bool = True) -> str:
    """The versioned name of ``row``'s config in result keys (`ROW_KEY_NAMES`): its `WIDE_ADC_KEY_NAMES` name when
    any of ``adc_bits`` (ADC resolutions its layers may have; None: an ideal ADC) is one the presets'
    ``observer: auto`` gives a min-max range (unless ``observer_auto`` is False: the setting names the observer),
    plus `NARROW_ADC_SUFFIX` when any is one the presets' ``asymmetric: auto`` gives asymmetric ranges (unless
    ``asymmetric_auto`` is False)."""
    from cimq_pl.quant.psum import resolve_psum_asymmetric, resolve_psum_observer

    adc_bits = tuple(adc_bits)
    name = ROW_KEY_NAMES.get(row, row)
    if observer_auto and any(resolve_psum_observer("auto", bits) == "minmax" for bits in adc_bits):
        name = WIDE_ADC_KEY_NAMES.get(name, name)
    if asymmetric_auto and row in NARROW_ADC_ROWS and any(resolve_psum_asymmetric("auto", bits) for bits in adc_bits):
        name += NARROW_ADC_SUFFIX
    return name


# A row name that changed only a default of the steps per unit: a setting that sets ``iters`` itself runs the same
# config under either name, so rows measured under the older one are reused for it.
SAME_CONFIG_WHEN_ITERS_SET = {"cimq15d": "cimq15c", "cimq_edges_on_arrays15d": "cimq_edges_on_arrays15c"}
ROW_LABELS = {
    "fp": "FP (no quantization)",
    "conventional": "conventional PTQ (layerwise min-max weights, min-max ADC range)",
    "arraywise": "+ arraywise weight scales alone",
    "bit_sparse": "+ bit-sparse activations (k=1) alone",
    "psum_clipping": "+ per-column MSE ADC clipping alone",
    "qdrop": "+ reconstruction with quantization dropping alone",
    "cimq": "CIMQ: all four",
    "cimq_quick": "CIMQ: all four, quick preset",
    "qdrop_no_cim": "plain QDrop, no CIM constraint (ideal ADC)",
    "brecq": "BRECQ (reconstruction, no dropping)",
    "cimq_uniform_codes": "CIMQ with uniform activation codes",
    "cimq_qat": "CIMQ QAT (all techniques but dropping)",
    "cimq_edges_on_arrays": "CIMQ with the first conv and the classifier on the 4-bit arrays",
}
METRICS = (
    "test/acc",
    "test/bit_density",
    "test/energy_per_image_uj",
    "test/tops_per_w",
    "test/adc_energy_share",
    "test/hw_efficiency_vs_baseline",
)
CALLBACKS = "cimq_pl.callbacks."
CONFIG_SEED = 0  # ``seed_everything`` and the datamodule's ``seed`` of every model config in `MODEL_CONFIGS`
PTQ_PRESET = ROWS["cimq"][0]  # the CPU PTQ preset, configs/quant/cimq_ptq.yaml


def iters_per_block(config: dict) -> int:
    """Reconstruction steps per unit a parsed technique config sets (its objective's ``iters_per_block``)."""
    return int(config["model"]["objective"]["init_args"]["iters_per_block"])


def preset_iters(config: str = PTQ_PRESET) -> int:
    """Reconstruction steps per unit of a PTQ technique config file: the one place the benchmarks read the preset's
    budget from, so that a change of the config reaches their defaults."""
    return iters_per_block(yaml.safe_load((REPO / config).read_text()))


@dataclass(frozen=True)
class Setting:
    """One measured configuration. ``None`` fields keep the technique config's value.

    Attributes:
        model: key of `MODEL_CONFIGS`.
        row: key of `ROWS` (which technique config).
        weight_bits / input_bits / adc_bits: macro bits (``adc_bits`` None in the row = ideal ADC).
        array: rows = columns of one array (cells).
        max_ones: k of `BitSparseActivations` (0 = uniform codes; only where the config has that callback).
        keep_prob: p of `QuantDropping` (only where the config has that callback).
        iters: PTQ reconstruction steps per unit (only for configs that reconstruct).
        lr_scale: the reconstruction's three learning rates (AdaRound logits, input steps, ADC clips) as a
            multiple of QDrop's (`BlockReconstruction`'s defaults), whatever the config sets (only for configs
            that reconstruct).
        weight_granularity: weight scales of `ArraywiseWeights` (``array``, ``channel``, ``array_channel``).
        sparsity_weight: lambda of `BitSparseActivations`' bit-sparsity regulariser.
        psum_granularity: ADC clip ranges of `PartialSumClipping` (``layer``, ``array``, ``column``).
        psum_observer: how `PartialSumClipping` sets each ADC range from the calibration partial sums before it is
            learned (``mse``, ``minmax``, ``percentile``).
        rounding_init: where AdaRound starts, `BlockReconstruction`'s ``rounding_init`` (``nearest`` or ``gptq``).
        step_scale: factor on the calibrated input steps, `BitSparseActivations`' ``step_scale``.
        weight_rounding: ``gptq``: the `GPTQRounding` callback rounds the weights at calibration, and nothing is
            reconstructed (``iters_per_block`` 0; only for configs that reconstruct).
        lr_step: the reconstruction's learning rate of the input steps (0: the calibrated steps stay), after
            ``lr_scale`` (only for configs that reconstruct).
        lr_offset: the reconstruction's learning rate of the layers' output offsets after the ADC
            (`BlockReconstruction`'s ``lr_offset``; only for configs that reconstruct).
        batch_size: the reconstruction's images per step (`BlockReconstruction`'s ``batch_size``; 32 in the presets;
            only for configs that reconstruct).
        drop_psums: QDrop also on the partial sums (`QuantDropping` ``targets`` gets ``psums``: each ADC conversion
            keeps its raw partial sum with probability 1 - p while its unit reconstructs; the CIMQ paper's choice,
            SPEC 4.4); only where the config has that callback.
        calibration_size: train images in the calibration subset (``data.calibration_size``; the model config's
            1,024 when None): what calibration observes and what reconstruction draws its batches from.
        seed: the datamodule's ``seed`` (the calibration subset, and every PTQ step's draws: its batch, the QDrop
            masks, both keyed by (seed, unit, step)) and ``seed_everything``: another fit of the same setting, to
            put the spread between fits beside a gap. ``seed_everything`` alone changes nothing in a PTQ fit (two
            fits at seed_everything 1 and 2 gave the one at 0 to the last digit). None (use `seeded`) is the
            configs' `CONFIG_SEED`, so rows measured before seeds were a field keep their keys.
        asymmetric_adc: `PartialSumClipping`'s ``asymmetric`` (every ADC range placed by a learned offset).
    """

    model: str
    row: str
    weight_bits: Optional[int] = None
    input_bits: Optional[int] = None
    adc_bits: Optional[int] = None
    array: Optional[int] = None
    max_ones: Optional[int] = None
    keep_prob: Optional[float] = None
    iters: Optional[int] = None
    lr_scale: Optional[float] = None
    weight_granularity: Optional[str] = None
    sparsity_weight: Optional[float] = None
    psum_granularity: Optional[str] = None
    rounding_init: Optional[str] = None
    step_scale: Optional[float] = None
    weight_rounding: Optional[str] = None
    lr_step: Optional[float] = None
    lr_offset: Optional[float] = None
    batch_size: Optional[int] = None
    psum_observer: Optional[str] = None
    drop_psums: Optional[bool] = None
    calibration_size: Optional[int] = None
    seed: Optional[int] = None
    asymmetric_adc: Optional[bool] = None

    def __post_init__(self):
        if self.model not in MODEL_CONFIGS:
            raise ValueError(f"model {self.model!r} is unknown: expected one of {sorted(MODEL_CONFIGS)}")
        if self.row not in ROWS:
            raise ValueError(f"row {self.row!r} is unknown: expected one of {sorted(ROWS)}")
        if self.weight_rounding not in (None, "gptq"):
            raise ValueError(f"weight_rounding {self.weight_rounding!r} is unknown: expected None or 'gptq'")
        if self.seed == CONFIG_SEED:
            raise ValueError(f"seed {CONFIG_SEED} is the model config's own: leave it None (`seeded` does), so the "
                             f"row keeps the key of the unseeded fits")
        if self.weight_rounding == "gptq" and self.iters not in (None, 0):
            raise ValueError(f"weight_rounding 'gptq' rounds at calibration and reconstructs nothing: iters must be 0, "
                             f"not {self.iters}")

    @property
    def quantized(self) -> bool:
        return ROWS[self.row][0] is not None

    @property
    def key(self) -> str:
        """Stable identifier: model, row and every field that is set (used for resuming and file names)."""
        return self._key(self.row_key_name)

    def _key(self, name: str, **fields_set) -> str:
        """`key` with the row name ``name`` and the fields ``fields_set`` set."""
        parts = [self.model, name]
        for item in fields(self)[2:]:
            value = fields_set.get(item.name, getattr(self, item.name))
            if value is not None:
                parts.append(f"{item.name}{value}")
        return "-".join(parts)

    @property
    def row_key_name(self) -> str:
        """The row's name in `key`: the versioned name of its config (`row_key_name`; an observer or range shape
        the setting sets itself makes the presets' ``auto`` irrelevant)."""
        return row_key_name(self.row, (self.adc_bits,), observer_auto=self.psum_observer is None,
                            asymmetric_auto=self.asymmetric_adc is None)

    @property
    def equivalent_keys(self) -> tuple[str, ...]:
        """`key` first, then the keys that earlier row names gave the same config (`SAME_CONFIG_WHEN_ITERS_SET`;
        a `NARROW_ADC_SUFFIX` name: the older name with ``asymmetric_adc=True``)."""
        keys = [self.key]
        name = self.row_key_name.removesuffix(NARROW_ADC_SUFFIX)
        if name != self.row_key_name:  # the same config under the older name, stated explicitly
            keys.append(self._key(name, asymmetric_adc=True))
        if self.iters is not None and name in SAME_CONFIG_WHEN_ITERS_SET:
            keys.append(keys[-1].replace(f"-{name}-", f"-{SAME_CONFIG_WHEN_ITERS_SET[name]}-", 1))
        return tuple(keys)

    def columns(self) -> dict:
        """The setting as CSV cells (empty where unset)."""
        return {name: ("" if value is None else value) for name, value in asdict(self).items()}


def data_args(calibration_size: Optional[int], seed: Optional[int]) -> list[str]:
    """The CLI arguments of a calibration subset size (train images) and a fit seed (the datamodule's ``seed`` and
    ``seed_everything``); none for the model configs' own (``None``; seed ``None`` or `CONFIG_SEED`)."""
    args = [] if calibration_size is None else ["--data.init_args.calibration_size", str(calibration_size)]
    if seed not in (None, CONFIG_SEED):
        args += ["--data.init_args.seed", str(seed), "--seed_everything", str(seed)]
    return args


def seeded(setting: Setting, seed: int) -> Setting:
    """``setting`` fitted with data seed and ``seed_everything`` ``seed`` (the configs' seed stays unset in the key)."""
    return replace(setting, seed=None if seed == CONFIG_SEED else seed)


def merge_fits(rows: Iterable[dict], point: Callable[[dict], Hashable],
               metrics: Sequence[str] = ("test/acc",)) -> dict[Hashable, dict]:
    """The fits of each point merged (rows with equal ``point(row)``: one setting fitted with other seeds), in the
    order the points first appear: ``fits``, the mean of each of ``metrics`` over the rows that have it (None where
    none has), the first metric's sample standard deviation (0.0 for one fit) and ``range`` (min-max), and
    ``first``, the point's first row. Rows without the first metric (empty cells of a CSV) are left out."""
    import statistics

    def number(row, metric):
        value = row.get(metric)
        return None if value in ("", None) else float(value)

    points: dict[Hashable, list[dict]] = {}
    for row in rows:
        if number(row, metrics[0]) is not None:
            points.setdefault(point(row), []).append(row)
    merged = {}
    for key, fits in points.items():
        means = {}
        for metric in metrics:
            values = [value for value in (number(row, metric) for row in fits) if value is not None]
            means[metric] = statistics.fmean(values) if values else None
        first = [number(row, metrics[0]) for row in fits]
        merged[key] = {"first": fits[0], "fits": len(fits), **means,
                       "std": statistics.stdev(first) if len(first) > 1 else 0.0,
                       "range": f"{min(first):.3f}-{max(first):.3f}"}
    return merged


def seed_spread(rows: Sequence[dict], group: Sequence[str], metric: str = "test/acc") -> list[dict]:
    """Rows that differ only in ``seed``, merged (`merge_fits`) into table rows: the ``group`` columns that name a
    point (e.g. lever set, ADC bits, steps per unit), then ``metric``'s mean, sample standard deviation and min-max
    over the fits, and their number."""
    merged = merge_fits(rows, lambda row: tuple(str(row.get(column, "")) for column in group), (metric,))
    return [{**dict(zip(group, names)), "fits": fits["fits"], "mean": round(fits[metric], 4),
             "std": round(fits["std"], 4), "range": fits["range"]} for names, fits in merged.items()]


SETTING_COLUMNS = tuple(item.name for item in fields(Setting))
RESULT_COLUMNS = ("key", *SETTING_COLUMNS, *METRICS, "jpeg/acc", "fit_seconds", "test_seconds", "config")


def derived_config(setting: Setting) -> Optional[dict]:
    """The technique config of ``setting`` with its changes applied (None for the float model).

    Raises:
        ValueError: when a change names a callback the config does not list (e.g. ``max_ones`` on a
            config without `BitSparseActivations`), instead of silently measuring something else.
    """
    path, cim_changes = ROWS[setting.row]
    if path is None:
        return None
    config = yaml.safe_load((REPO / path).read_text())
    cim = config.setdefault("model", {}).setdefault("cim", {})
    cim.update(cim_changes)
    for name in ("weight_bits", "input_bits", "adc_bits"):
        if getattr(setting, name) is not None:
            cim[name] = getattr(setting, name)
    if setting.array is not None:
        cim["rows"] = cim["cols"] = setting.array
    callbacks = {entry["class_path"].removeprefix(CALLBACKS): entry.setdefault("init_args", {})
                 for entry in config["trainer"]["callbacks"]}
    for name, callback, argument, value in (
        ("max_ones", "BitSparseActivations", "max_ones", None if setting.max_ones == 0 else setting.max_ones),
        ("keep_prob", "QuantDropping", "keep_prob", setting.keep_prob),
        ("weight_granularity", "ArraywiseWeights", "granularity", setting.weight_granularity),
        ("sparsity_weight", "BitSparseActivations", "sparsity_weight", setting.sparsity_weight),
        ("psum_granularity", "PartialSumClipping", "granularity", setting.psum_granularity),
        ("step_scale", "BitSparseActivations", "step_scale", setting.step_scale),
        ("psum_observer", "PartialSumClipping", "observer", setting.psum_observer),
        ("asymmetric_adc", "PartialSumClipping", "asymmetric", setting.asymmetric_adc),
    ):
        if getattr(setting, name) is None:
            continue
        if callback not in callbacks:
            raise ValueError(f"setting {setting.key}: {name} needs {callback} in {path}, which lists {sorted(callbacks)}")
        callbacks[callback][argument] = value
    if setting.drop_psums is not None:
        if "QuantDropping" not in callbacks:
            raise ValueError(f"setting {setting.key}: drop_psums needs QuantDropping in {path}, which lists "
                             f"{sorted(callbacks)}")
        from cimq_pl.quant.techniques import DROP_TARGETS

        targets = [t for t in callbacks["QuantDropping"].get("targets") or DROP_TARGETS if t != "psums"]
        callbacks["QuantDropping"]["targets"] = targets + ["psums"] if setting.drop_psums else targets
    changes = {name: getattr(setting, name)
               for name in ("iters", "rounding_init", "lr_scale", "lr_step", "lr_offset", "batch_size", "weight_rounding")}
    if any(value is not None for value in changes.values()):
        from cimq_pl.objectives import BlockReconstruction

        objective = config["model"].get("objective") or {}
        if not objective.get("class_path", "").endswith("BlockReconstruction"):
            named = ", ".join(name for name, value in changes.items() if value is not None)
            raise ValueError(f"setting {setting.key}: {named} needs model.objective BlockReconstruction in {path}")
        init_args = objective.setdefault("init_args", {})
        if setting.iters is not None and init_args.get("iters_per_block", 1) != 0:  # calibration-only stays so
            init_args["iters_per_block"] = setting.iters
        if setting.rounding_init is not None:
            init_args["rounding_init"] = setting.rounding_init
        if setting.lr_scale is not None:
            init_args.update(BlockReconstruction.scaled_learning_rates(setting.lr_scale))
        for name in ("lr_step", "lr_offset", "batch_size"):
            if getattr(setting, name) is not None:
                init_args[name] = getattr(setting, name)
        if setting.weight_rounding == "gptq":  # GPTQ at calibration (listed before PTQ's callback); nothing reconstructed
            entries = config["trainer"]["callbacks"]
            ptq = next(i for i, entry in enumerate(entries) if entry["class_path"].endswith("PostTrainingQuantization"))
            entries.insert(ptq, {"class_path": f"{CALLBACKS}GPTQRounding"})
            init_args["iters_per_block"] = 0
    return config


def cli(args: list[str]):
    """The project's `CIMQCLI` on ``args``, not run (the caller drives the trainer); one W&B run per call."""
    import sys

    import wandb

    from cimq_pl.cli import CIMQCLI

    wandb.finish()
    argv, sys.argv = sys.argv, sys.argv[:1]  # the script's own flags are not the CLI's
    try:
        return CIMQCLI(args=args, run=False)
    finally:
        sys.argv = argv


def datamodule_on(datamodule, root: Path):
    """The same datamodule (class and settings) on the data of ``root`` (e.g. ``cifar10_jpeg``)."""
    return type(datamodule)(
        root=str(root), batch_size=datamodule.batch_size, eval_batch_size=datamodule.eval_batch_size,
        num_workers=datamodule.num_workers, calibration_size=datamodule.calibration_size, seed=datamodule.seed,
        mean=datamodule.mean, std=datamodule.std, augment=datamodule.augment,
    )


def measure(setting: Setting, work_dir: Path, jpeg: bool = False, extra_args: Sequence[str] = (),
            callbacks: Sequence = (), test: bool = True) -> dict:
    """Fit (when quantized) and test ``setting``; returns a row of `RESULT_COLUMNS`.

    Args:
        setting: what to measure.
        work_dir: folder for the derived config, the W&B run and the PTQ checkpoint.
        jpeg: also test on ``cifar10_jpeg`` (10,000 images; accuracy only, the hardware report is dropped).
        extra_args: more CLI arguments for the run (the smoke tests shrink the data with them).
        callbacks: more Lightning callbacks for the run (timers).
        test: run the test (off when only the fit is timed).
    """
    from cimq_pl.callbacks import HardwareReport

    work_dir.mkdir(parents=True, exist_ok=True)
    args = ["--config", MODEL_CONFIGS[setting.model]]
    config = derived_config(setting)
    config_path = ""
    if config is not None:
        derived = work_dir / f"{setting.key}.yaml"
        derived.write_text(yaml.safe_dump(config, sort_keys=False))
        args += ["--config", str(derived)]
        config_path = str(derived)
    args += ["--data.init_args.root", str(LOSSLESS), "--trainer.logger.init_args.save_dir", str(work_dir),
             "--trainer.enable_progress_bar", "false"]
    args += data_args(setting.calibration_size, setting.seed)
    args += list(extra_args)  # after the setting's own data arguments: the smoke runs' shrink wins
    built = cli(args)
    trainer, module, datamodule = built.trainer, built.model, built.datamodule
    trainer.callbacks.extend(callbacks)
    row = {"key": setting.key, **setting.columns(), "fit_seconds": 0.0, "config": config_path}
    if setting.quantized:
        start = time.perf_counter()
        trainer.fit(module, datamodule=datamodule)
        row["fit_seconds"] = round(time.perf_counter() - start, 1)
    if not test:
        return row
    start = time.perf_counter()
    trainer.test(module, datamodule=datamodule, verbose=False)
    row["test_seconds"] = round(time.perf_counter() - start, 1)
    for name in METRICS:
        value = trainer.callback_metrics.get(name)
        row[name] = round(float(value), 4) if value is not None else ""
    if jpeg:
        trainer.callbacks = [cb for cb in trainer.callbacks if not isinstance(cb, HardwareReport)]
        trainer.test(module, datamodule=datamodule_on(datamodule, JPEG), verbose=False)
        row["jpeg/acc"] = round(float(trainer.callback_metrics["test/acc"]), 4)
    return row


class ResultStore:
    """Rows of a results CSV keyed by `Setting.key`; every `add` rewrites the file atomically.

    Args:
        path: the CSV this store writes (read first when it exists, so a stopped run resumes).
        reuse: other results CSVs whose rows may be reused for identical settings (read only).
    """

    def __init__(self, path: Path, reuse: Iterable[Path] = ()):
        self.path = Path(path)
        self.rows = _read_rows(self.path)
        self._reusable: dict[str, dict] = {}
        for source in reuse:
            self._reusable.update(_read_rows(Path(source)))
        self._reusable.update(self.rows)

    def get(self, setting: Setting, jpeg: bool = False) -> Optional[dict]:
        """A stored row for ``setting`` (with a JPEG accuracy when ``jpeg``), or None."""
        row = next((self._reusable[key] for key in setting.equivalent_keys if key in self._reusable), None)
        if row is None or (jpeg and row.get("jpeg/acc", "") == ""):
            return None
        return row

    def add(self, row: dict) -> None:
        from cimq_pl.cost.tables import write_csv_atomic

        self.rows[row["key"]] = row
        self._reusable[row["key"]] = row
        write_csv_atomic(self.path, list(self.rows.values()), RESULT_COLUMNS)


def read_csv_rows(path: Path) -> list[dict]:
    """The rows of the CSV file ``path`` ([] when it does not exist)."""
    if not path.is_file():
        return []
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


def _read_rows(path: Path) -> dict[str, dict]:
    """Rows of a results CSV by key ({} when the file does not exist)."""
    return {row["key"]: row for row in read_csv_rows(path)}


def run_settings(settings: Sequence[tuple[Setting, bool]], store: ResultStore, work_dir: Path,
                 extra_args: Sequence[str] = ()) -> list[dict]:
    """Measure each ``(setting, jpeg)`` not already in ``store`` (or its reusable CSVs); returns all rows in order."""
    rows = []
    for index, (setting, jpeg) in enumerate(settings, 1):
        row = store.get(setting, jpeg)
        if row is None:
            print(f"[bench] {index}/{len(settings)} {setting.key}{' (+jpeg)' if jpeg else ''}", flush=True)
            row = measure(setting, work_dir, jpeg=jpeg, extra_args=extra_args)
            print(f"[bench]   test/acc={row['test/acc']} jpeg/acc={row.get('jpeg/acc', '')} "
                  f"fit {row['fit_seconds']} s, test {row['test_seconds']} s", flush=True)
        else:
            print(f"[bench] {index}/{len(settings)} {setting.key}: reused", flush=True)
        store.add({key: row.get(key, "") for key in RESULT_COLUMNS})
        rows.append(row)
    return rows


def markdown_table(rows: Sequence[dict], columns: Sequence[str], headers: Optional[Sequence[str]] = None) -> str:
    """A GitHub markdown table of ``rows`` (missing cells empty)."""
    headers = list(headers or columns)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(column, "")) for column in columns) + " |")
    return "\n".join(lines)


def mean_ms(fn: Callable[[], object], repeats: int) -> float:
    """Mean milliseconds of ``repeats`` calls of ``fn`` after two untimed ones (warm-up, compilation)."""
    fn()
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1000


def machine() -> str:
    """One line naming this machine: CPU model, cores, torch version."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def base_parser(description: str, models: bool = False):
    """Arguments every benchmark script takes (and ``--models`` when ``models``)."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    if models:
        parser.add_argument("--models", nargs="+", default=list(MODEL_CONFIGS), choices=list(MODEL_CONFIGS))
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="where CSV and PNG files go")
    parser.add_argument("--work-dir", type=Path, default=REPO / "runs" / "benchmarks",
                        help="derived configs, W&B runs and checkpoints")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny data and budgets (the test suite's check that the script works)")
    return parser


SMOKE_ARGS = (  # 32 calibration images, 2 test batches of 25 images (`limit_test_batches 1` would read "all")
    "--data.init_args.eval_batch_size", "25",
    "--data.init_args.calibration_size", "32",
    "--data.init_args.num_workers", "0",
    "--trainer.limit_test_batches", "2",
    "--trainer.limit_val_batches", "0",  # the fit's validation would read the whole split
)


def prepare(args) -> list[str]:
    """Run from the repo root with W&B offline; returns the extra CLI arguments (the smoke shrink)."""
    os.chdir(REPO)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    return list(SMOKE_ARGS) if args.smoke else []
