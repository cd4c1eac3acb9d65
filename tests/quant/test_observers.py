"""Observers: min-max, percentile and MSE clip search, per group."""

import pytest
import torch

from cimq_pl.quant import RangeObserver
from cimq_pl.quant.observers import _squared_error, mse_clip, quantize_with_alpha


def test_minmax_and_percentile_per_group():
    observer = RangeObserver("percentile", percentile=50.0)
    values = torch.tensor([[1.0, -4.0, 2.0], [0.5, 0.25, 3.0], [9.0, 1.0, 1.0]])
    observer.update(values)
    groups = torch.tensor([0, 0, 1])
    # signed: |x| of group 0 = {1, 4, 2, .5, .25, 3}: median 1.5; group 1 = {9, 1, 1}: median 1
    assert observer.compute(groups, 2, -8, 7, 7).tolist() == [1.5, 1.0]
    minmax = RangeObserver("minmax")
    minmax.update(values[:, :2])
    minmax.update(values[:, 2:])
    assert minmax.compute(groups, 2, -8, 7, 7).tolist() == [4.0, 9.0]
    assert minmax.compute(groups, 2, 0, 15, 15).tolist() == [3.0, 9.0]  # unsigned: max(x, 0)


def test_mse_clip_ignores_outlier_and_is_vectorised_over_groups():
    torch.manual_seed(0)
    body = torch.randn(2, 2000)
    body[0, 0] = 40.0  # outlier in group 0 only
    alpha = mse_clip(body, torch.tensor([0, 1]), 2, -8, 7, 7)
    assert alpha[0] < 10 and alpha[1] <= body[1].abs().max() + 1e-6
    error = lambda a, x: ((torch.clamp(torch.round(x / (a / 7)), -8, 7) * a / 7 - x) ** 2).sum()
    assert error(alpha[0], body[0]) < error(torch.tensor(40.0), body[0])


@pytest.mark.parametrize("qmin,qmax,levels,project", [(-8, 7, 7, None), (0, 15, 15, None),
                                                      (0, 15, 15, lambda c: torch.floor(c))])
def test_in_place_squared_error_equals_the_plain_quantizer_bit_for_bit(qmin, qmax, levels, project):
    """The MSE search's in-place error is the same float operations as `quantize_with_alpha`, in the same order."""
    torch.manual_seed(0)
    samples, alpha = torch.randn(64, 500) * 3, torch.rand(64, 1) * 4 + 0.05
    plain = (quantize_with_alpha(samples, alpha, qmin, qmax, levels, project) - samples).pow(2).sum(1)
    assert torch.equal(_squared_error(samples, alpha, qmin, qmax, levels, project), plain)


@pytest.mark.parametrize("items,samples_per_item,n_groups", [(7, 300, 3), (333, 4096, 5), (40, 70_000, 40),
                                                             (200, 96, 1)])
@pytest.mark.parametrize("qmin,qmax,levels,project", [(-8, 7, 7, None), (0, 15, 15, lambda c: torch.floor(c))])
def test_blocked_mse_search_equals_one_pass_per_candidate_bit_for_bit(items, samples_per_item, n_groups, qmin, qmax,
                                                                      levels, project):
    """Blocks of items (of 2^16 samples, of 3 items, and of one item where an item's samples exceed a block; groups
    spread over blocks) give the clips of one pass over all items per candidate."""
    torch.manual_seed(items)
    samples = torch.randn(items, samples_per_item) * torch.rand(items, 1) * 5
    groups = torch.randint(0, n_groups, (items,))
    groups[:n_groups] = torch.arange(n_groups)  # every group has an item
    one_pass = mse_clip(samples, groups, n_groups, qmin, qmax, levels, project=project, block_elements=None)
    for block_elements in (2**16, 3 * samples_per_item):
        blocked = mse_clip(samples, groups, n_groups, qmin, qmax, levels, project=project,
                           block_elements=block_elements)
        assert torch.equal(blocked, one_pass), block_elements


def test_observer_misconfiguration_and_empty():
    with pytest.raises(ValueError, match=r"method='kl' .*minmax"):
        RangeObserver("kl")
    with pytest.raises(ValueError, match=r"percentile=120 .*\(0, 100\]"):
        RangeObserver("percentile", percentile=120)
    with pytest.raises(RuntimeError, match="seen no data"):
        RangeObserver().compute(torch.zeros(1, dtype=torch.long), 1, 0, 1, 1)


def test_activation_step_scale_multiplies_the_observers_step_exactly():
    from cimq_pl.quant import ActivationQuantizer

    torch.manual_seed(0)
    x = torch.rand(4, 3, 5, 5) * 2.5
    plain, scaled = ActivationQuantizer(4, max_ones=2, observer="mse"), ActivationQuantizer(4, max_ones=2, observer="mse", step_scale=2.0)
    plain.init_from_data(x)
    scaled.init_from_data(x)
    assert scaled.step.item() == 2.0 * plain.step.item() and plain.step.item() > 0
    with pytest.raises(ValueError, match="step_scale=0 is invalid"):
        ActivationQuantizer(4, step_scale=0)
