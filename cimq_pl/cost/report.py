"""Cost of a CIM configuration without training, for a user sizing a macro.

`cost_report` converts a float model to a macro, calibrates it on a few images, runs a few evaluation
images with the event counters on, and prints the per-layer cost beside the conventional baseline's.
From the command line, with the run's config files (`cimq_pl.trainer.CIMQTrainer.cost`)::

    python -m cimq_pl cost --config configs/resnet20_cifar10.yaml --config configs/quant/conventional.yaml --images 64

``python -m cimq_pl.cost.report`` (flags instead of config files) is deprecated; its `CIMSpec` and
`QuantizerOptions` flags are derived from the dataclass fields. Only that command line imports the
datamodules (and so Lightning); the functions are pure PyTorch.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import typing
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import nn

from cimq_pl.cost.baseline import BASELINE_ADC_BITS, build_baseline
from cimq_pl.cost.energy import EnergyTable
from cimq_pl.cost.layers import describe_layers, take_counts, uncosted_layers
from cimq_pl.cost.model import NetworkCost, hw_efficiency
from cimq_pl.cost.tables import format_table
from cimq_pl.errors import ConfigError
from cimq_pl.metrics.hardware import HardwareCostMetric
from cimq_pl.quant.convert import calibrate_, cim_layers, convert_to_cim, fold_batchnorm_, set_collect_stats
from cimq_pl.quant.options import CONVENTIONAL_OPTIONS, QuantizerOptions
from cimq_pl.quant.spec import CIMSpec

__all__ = ["CostReport", "cost_report", "describe_macro", "evaluate_cost", "first_images", "main", "write_report_files"]


@dataclass
class CostReport:
    """What `cost_report` measured.

    Attributes:
        cost: the configuration's `NetworkCost`.
        baseline: the conventional baseline's `NetworkCost` (None when not requested).
        accuracy: top-1 accuracy of the configuration on the evaluated images (None without labels).
        baseline_accuracy: the baseline's, likewise.
        uncosted: float conv/linear layers left digital (not on the arrays, not costed).
    """

    cost: NetworkCost
    baseline: Optional[NetworkCost] = None
    accuracy: Optional[float] = None
    baseline_accuracy: Optional[float] = None
    uncosted: list = field(default_factory=list)

    @property
    def efficiency(self) -> float:
        """Baseline energy / configuration energy per image (NaN without a baseline)."""
        return hw_efficiency(self.baseline, self.cost) if self.baseline is not None else float("nan")

    def format(self, title: str = "") -> str:
        """The per-layer table, totals, baseline, efficiency and accuracies as text."""
        text = format_table(self.cost, self.baseline, title)
        if self.accuracy is not None:
            text += f"\ntop-1 accuracy on the evaluated images: {self.accuracy:.4f}"
            if self.baseline_accuracy is not None:
                text += f" (baseline {self.baseline_accuracy:.4f})"
        if self.uncosted:
            text += f"\nnot costed (left digital): {', '.join(self.uncosted)}"
        return text


def _split(batch):
    if isinstance(batch, (tuple, list)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


@torch.no_grad()
def evaluate_cost(model: nn.Module, batches: Iterable, table: Optional[EnergyTable] = None) -> tuple:
    """Run a converted, calibrated ``model`` on ``batches`` with the event counters on.

    Args:
        model: converted model (eval mode is set).
        batches: image tensors or (images, labels) batches on the model's device.
        table: per-event energies.

    Returns:
        ``(NetworkCost, accuracy)``; accuracy is None when no labels were given.
    """
    model.eval()
    layers = [layer for _, layer in cim_layers(model)]
    device = next((parameter.device for parameter in model.parameters()), torch.device("cpu"))
    metric = HardwareCostMetric(describe_layers(model), table, sync_on_compute=False).to(device)  # this process
    set_collect_stats(model, True, reset=True)
    correct, seen = 0, 0
    try:
        for batch in batches:
            images, labels = _split(batch)
            logits = model(images)
            metric.update(take_counts(layers, device))
            if labels is not None:
                correct += int((logits.argmax(1) == labels).sum())
                seen += labels.numel()
    finally:
        set_collect_stats(model, False, reset=True)
    if metric.update_count == 0:
        raise ValueError("no evaluation batch was given: expected at least one batch of images")
    return metric.compute(), (correct / seen if seen else None)


def cost_report(
    model: nn.Module,
    spec: Optional[CIMSpec],
    images: Iterable,
    calibration: Optional[Iterable] = None,
    options: Optional[QuantizerOptions] = None,
    table: Optional[EnergyTable] = None,
    baseline: bool = True,
    baseline_adc_bits: int = BASELINE_ADC_BITS,
    print_fn: Optional[Callable[[str], None]] = print,
    title: str = "",
) -> CostReport:
    """Cost of running ``model`` on the macro ``spec``, measured on ``images``, and of its conventional baseline.

    Args:
        model: a float model (BN is folded and it is converted on a deep copy; the argument is untouched), or
            an already converted and calibrated model (then ``spec`` must be None; used as is).
        spec: the macro; None when ``model`` is already converted.
        images: re-iterable evaluation batches (tensors or (images, labels)) on the model's device.
        calibration: re-iterable calibration batches (train split); default ``images`` (acceptable for a
            sizing estimate, not for an accuracy figure).
        options: quantizer choices of the configuration (default `QuantizerOptions()`, the CIMQ defaults).
        table: per-event energies (default `EnergyTable()`, NeuroSim 22 nm).
        baseline: also build, calibrate and run the conventional baseline (`build_baseline`).
        baseline_adc_bits: ADC bits of the baseline.
        print_fn: where the table goes (None: print nothing).
        title: first line of the printed table.

    Raises:
        ConfigError: when ``spec`` is missing for a float model or given for a converted one, or the
            converted model has no CIM layer.
    """
    table = table or EnergyTable()
    images = list(images)
    calibration = images if calibration is None else list(calibration)
    converted = bool(cim_layers(model))
    if converted and spec is not None:
        raise ConfigError("cost_report: the model is already converted: pass spec=None")
    if not converted:
        if spec is None:
            raise ConfigError("cost_report: spec is required for a float model (e.g. CIMSpec(rows=128, cols=128))")
        model = copy.deepcopy(model).eval()
        fold_batchnorm_(model)
        convert_to_cim(model, spec, options=options or QuantizerOptions())
        if not cim_layers(model):
            raise ConfigError("cost_report: no layer of the model could be mapped on the macro")
        calibrate_(model, calibration)
    cost, accuracy = evaluate_cost(model, images, table)
    report = CostReport(cost=cost, accuracy=accuracy, uncosted=uncosted_layers(model))
    if baseline:
        reference = build_baseline(model, calibration, adc_bits=baseline_adc_bits)
        report.baseline, report.baseline_accuracy = evaluate_cost(reference, images, table)
    if print_fn is not None:
        print_fn(report.format(title))
    return report


def describe_macro(model_name: str, spec: CIMSpec, overrides: Optional[dict] = None) -> str:
    """One line naming the network and the macro (and how many per-layer overrides change it), the title of a
    printed report."""
    text = f"{model_name} on {spec.rows}x{spec.cols} arrays, W{spec.weight_bits}A{spec.input_bits} ADC {spec.adc_bits}"
    return text + (f" ({len(overrides)} per-layer override(s), adc column)" if overrides else "")


def first_images(loader: Iterable, limit: int, device: torch.device) -> list:
    """The first ``limit`` images of ``loader`` as (images, labels) batches on ``device``."""
    batches, seen = [], 0
    for images, labels in loader:
        images, labels = images[: limit - seen], labels[: limit - seen]
        batches.append((images.to(device), labels.to(device)))
        seen += len(labels)
        if seen >= limit:
            break
    return batches


def write_report_files(report: CostReport, layers_csv=None, summary_csv=None, picture=None, run: str = "") -> list:
    """Write the per-layer CSV, the one-row summary CSV and the energy picture of ``report`` (each when its path
    is given, atomically); returns the paths written."""
    from cimq_pl.cost.tables import LAYER_COLUMNS, SUMMARY_COLUMNS, layer_rows, summary_row, write_csv_atomic

    written = []
    if layers_csv:
        written.append(write_csv_atomic(layers_csv, layer_rows(report.cost), LAYER_COLUMNS))
    if summary_csv:
        row = summary_row(report.cost, report.baseline, run=run, stage="report", accuracy=report.accuracy)
        written.append(write_csv_atomic(summary_csv, [row], SUMMARY_COLUMNS))
    if picture:
        from cimq_pl.cost.plots import plot_energy_breakdown

        written.append(plot_energy_breakdown(report.cost, picture))
    return written


# ---------------------------------------------------------------------------------------------- command line
#: Printed first by the deprecated ``python -m cimq_pl.cost.report``.
DEPRECATION = ("warning: `python -m cimq_pl.cost.report` is deprecated and goes in the next release: use "
               "`python -m cimq_pl cost --config <model config> --config <technique config> [--images N]` "
               "(the run's config files)")


def _optional(parse: Callable) -> Callable:
    def parse_optional(text: str):
        return None if text.lower() in ("none", "null", "ideal", "float") else parse(text)

    parse_optional.__name__ = f"optional {parse.__name__}"
    return parse_optional


def _boolean(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a boolean: expected true or false")
    return text.lower() == "true"


def _parser_of(hint) -> Callable:
    """A command-line parser of a dataclass field's type: int, float, bool, a Literal of strings, or Optional[...]."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Union and type(None) in args:
        (inner,) = [arg for arg in args if arg is not type(None)]
        return _optional(_parser_of(inner))
    return {int: int, float: float, bool: _boolean}.get(hint, str)  # Literal choices: checked by the dataclass


