"""ADC clip per column (``psum_granularity="column"``): one alpha per bitline, as each bitline has its own ADC.

Calibration by hand, exactness against the float64 reference on every simulation path, gradients reaching every
used entry, a granularity switch after calibration and a checkpoint round trip. (The hypothesis exactness tests
of `test_layers_exact.py` and `test_fused.py` draw ``"column"`` too; export and cost are in their own folders.)
"""

import pytest
import torch
from torch import nn

from cimq_pl.quant import CIMConv2d, CIMLinear, CIMSpec, QuantizerOptions, calibrate_, cim_layers, convert_to_cim
from .reference import reference_conv
from .test_fused import uncompiled

MINMAX = dict(input_observer="minmax", weight_observer="minmax", psum_observer="minmax")


def _two_column_layer(granularity: str) -> CIMLinear:
    """2 inputs x 2 outputs on one 2 x 2 array: 4-bit weights in one 4-bit slice, 4-bit inputs in one cycle.

    Weights [[1, 1], [0.1, 0]] with one layerwise step 1/7 give codes [[7, 7], [1, 0]]: column 0 is 7 x the
    sum of the inputs, column 1 is 1 x the first input."""
    spec = CIMSpec(rows=2, cols=2, weight_bits=4, cell_bits=4, input_bits=4, dac_bits=4, adc_bits=4)
    linear = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, 1.0], [0.1, 0.0]]))
    options = QuantizerOptions(weight_granularity="layer", psum_granularity=granularity, input_signed=False, **MINMAX)
    return CIMLinear.from_linear(linear, spec, options)


def test_minmax_calibration_gives_each_column_its_own_max_psum():
    x = torch.tensor([[15.0, 15.0], [3.0, 0.0]])  # input step 15 / 15 = 1: the codes are the values
    # partial sums: column 0 = 7 x (15 + 15) = 210 and 7 x 3 = 21; column 1 = 15 and 3
    column = _two_column_layer("column")
    column(x)  # lazy calibration, min-max: alpha = max |p| of what each entry reads
    wq = column.weight_quantizer
    assert wq.codes(column._weight4d(), wq.expanded_step()).flatten().tolist() == [7, 7, 1, 0]
    assert column.psum_quantizer.alpha0.shape == (1, 1, 2)
    assert column.psum_quantizer.alpha0.flatten().tolist() == [210.0, 15.0]
    _, trace = column.simulate(x, trace=True)
    own_max = trace["partial_sums"].abs().amax(dim=(0, 1, 2, 3, 5, 6))  # per bitline
    assert torch.equal(column.psum_quantizer.alpha0.flatten(), own_max)
    array = _two_column_layer("array")
    array(x)
    assert array.psum_quantizer.alpha0.flatten().tolist() == [210.0]  # one range for the array's two columns
    # column 1's p = 15 through a 4-bit signed ADC (7 levels): step 15 / 7 reads it exactly, the array's step
    # 210 / 7 = 30 rounds 15 / 30 = 0.5 to code 0
    with torch.no_grad():  # x the weight step 1/7
        assert float(column(x)[0, 1]) == pytest.approx(15 / 7) and float(array(x)[0, 1]) == 0.0


# offset slicing (a reference column per array), 2 slices of 2 columns per array: 5 outputs per group in 3 column
# blocks (the last ragged); a 3 x 3 kernel on 9 rows: one input channel per row block
SPEC = CIMSpec(rows=9, cols=5, weight_bits=4, cell_bits=2, weight_slicing="offset", input_bits=3, dac_bits=2,
               adc_bits=4)


