"""QDrop keep masks (`cimq_pl.quant.dropping.keep_mask`): exact ends, the asked probability, seeded draws."""

import math

import pytest
import torch

from cimq_pl.quant.dropping import MASK_RESOLUTION, keep_mask, mix_kept
from cimq_pl.quant.layout import is_channels_last, select_rows
from cimq_pl.seeding import seed_step


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 5, 7), (32, 16, 8, 8)])
def test_probability_zero_and_one_are_exact(shape):
    like = torch.empty(shape)
    assert keep_mask(like, 0.0).shape == like.shape and not keep_mask(like, 0.0).any()
    assert keep_mask(like, 1.0).dtype == torch.bool and keep_mask(like, 1.0).all()


@pytest.mark.parametrize("keep_prob", [0.1, 0.5, 0.7, 0.95])
def test_the_kept_fraction_is_the_keep_probability(keep_prob):
    torch.manual_seed(0)
    n = 400_003  # not a multiple of the four lanes of a draw
    kept = keep_mask(torch.empty(n), keep_prob).double().mean().item()
    assert abs(kept - keep_prob) < 5 * math.sqrt(keep_prob * (1 - keep_prob) / n)


@pytest.mark.parametrize("keep_prob, lanes", [(0.5, 8), (0.3, 4)])  # 8-bit lanes for multiples of 1/256
def test_every_lane_of_a_draw_keeps_with_the_keep_probability(keep_prob, lanes):
    """Each lane of the 64-bit draws (the sign bit's lane included) is kept with probability ``keep_prob``."""
    torch.manual_seed(3)
    n = 100_000
    kept = keep_mask(torch.empty(lanes * n), keep_prob).view(-1, lanes).double().mean(0)
    assert torch.all((kept - keep_prob).abs() < 5 * math.sqrt(keep_prob * (1 - keep_prob) / n))


def test_the_keep_probability_is_resolved_to_a_multiple_of_two_to_the_minus_sixteen():
    """p = 1.4 / 65536 rounds to one level out of 65536, so at most that fraction of a large mask is kept."""
    torch.manual_seed(1)
    n = 2**22
    kept = keep_mask(torch.empty(n), 1.4 * MASK_RESOLUTION).sum().item()
    assert abs(kept - n * MASK_RESOLUTION) < 6 * math.sqrt(n * MASK_RESOLUTION)


def test_the_same_seed_gives_the_same_mask_and_seed_step_seeds_the_cpu_like_manual_seed():
    like = torch.empty(5, 6, 7)
    torch.manual_seed(11)
    first = keep_mask(like, 0.5)
    seed_step(11)
    second = keep_mask(like, 0.5)
    assert torch.equal(first, second) and 0 < first.sum() < first.numel()
    seed_step(11, "cpu")
    assert torch.equal(torch.rand(4), (torch.manual_seed(11), torch.rand(4))[1])


@pytest.mark.parametrize("keep_prob", [0.5, 0.3, 1.0])  # 8-bit lanes, 16-bit lanes, keep everything
def test_a_channels_last_mask_has_the_same_values_stored_channels_last(keep_prob):
    """The compiled path asks for masks in its layout: the same draws give the same element values."""
    nchw = torch.empty(3, 5, 4, 6)
    nhwc = nchw.contiguous(memory_format=torch.channels_last)
    masks = []
    for like, channels_last in ((nchw, None), (nhwc, None), (nchw, True)):
        torch.manual_seed(7)
        masks.append(keep_mask(like, keep_prob, channels_last))
    assert masks[0].is_contiguous() and all(is_channels_last(m) for m in masks[1:])
    assert all(torch.equal(m, masks[0]) for m in masks[1:])
    torch.manual_seed(7)
    assert keep_mask(nhwc, keep_prob, channels_last=False).is_contiguous()  # asked for NCHW: NCHW
    assert keep_mask(torch.empty(15), keep_prob, channels_last=True).shape == (15,)  # not 4-D: as it is


def test_select_rows_is_indexing_in_the_tensors_own_layout():
    indices = torch.tensor([3, 0, 3, 1])
    for tensor in (torch.rand(5, 6, 2, 3), torch.rand(5, 6, 2, 3).contiguous(memory_format=torch.channels_last),
                   torch.rand(5, 7)):
        rows = select_rows(tensor, indices)
        assert torch.equal(rows, tensor[indices]) and is_channels_last(rows) == is_channels_last(tensor)


def test_mix_kept_is_where_bit_for_bit_with_its_gradients():
    torch.manual_seed(4)
    kept, dropped = torch.randn(3, 4, 5, 6, requires_grad=True), torch.randn(3, 4, 5, 6, requires_grad=True)
    keep = keep_mask(kept, 0.5)
    mixed = mix_kept(keep, kept, dropped)
    assert torch.equal(mixed, torch.where(keep, kept, dropped))
    grad = torch.randn_like(mixed)
    mixed.backward(grad)
    assert torch.equal(kept.grad, torch.where(keep, grad, 0.0)) and torch.equal(dropped.grad, torch.where(keep, 0.0, grad))
