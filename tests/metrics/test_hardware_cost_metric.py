"""`HardwareCostMetric` against an independent reference, in one process and in two (gloo)."""

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cimq_pl.cost import COUNTER_NAMES, EnergyTable, LayerInfo
from cimq_pl.metrics import HardwareCostMetric, hardware_cost
from cimq_pl.quant import CIMSpec, TileGeometry

SPEC = CIMSpec(rows=64, cols=32, weight_bits=4, cell_bits=2, input_bits=4, adc_bits=5)
GEOMETRIES = [TileGeometry.from_layer(SPEC, 16, 40, (3, 3)), TileGeometry.from_layer(SPEC, 40, 10)]
LAYERS = [LayerInfo("conv", GEOMETRIES[0], 5, True, False), LayerInfo("fc", GEOMETRIES[1], None, False, False)]


def _random_counts(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 10_000, (len(LAYERS), len(COUNTER_NAMES)), generator=generator)


def _reference_energy_fj(counts: torch.Tensor, table: EnergyTable) -> float:
    """Energy written out from the formulas of SPEC 5, without the package's cost functions."""
    total = 0.0
    for info, row in zip(LAYERS, counts.tolist()):
        c = dict(zip(COUNTER_NAMES, row))
        g = info.geometry
        bits = 8 if info.adc_bits is None else info.adc_bits
        t_ns = bits + 1
        adc = (0.538 * bits + 4.3753) * t_ns
        columns = g.out_channels_per_group * g.n_weight_slices + g.n_col_blocks * g.reference_columns_per_array
        outputs = c["output_positions"] * g.out_channels_per_group * g.groups
        total += c["adc_conversions"] * adc
        total += c["input_ones_fed"] * columns * 4.86 * t_ns
        total += c["wordline_activations"] * (1.4 + 0.28 * g.cols)
        total += (c["adc_conversions"] + outputs * g.n_row_blocks) * 23.0
        total += outputs * (g.n_row_blocks if info.per_array_scales else 1) * 87.0
    return total


def test_metric_matches_reference_in_one_process():
    metric = HardwareCostMetric(LAYERS)
    batches = [_random_counts(seed) for seed in range(3)]
    for counts in batches:
        metric.update(counts)
    summed = sum(batches)
    cost = metric.compute()
    assert cost.total_fj == pytest.approx(_reference_energy_fj(summed, EnergyTable()))
    images = int(summed[:, COUNTER_NAMES.index("images")].max())
    assert cost.images == images
    assert cost.energy_per_image_uj == pytest.approx(cost.total_fj / images / 1e9)
    assert cost.macs == int(summed[:, COUNTER_NAMES.index("macs")].sum())
    # the functional twin gives the same
    assert hardware_cost(summed, LAYERS).total_fj == pytest.approx(cost.total_fj)
    metric.reset()
    metric.update(batches[0])
    assert metric.compute().total_fj == pytest.approx(_reference_energy_fj(batches[0], EnergyTable()))


def test_metric_rejects_bad_updates():
    metric = HardwareCostMetric(LAYERS)
    with pytest.raises(ValueError, match=r"counts has shape \(3, 8\): expected \(2, 8\)"):
        metric.update(torch.zeros(3, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"dtype torch.float32: expected an integer dtype"):
        metric.update(torch.zeros(2, 8))


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        metric = HardwareCostMetric(LAYERS)
        for seed in range(rank * 10, rank * 10 + 2):  # each process sees different batches
            metric.update(_random_counts(seed))
        cost = metric.compute()
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as stream:
            json.dump({"total_fj": cost.total_fj, "images": cost.images}, stream)
    finally:
        dist.destroy_process_group()


def test_metric_sums_over_two_processes(tmp_path):
    # spawn, not fork: a forked child of a process that already ran torch ops can deadlock
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    summed = sum(_random_counts(seed) for seed in (0, 1, 10, 11))
    expected = _reference_energy_fj(summed, EnergyTable())
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["total_fj"] == pytest.approx(expected)
        assert result["images"] == int(summed[:, COUNTER_NAMES.index("images")].max())