def _column_conv(dtype=torch.float64, groups: int = 1, seed: int = 0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(6, 5 * groups, 3, padding=1, groups=groups).to(dtype)
    x = torch.rand(2, 6, 5, 5, dtype=dtype)
    layer = CIMConv2d.from_conv(conv, SPEC, QuantizerOptions(psum_granularity="column", **MINMAX)).to(dtype)
    layer(x)  # lazy calibration
    with torch.no_grad():  # clip levels that clip and round
        layer.psum_quantizer.theta.uniform_(-1.5, 0.3)
    return layer, x


@pytest.mark.parametrize("groups", [1, 2])
def test_column_layer_matches_the_reference_on_every_path(groups):
    layer, x = _column_conv(groups=groups)
    geo, pq = layer.geometry, layer.psum_quantizer
    assert geo.col_block_sizes == (2, 2, 1) and geo.n_row_blocks == 6 // groups  # one input channel per array
    assert pq.alpha0.shape == (3, groups * geo.n_row_blocks, 5)  # 2 slices + reference, per output column
    expected = reference_conv(layer, x)
    out, trace = layer.simulate(x, trace=True)  # eager
    assert torch.equal(trace["adc_codes"], expected["adc_codes"])
    torch.testing.assert_close(out, expected["output"], rtol=1e-9, atol=1e-9)
    layer.eval()
    with torch.no_grad():  # the no-grad fast path (channels-last convolutions, in-place ADC)
        torch.testing.assert_close(layer(x), expected["output"], rtol=1e-9, atol=1e-9)
    layer.simulation = "compiled"
    with uncompiled():
        torch.testing.assert_close(layer(x), expected["output"], rtol=1e-9, atol=1e-9)
    # float32, no gradient: the fast path gives the eager path's bits
    layer32, x32 = _column_conv(torch.float32, groups)
    layer32.eval()
    plain = layer32(x32).detach()
    with torch.no_grad():
        assert torch.equal(layer32(x32), plain)


def test_every_used_clip_learns_and_the_unused_ones_stay_sane():
    layer, x = _column_conv()
    pq, geo = layer.psum_quantizer, layer.geometry
    layer(x).square().sum().backward()
    grad = pq.theta.grad
    used = torch.ones_like(grad, dtype=torch.bool)
    used[-1, :, geo.n_col_blocks:] = False  # the reference kind: one entry per column block only
    assert (grad[used] != 0).all()
    assert (grad[~used] == 0).all()
    assert torch.equal(pq.alpha0[~used], torch.ones(int((~used).sum()), dtype=pq.alpha0.dtype))  # never NaN
    assert torch.isfinite(pq.alpha0).all()
    assert layer.adc_range_settings() == int(used.sum()) == geo.n_row_blocks * (2 * 5 + 3)


@pytest.mark.parametrize("observer", ["mse", "percentile"])
def test_other_observers_give_unused_entries_a_sane_clip(observer):
    torch.manual_seed(0)
    layer = CIMConv2d.from_conv(nn.Conv2d(6, 5, 3, padding=1), SPEC,
                                QuantizerOptions(psum_granularity="column", psum_observer=observer))
    layer(torch.rand(2, 6, 5, 5))
    alpha0 = layer.psum_quantizer.alpha0
    assert torch.isfinite(alpha0).all() and (alpha0[-1, :, layer.geometry.n_col_blocks:] == 1).all()


def test_switching_array_to_column_after_calibration_calibrates_again():
    layer, x = _column_conv()
    layer.set_options(QuantizerOptions(psum_granularity="array", **MINMAX))
    assert not layer.psum_quantizer.initialized  # another shape: calibration again
    layer(x)
    array_alpha = layer.psum_quantizer.alpha0.clone()
    assert array_alpha.shape == (3, 6, 3) and (array_alpha != 1).all()
    layer.set_options(QuantizerOptions(psum_granularity="column", **MINMAX))
    assert not layer.psum_quantizer.initialized and layer.psum_quantizer.alpha0.shape == (3, 6, 5)
    layer(x)  # the channels now index per-column entries (not the array's cached ones)
    column_alpha = layer.psum_quantizer.alpha0
    assert (column_alpha[:2] != 1).all() and (column_alpha[2, :, :3] != 1).all()
    # each array's range is the widest of its columns' (min-max)
    blocks = layer.geometry.col_block_of_column()
    for block in range(3):
        columns = (blocks == block).nonzero().flatten()
        torch.testing.assert_close(column_alpha[:2, :, columns].amax(-1), array_alpha[:2, :, block])
    torch.testing.assert_close(column_alpha[2, :, :3], array_alpha[2])


def test_checkpoint_of_a_column_model_loads_into_a_fresh_conversion():
    torch.manual_seed(0)
    options = QuantizerOptions(psum_granularity="column", **MINMAX)
    images = torch.rand(3, 6, 5, 5)

    def converted():
        torch.manual_seed(1)
        model = nn.Sequential(nn.Conv2d(6, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 4, 3))
        convert_to_cim(model, SPEC, options=options)
        return model.eval()

    saved = converted()
    calibrate_(saved, [images])
    with torch.no_grad():
        for _, layer in cim_layers(saved):
            layer.psum_quantizer.theta.normal_(0, 0.3)
    loaded = converted()
    loaded.load_state_dict(saved.state_dict())
    for (_, a), (_, b) in zip(cim_layers(saved), cim_layers(loaded)):
        assert b.psum_quantizer.granularity == "column" and b.psum_quantizer.initialized
        assert torch.equal(a.psum_quantizer.alpha(), b.psum_quantizer.alpha())
    assert torch.equal(loaded(images), saved(images))



@pytest.mark.parametrize("adc_bits,resolved", [(4, "mse"), (5, "mse"), (6, "minmax"), (8, "minmax")])
def test_auto_observer_takes_min_max_ranges_for_wide_adcs_and_the_mse_clip_below(adc_bits, resolved):
    """``psum_observer="auto"`` resolves by the layer's own ADC bits (`AUTO_MINMAX_ADC_BITS` = 6), and calibrates
    exactly as the observer it resolves to."""
    from cimq_pl.quant.psum import AUTO_MINMAX_ADC_BITS

    assert AUTO_MINMAX_ADC_BITS == 6
    spec = CIMSpec(rows=16, cols=16, weight_bits=4, input_bits=4, adc_bits=adc_bits)
    x = torch.rand(2, 6, 5, 5)
    alphas = {}
    for observer in ("auto", resolved):
        torch.manual_seed(0)  # the same layer and the same observer subsample
        layer = CIMConv2d.from_conv(nn.Conv2d(6, 5, 3, padding=1), spec,
                                    QuantizerOptions(psum_granularity="column", psum_observer=observer))
        assert layer.psum_quantizer.observer.method == resolved
        calibrate_(layer, [(x,)])
        alphas[observer] = layer.psum_quantizer.alpha0
    assert torch.equal(alphas["auto"], alphas[resolved])


def test_auto_observer_is_a_choice_of_the_adc_only():
    from cimq_pl.errors import ConfigError
    from cimq_pl.quant.techniques.psum_clipping import PartialSumClippingConfig

    assert PartialSumClippingConfig().observer == "auto"  # the technique's default
    with pytest.raises(ConfigError, match=r"input_observer='auto' is invalid: expected one of \['minmax', 'percentile', 'mse'\]"):
        QuantizerOptions(input_observer="auto")
    with pytest.raises(ConfigError, match=r"observer='kl' is invalid: expected one of \['minmax', 'percentile', 'mse', 'auto'\]"):
        PartialSumClippingConfig(observer="kl")