def _add_fields(group, cls: type) -> None:
    """One ``--field-name`` flag per field of the dataclass ``cls``, typed and defaulted as the field."""
    hints, defaults = typing.get_type_hints(cls), cls()
    for spec_field in dataclasses.fields(cls):
        name = spec_field.name
        group.add_argument(f"--{name.replace('_', '-')}", dest=name, type=_parser_of(hints[name]),
                           default=getattr(defaults, name), help=f"{cls.__name__}.{name} (default %(default)s)")


def _from_fields(cls: type, args):
    return cls(**{spec_field.name: getattr(args, spec_field.name) for spec_field in dataclasses.fields(cls)})


def _pretrained(text: str):
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    return text


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m cimq_pl.cost.report`` argument parser (deprecated: ``python -m cimq_pl cost``)."""
    parser = argparse.ArgumentParser(
        prog="python -m cimq_pl.cost.report",
        description="Deprecated: use `python -m cimq_pl cost --config ...`. Print the hardware cost (energy/image, "
        "TOPS/W, breakdown per layer) of a CNN on a CIM macro, beside the conventional 8-bit-ADC baseline, "
        "without training. 'none' gives an optional field null (e.g. --adc-bits none: ideal ADC).",
    )
    model = parser.add_argument_group("model and data")
    model.add_argument("--model", default="cifar_resnet20", help="timm model name (default %(default)s)")
    model.add_argument("--num-classes", type=int, default=10, help="classifier outputs (default %(default)s)")
    model.add_argument("--pretrained", type=_pretrained, default=False,
                       help="checkpoint path/URL, 'true' (published weights) or 'false' (random init; default)")
    model.add_argument("--data", required=True, help="dataset root (see the datamodules), e.g. ../shared/data/cifar10_lossless")
    model.add_argument("--dataset", choices=("cifar10", "cifar100", "imagenet"), default="cifar10")
    model.add_argument("--images", type=int, default=64, help="evaluation (test split) images (default %(default)s)")
    model.add_argument("--calibration-images", type=int, default=64,
                       help="calibration images from the train split (default %(default)s)")
    model.add_argument("--batch-size", type=int, default=64, help="images per batch (default %(default)s)")
    model.add_argument("--device", default="cpu", help="torch device (default %(default)s)")
    _add_fields(parser.add_argument_group("macro (CIMSpec)"), CIMSpec)
    quant = parser.add_argument_group("quantizers (QuantizerOptions)")
    quant.add_argument("--conventional", action="store_true",
                       help="conventional quantizers for the configuration too (CONVENTIONAL_OPTIONS; the flags "
                            "below are then ignored)")
    _add_fields(quant, QuantizerOptions)
    cost = parser.add_argument_group("cost")
    cost.add_argument("--energy-table", default=None, help="YAML energy table (default: NeuroSim 22 nm)")
    cost.add_argument("--no-baseline", action="store_true", help="skip the conventional baseline")
    cost.add_argument("--baseline-adc-bits", type=int, default=BASELINE_ADC_BITS)
    cost.add_argument("--csv", default=None, help="write the per-layer table to this CSV file")
    cost.add_argument("--summary-csv", default=None, help="write the one-row summary to this CSV file")
    cost.add_argument("--plot", default=None, help="write the energy breakdown per layer to this PNG file")
    return parser


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise ConfigError(f"--{name}={value} is invalid: expected an integer >= 1")


def _loaders(args, model: nn.Module):
    import timm.data

    from cimq_pl.datamodules import CIFAR10DataModule, CIFAR100DataModule, ImageNetDataModule

    config = timm.data.resolve_model_data_config(model)
    classes = {"cifar10": CIFAR10DataModule, "cifar100": CIFAR100DataModule, "imagenet": ImageNetDataModule}
    kwargs = dict(root=args.data, batch_size=args.batch_size, num_workers=0, calibration_size=args.calibration_images,
                  mean=tuple(config["mean"]), std=tuple(config["std"]))
    if args.dataset != "imagenet":
        kwargs["download"] = False
    datamodule = classes[args.dataset](**kwargs)
    device = torch.device(args.device)
    return (first_images(datamodule.test_dataloader(), args.images, device),
            first_images(datamodule.calibration_dataloader(), args.calibration_images, device))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status (2 on bad input, with one ``error:`` line)."""
    print(DEPRECATION, file=sys.stderr)
    args = build_parser().parse_args(argv)
    try:
        for name in ("images", "calibration_images", "batch_size"):
            _positive(name.replace("_", "-"), getattr(args, name))
        spec = _from_fields(CIMSpec, args)
        options = CONVENTIONAL_OPTIONS if args.conventional else _from_fields(QuantizerOptions, args)
        table = EnergyTable.from_yaml(args.energy_table) if args.energy_table else EnergyTable()
        from cimq_pl.models import create_model

        model = create_model(args.model, args.num_classes, args.pretrained).to(args.device).eval()
        images, calibration = _loaders(args, model)
        title = describe_macro(args.model, spec)
        report = cost_report(model, spec, images, calibration, options, table, baseline=not args.no_baseline,
                             baseline_adc_bits=args.baseline_adc_bits, title=title)
    except (ConfigError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    write_report_files(report, args.csv, args.summary_csv, args.plot, run=title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
