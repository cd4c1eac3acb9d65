"""Real devices (`DeviceSpec`, `device_model.py`): ideal == today's integers bit for bit, the physics by hand on
tiny layers (injected draws), chips from seeds, drift compensation, fresh draws for noise-aware training."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from cimq_pl.errors import ConfigError
from cimq_pl.quant import (CIMConv2d, CIMLinear, CIMSpec, DeviceSpec, QuantizerOptions, attach_device_,
                           attached_device, calibrate_, convert_to_cim, device_mode, fold_batchnorm_,
                           set_device_mode_)
from cimq_pl.quant.options import CONVENTIONAL_OPTIONS

NOISY = dict(programming_sigma=0.05, stuck_off_prob=0.01, stuck_on_prob=0.01, drift_nu_mean=0.05,
             drift_nu_std=0.02, read_time=3600.0, adc_offset_lsb=0.5, adc_gain_sigma=0.02)


def _unit_linear(codes, **spec_args) -> CIMLinear:
    """A CIMLinear whose weights are the integer ``codes`` (weight step 1) fed unsigned input codes (step 1)."""
    spec = CIMSpec(rows=16, cols=16, **{"input_bits": 1, "adc_bits": None, **spec_args})
    linear = nn.Linear(codes.shape[1], codes.shape[0], bias=False).double()
    with torch.no_grad():
        linear.weight.copy_(codes)
    layer = CIMLinear.from_linear(linear, spec, QuantizerOptions(weight_granularity="layer")).double()
    with torch.no_grad():
        layer.weight_quantizer.step.fill_(1.0)
        layer.input_quantizer.step.fill_(1.0)
    layer.weight_quantizer.initialized = layer.input_quantizer.initialized = True
    layer.input_quantizer.signed = False
    return layer


def _close(y: torch.Tensor, expected) -> bool:
    """``y`` equals ``expected`` up to the 1e-12 every quantizer step carries (float64)."""
    return torch.allclose(y, torch.as_tensor(expected, dtype=y.dtype), rtol=0, atol=1e-9)


def _inject(layer, draws: dict) -> None:
    """Replace the chip's random draws by known values: N(0,1) draws 0 and U[0,1) draws 0.5 (no fault) except
    ``draws[name] = [(index, value), ...]``."""
    def draw(name, shape, like, uniform=False):
        values = torch.full(tuple(shape), 0.5 if uniform else 0.0, dtype=like.dtype)
        for index, value in draws.get(name, ()):
            values[index] = value
        return values
    layer.device_model._draw = draw


W = torch.tensor([[1.0, -2.0, 0.0], [-1.0, 1.0, 1.0]])  # 2-bit weight codes, in [-2, 1]
ONES = torch.ones(1, 3, dtype=torch.float64)


def test_two_bit_weights_split_as_expected():
    layer = _unit_linear(W, weight_bits=2, cell_bits=1)
    _, trace = layer.simulate(ONES, trace=True)
    assert trace["weight_slices"][:, :, :, 0, 0].tolist() == [[[1, 0, 0], [1, 1, 1]], [[0, -1, 0], [-1, 0, 0]]]
    assert _close(layer(ONES), [[-1.0, 1.0]])


def test_stuck_at_faults_by_hand():
    """Slice 0 (unsigned 1-bit cells, L = 1) of weight (0, 1) holds 0 and is stuck on: it reads 1, the weight
    becomes 1 - 2 = -1. The signed top slice of weight (1, 0) is the pair (G+ = 0, G- = 1); its G- cell is stuck
    off: the pair reads g_off - g_off = 0, the weight becomes 1."""
    layer = _unit_linear(W, weight_bits=2, cell_bits=1)
    attach_device_(layer, DeviceSpec(stuck_off_prob=0.1, stuck_on_prob=0.1))
    _inject(layer, {"stuck+": [((0, 0, 1), 0.15)], "stuck-": [((1, 1, 0), 0.05)]})
    assert _close(layer(ONES), [[0.0, 3.0]])


@pytest.mark.parametrize("compensation, expected", [(False, [[15.0, 12.0, -15.0]]), (True, [[5.0, 0.0, 0.0]])])
def test_stuck_on_pair_cells_and_their_compensation_by_hand(compensation, expected):
    """4-bit weights 5, -3, 0, each a pair of 4-bit cells (L = 15). G+ of 5 and of -3 and G- of 0 are stuck on:
    the pairs read 15 - 0, 15 - 3 and 0 - 15. With stuck_compensation the partner absorbs the stuck cell: G- of 5
    holds 10 (reads 5), G- of -3 holds 15 (reads 0, the nearest a pair with G+ = 15 reaches), G+ of 0 holds 15."""
    layer = _unit_linear(torch.tensor([[5.0], [-3.0], [0.0]]), weight_bits=4)
    attach_device_(layer, DeviceSpec(stuck_on_prob=0.1, stuck_compensation=compensation))
    _inject(layer, {"stuck+": [((0, 0), 0.05), ((0, 1), 0.05)], "stuck-": [((0, 2), 0.05)]})
    assert _close(layer(torch.ones(1, 1, dtype=torch.float64)), expected)


def test_programming_error_by_hand_and_zero_digits_conduct():
    """z = +1 on two cells of slice 0: a 1 digit reads (1 + g0) 1.1 - g0, a 0 digit (g_off) reads 0.1 g0, with
    g0 = g_off / dG = 1 / (150 - 1) for 1-bit cells of the default on/off ratio 150."""
    layer = _unit_linear(W, weight_bits=2, cell_bits=1)
    spec = DeviceSpec(programming_sigma=0.1)
    g0 = spec.off_levels(1)
    assert g0 == pytest.approx(1 / 149)
    attach_device_(layer, spec)
    _inject(layer, {"program+": [((0, 0, 0), 1.0), ((0, 0, 2), 1.0)]})
    assert _close(layer(ONES), [[-0.9 + 0.2 * g0, 1.0]])


def test_lognormal_programming_error_of_a_pair_by_hand():
    """A 4-bit weight 5 is the pair (5, 0); mean-preserving lognormal factors exp(sigma z - sigma^2 / 2), z = 1 on G+
    and z = 0 on G-: it reads (5 + g0) exp(0.1 - 0.005) - g0 exp(-0.005)."""
    layer = _unit_linear(torch.tensor([[5.0]]), weight_bits=4)
    spec = DeviceSpec(programming_sigma=0.1, programming_distribution="lognormal")
    attach_device_(layer, spec)
    _inject(layer, {"program+": [((0, 0, 0), 1.0)]})
    g0 = spec.off_levels(4)
    assert _close(layer(torch.ones(1, 1, dtype=torch.float64)), [[(5 + g0) * math.exp(0.095) - g0 * math.exp(-0.005)]])


def test_reference_column_fault_by_hand():
    """Offset slicing, 4-bit cells: the reference column holds 8 on every row; one reference cell stuck on reads 15,
    so every output of that column block drops by 7 (its row is driven with 1)."""
    codes = torch.tensor([[3.0, -4.0, 0.0], [-8.0, 7.0, 1.0]])
    layer = _unit_linear(codes, weight_bits=4, weight_slicing="offset")
    ideal = layer(ONES)
    assert _close(ideal, [[-1.0, 0.0]])
    attach_device_(layer, DeviceSpec(stuck_on_prob=0.5))
    _inject(layer, {"ref_stuck": [((0, 0, 2, 0, 0), 0.25)], "stuck+": [((0, 0, 0, 0, 0), 0.9)]})
    assert _close(layer(ONES), ideal - 7)


def _adc_layer():
    layer = _unit_linear(W, weight_bits=2, cell_bits=1, adc_bits=4)
    pq = layer.psum_quantizer
    with torch.no_grad():  # ADC step 1: unsigned slice 0 over [0, 15], signed slice 1 over [-8, 7]
        pq.alpha0[0].fill_(15.0)
        pq.alpha0[1].fill_(7.0)
    pq.initialized = True
    return layer


def test_adc_offset_and_gain_error_by_hand():
    """Partial sums: slice 0 [1, 3], slice 1 [-1, -1] (y = p0 + 2 p1 = [-1, 1]). An offset of +1 LSB on every ADC
    makes the codes [2, 4] and [0, 0]: y = [2, 4]. A gain error of +20%: p0 [1.2, 3.6] -> codes [1, 4], p1
    [-1.2, -1.2] -> [-1, -1]: y = [-1, 2]."""
    layer = _adc_layer()
    assert _close(layer(ONES), [[-1.0, 1.0]])
    attach_device_(layer, DeviceSpec(adc_offset_lsb=1.0))
    _inject(layer, {"adc_offset": [((slice(None),), 1.0)]})
    assert _close(layer(ONES), [[2.0, 4.0]])
    attach_device_(layer, DeviceSpec(adc_gain_sigma=0.2))
    _inject(layer, {"adc_gain": [((slice(None),), 1.0)]})
    assert _close(layer(ONES), [[-1.0, 2.0]])


def test_read_noise_variance_of_a_differential_pair():
    """One 4-bit weight 3 (a pair: G+ = 3 + g0, G- = g0 in level units) read 20,000 times with read_sigma 0.1:
    std = 0.1 sqrt((3 + g0)^2 + g0^2)."""
    layer = _unit_linear(torch.tensor([[3.0]]), weight_bits=4)
    spec = DeviceSpec(read_sigma=0.1)
    attach_device_(layer, spec)
    torch.manual_seed(0)
    with torch.no_grad():
        y = layer(torch.ones(20000, 1, dtype=torch.float64))
    g0 = spec.off_levels(4)
    assert float(y.mean()) == pytest.approx(3.0, abs=0.01)
    assert float(y.std()) == pytest.approx(0.1 * math.hypot(3 + g0, g0), rel=0.03)


# ---------------------------------------------------------------------------------------------- whole models
def _resnet20(device=None):
    import timm

    import cimq_pl  # noqa: F401  (registers the CIFAR ResNets)

    torch.manual_seed(0)
    model = timm.create_model("cifar_resnet20").eval()
    fold_batchnorm_(model)
    convert_to_cim(model, CIMSpec(cell_bits=2, weight_slicing="offset"), options=CONVENTIONAL_OPTIONS, device=device)
    calibrate_(model, [torch.randn(8, 3, 32, 32)])
    return model


@pytest.fixture(scope="module")
def resnet_and_images():
    torch.manual_seed(1)
    return _resnet20(), torch.randn(2, 3, 32, 32)


def test_zero_non_idealities_reproduce_the_integer_macro_bit_for_bit(resnet_and_images):
    model, images = resnet_and_images
    with torch.no_grad():
        expected = model(images)
        attach_device_(model, DeviceSpec(read_time=31536000.0))  # every non-ideality 0: no drift either
        assert attached_device(model) == DeviceSpec(read_time=31536000.0)
        assert torch.equal(model(images), expected)
        noisy = copy.deepcopy(model)
        attach_device_(noisy, DeviceSpec(**NOISY))
        assert not torch.equal(noisy(images), expected)
        with device_mode(noisy, "ideal"):  # a device switched off is the integer macro again
            assert torch.equal(noisy(images), expected)
        attach_device_(model, None)
        assert attached_device(model) is None


def test_same_seed_same_chip_other_seed_other_chip(resnet_and_images):
    model, images = resnet_and_images
    with torch.no_grad():
        first = copy.deepcopy(model)
        attach_device_(first, DeviceSpec(**NOISY, seed=3))
        y3 = first(images)
        assert torch.equal(first(images), y3)  # a chip is fixed: no per-conversion noise here
        second = copy.deepcopy(model)
        attach_device_(second, DeviceSpec(**NOISY), seed=3)  # the seed given apart from the spec: the same chip
        assert torch.equal(second(images), y3)
        assert torch.equal(copy.deepcopy(second)(images), y3)  # a copied model is the same chip
        set_device_mode_(second, seed=4)
        y4 = second(images)
        assert not torch.allclose(y4, y3)
        set_device_mode_(second, seed=3)
        assert torch.equal(second(images), y3)
        set_device_mode_(second, time=86400.0)  # the same chip a day later drifts further
        assert not torch.equal(second(images), y3)


def test_convert_to_cim_attaches_the_device_and_calibrates_on_ideal_cells(resnet_and_images):
    model = _resnet20(DeviceSpec(programming_sigma=0.1, seed=5))
    assert attached_device(model).seed == 5
    reference, images = resnet_and_images
    reference = copy.deepcopy(reference)
    attach_device_(reference, DeviceSpec(programming_sigma=0.1, seed=5))
    with torch.no_grad():
        assert torch.equal(model(images), reference(images))


def _conv_layer(adc_bits=None):
    torch.manual_seed(2)
    conv = nn.Conv2d(20, 6, 3, padding=1).double()
    spec = CIMSpec(rows=64, cols=16, weight_bits=4, cell_bits=2, input_bits=4, adc_bits=adc_bits)
    layer = CIMConv2d.from_conv(conv, spec).double()
    x = torch.rand(2, 20, 6, 6, dtype=torch.float64)
    calibrate_(layer, [x])
    return layer, x


def test_drift_compensation_restores_the_t0_output_for_a_uniform_nu():
    """nu = 0.06 on every cell (and the g_off dummy column): a year later each cell reads k = (1 + t/t0)^-nu of its
    t0 value, so the layer (ideal ADC) reads k times its t0 output; one digital gain per layer undoes it."""
    layer, x = _conv_layer()
    spec = DeviceSpec(programming_sigma=0.05, stuck_on_prob=0.01, drift_nu_mean=0.06, drift_compensation=True)
    attach_device_(layer, spec)
    bias = layer.bias.view(1, -1, 1, 1)
    with torch.no_grad():
        at_t0 = layer(x)
        set_device_mode_(layer, time=31536000.0)
        compensated = layer(x)
        attach_device_(layer, spec.replace(drift_compensation=False), time=31536000.0)
        drifted = layer(x)
    k = spec.drift_factor(0.06, 31536000.0)
    assert k == pytest.approx(0.424, abs=1e-3)
    assert torch.allclose(compensated, at_t0, rtol=1e-9, atol=1e-9)
    assert torch.allclose(drifted - bias, k * (at_t0 - bias), rtol=1e-9, atol=1e-9)
    # nu spread across cells: the compensation is no longer exact, but closer than none
    attach_device_(layer, spec.replace(drift_nu_std=0.02), time=31536000.0)
    with torch.no_grad():
        spread = layer(x)
    assert 0 < (spread - at_t0).abs().mean() < (drifted - at_t0).abs().mean()


def test_fresh_draws_follow_the_global_seed_and_keep_gradients():
    layer, x = _conv_layer(adc_bits=4)
    attach_device_(layer, DeviceSpec(**{**NOISY, "read_sigma": 0.02, "adc_noise_lsb": 0.5}), mode="fresh")
    torch.manual_seed(7)
    first = layer(x)
    torch.manual_seed(7)
    second = layer(x)
    assert torch.equal(first, second)  # a step seeded from its position draws the same chip on resume
    assert not torch.equal(layer(x), first)  # the next step draws another chip
    torch.manual_seed(7)
    layer(x).square().sum().backward()
    for name in ("input_quantizer.step", "psum_quantizer.theta"):
        grad = layer.get_parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


BAD_SPECS = [
    (dict(programming_sigma=-0.1), "programming_sigma=-0.1"),
    (dict(g_on=1.0, g_off=2.0), "g_on=1.0"),
    (dict(g_off=-1.0), "g_off=-1.0"),
    (dict(stuck_off_prob=1.5), "stuck_off_prob=1.5"),
    (dict(stuck_off_prob=0.6, stuck_on_prob=0.6), "stuck_on_prob=0.6"),
    (dict(t0=0.0), "t0=0.0"),
    (dict(read_time=-1.0), "read_time=-1.0"),
    (dict(programming_distribution="uniform"), "'uniform'"),
    (dict(adc_gain_sigma=1.0), "adc_gain_sigma=1.0"),
    (dict(drift_nu_mean=float("nan")), "drift_nu_mean=nan"),
    (dict(seed=-2), "seed=-2"),
    (dict(drift_compensation="yes"), "drift_compensation='yes'"),
    (dict(stuck_compensation=1), "stuck_compensation=1"),
]


@pytest.mark.parametrize("kwargs,needle", BAD_SPECS, ids=[needle for _, needle in BAD_SPECS])
def test_bad_device_values_are_refused_with_the_field_and_what_is_allowed(kwargs, needle):
    with pytest.raises(ConfigError, match="expected") as error:
        DeviceSpec(**kwargs)
    assert needle in str(error.value) and str(error.value).startswith("DeviceSpec.")
    assert "\n" not in str(error.value)


def test_spec_derived_quantities():
    spec = DeviceSpec()
    assert spec.on_off_ratio == pytest.approx(150.0)
    assert spec.off_levels(4) == pytest.approx(15 / 149)
    assert spec.is_ideal_at(1e9) and not spec.replace(adc_noise_lsb=0.1).is_ideal_at(0)
    assert spec.cells_at(0) is False and spec.replace(drift_nu_mean=0.05).cells_at(0) is False
    assert spec.replace(drift_nu_mean=0.05).cells_at(1.0)
    assert "programming normal sigma 0.05" in spec.replace(programming_sigma=0.05).describe()
