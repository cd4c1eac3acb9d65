"""The convolution-work benchmark (its sparse weight gradient equals the per-cycle one, its smoke table), the
calibration-speed benchmark (its smoke table, the same clips both ways), the PTQ step profile (its Adam switch,
a smoke fit with a profiled unit) and the weight-side benchmark (compiled = eager, its smoke table)."""

from __future__ import annotations

import sys

import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import adc_range_shapes  # noqa: E402
import calibration_speed  # noqa: E402
import conv_work  # noqa: E402
import ptq_step_profile  # noqa: E402
import weight_side  # noqa: E402


def test_adc_range_shapes_by_hand():
    """Partial sums on an unsigned 3-bit grid (0..7) lose nothing in any 3-bit shape; shifted to 100..107 only the
    asymmetric shapes (a range [lo, hi]) still fit them exactly."""
    torch.manual_seed(0)
    grid = torch.randint(0, 8, (2, 1, 1, 1, 3, 4, 4)).double()
    grid[..., 0, 0] = 0.0
    grid[..., 0, 1] = 7.0  # both ends in every cycle and column
    trace = {"partial_sums": grid, "cycle_weights": (1, 2)}
    errors = adc_range_shapes.layer_errors(trace, 3, 8)
    assert [errors[shape] for shape in adc_range_shapes.SHAPES[:4]] == [0.0] * 4
    shifted = adc_range_shapes.layer_errors({**trace, "partial_sums": grid + 100}, 3, 8)
    assert shifted["asymmetric"] == shifted["asymmetric per cycle"] == 0.0
    assert shifted["symmetric"] > 0 and shifted["per cycle"] > 0 and shifted["symmetric, one bit more"] > 0
    # a range per cycle is each cycle's own best: the sum of the cycles searched alone (on the grid, cycle 0 wants
    # its whole range; half-normal partial sums in cycle 1 want a clip)
    mixed = grid.clone()
    mixed[1] = torch.randn(mixed[1].shape, dtype=mixed.dtype).abs() * 10
    both = adc_range_shapes.layer_errors({**trace, "partial_sums": mixed}, 3, 8)
    alone = [adc_range_shapes.layer_errors({"partial_sums": mixed[j:j + 1], "cycle_weights": (w,)}, 3, 8)
             for j, w in enumerate(trace["cycle_weights"])]
    for shape in ("per cycle", "asymmetric per cycle"):
        assert both[shape] == pytest.approx(sum(errors[shape] for errors in alone), rel=1e-12)
    assert both["per cycle"] < both["symmetric"]


def test_swapped_adc_conversions_apply_inside_the_block_only():
    """The ranges chosen again replace a layer's ADC conversion inside `swapped_conversions` (asymmetric ranges
    fitted to this very input change the output) and the layer's own conversion is back afterwards."""
    from torch import nn

    from cimq_pl.quant import CIMConv2d, CIMSpec

    torch.manual_seed(0)
    layer = CIMConv2d.from_conv(nn.Conv2d(4, 3, 3, padding=1), CIMSpec(rows=16, cols=8, weight_bits=4, input_bits=3,
                                                                         adc_bits=3))
    x = torch.rand(2, 4, 5, 5)
    layer(x)
    layer.eval()
    with torch.no_grad():
        before = layer(x)
        with adc_range_shapes.swapped_conversions([("conv", layer)], x, layer, 3, True, 8):
            assert "convert_and_sum" in vars(layer.psum_quantizer)
            inside = layer(x)
        after = layer(x)
    assert "convert_and_sum" not in vars(layer.psum_quantizer)
    assert torch.equal(after, before) and not torch.equal(inside, before)


@pytest.mark.parametrize("stride", [1, 2])
def test_codes_plus_sparse_correction_is_the_per_cycle_weight_gradient(stride):
    """sum_j conv_wgrad(d_j, w_j g (not clipped_j)) == conv_wgrad(codes, g) - correction, in float64."""
    torch.manual_seed(0)
    cycles, n, c, k, size = 4, 3, 5, 6, 7
    digits = (torch.rand(cycles, n, c, size, size) < 0.4).double()
    weight = torch.randint(-7, 8, (k, c, 3, 3)).double()
    out_size = (size - 1) // stride + 1
    grad_u = torch.randn(n, k, out_size, out_size, dtype=torch.float64)
    clipped = torch.rand(cycles, n, k, out_size, out_size) < 0.2
    reference = sum(conv_work._wgrad(torch.where(clipped[j], 0.0, grad_u * w), digits[j], weight, stride, 1)
                    for j, w in enumerate(conv_work.CYCLE_WEIGHTS))
    got = conv_work.sparse_weight_gradient(digits, grad_u, clipped, weight, stride)
    assert clipped.any() and torch.allclose(got, reference, rtol=0, atol=1e-10)


def test_conv_work_smoke_prints_both_layouts(capsys):
    rows = conv_work.main(["--smoke"])
    assert [(r["shape"], r["layout"]) for r in rows] == [
        ("14->16, g1, s1, 32x32", "channels_last"), ("14->16, g1, s1, 32x32", "nchw"),
        ("2->16, g1, s1, 32x32", "channels_last"), ("2->16, g1, s1, 32x32", "nchw")]
    assert all(r["forward_ms"] > 0 and r["wgrad_gflops"] > 0 for r in rows)
    assert all("sparse_wgrad_ms" in r for r in rows if r["layout"] == "channels_last")
    assert "torch.mm 256^2" in capsys.readouterr().out


def test_calibration_speed_smoke_times_both_searches_and_finds_the_same_clips(capsys):
    (row,) = calibration_speed.main(["--smoke"])
    assert row["model"] == "resnet20" and row["images"] == 4 and row["same_clips"] == "yes"
    assert row["one_pass_s"] > 0 and row["blocked_s"] > 0 and row["speedup"] > 0
    assert "| resnet20 | 4 |" in capsys.readouterr().out


def test_ptq_step_profile_switches_adam_and_profiles_a_unit(tmp_path):
    params = [torch.nn.Parameter(torch.zeros(2))]
    for name in ("foreach", "fused"):
        with ptq_step_profile.adam_implementation(name):
            assert torch.optim.Adam(params, lr=1e-3).defaults[name] is True
    assert torch.optim.Adam(params, lr=1e-3).defaults["foreach"] is None  # restored after the block
    result = ptq_step_profile.main(["--smoke", "--simulation", "eager", "--steps", "4", "--profile", "--copies",
                                    "--callers", "aten::mul", "--unit", "1", "--profile-steps", "2", "4", "--work-dir", str(tmp_path)])
    assert result["timed steps"] == 11 * 2 and result["ms per step"] > 0  # 11 units, the first two steps untimed
    ops = {row["op"]: row for row in result["profile"]}
    assert any(op.startswith("aten::") for op in ops) and all(row["ms_per_step"] >= 0 for row in ops.values())
    assert "aten::mkldnn_convolution" in ops or "aten::convolution" in ops or "aten::_convolution" in ops
    # --copies: the step's copies by shape and by caller, each table accounting for every copy the profile counted
    copies = [row for row in result["profile"] if row["op"] == "aten::copy_"]
    for table in (result["copies_by_shape"], result["copies_by_caller"]):
        assert table and all(row["ms_per_step"] >= 0 for row in table)
        if copies:
            assert sum(row["calls_per_step"] for row in table) == pytest.approx(copies[0]["calls_per_step"], abs=0.5)
    assert any("quant/" in row["caller"] for row in result["copies_by_caller"])
    # --callers: any operator's calls by caller, again accounting for every call the profile counted
    muls = [row for row in result["profile"] if row["op"] == "aten::mul"]
    assert result["callers"]["aten::copy_"] == result["copies_by_caller"]
    if muls:
        assert sum(row["calls_per_step"] for row in result["callers"]["aten::mul"]) == pytest.approx(
            muls[0]["calls_per_step"], abs=0.5)


def test_ptq_step_profile_overhead_levers_switch_on_and_back_off():
    """``--skip-guards`` skips Dynamo's guard checks from a unit's third step to its last only; ``--cpp-wrapper``
    sets Inductor's C++ wrapper within the fit only."""
    import torch._dynamo.eval_frame as eval_frame
    import torch._inductor.config as inductor

    skipping = lambda: eval_frame._stance.skip_guard_eval_unsafe  # noqa: E731
    skip = ptq_step_profile.SkipGuards(steps_per_unit=5)
    seen = []
    for batch_idx in range(10):  # two units of 5 steps
        skip.on_train_batch_start(None, None, None, batch_idx)
        seen.append(skipping())
        skip.on_train_batch_end(None, None, None, None, batch_idx)
    assert seen == [False, False, True, True, True] * 2 and not skipping()
    skip.on_train_batch_start(None, None, None, 2)
    skip.teardown(None, None, "fit")
    assert not skipping()
    with ptq_step_profile.inductor_cpp_wrapper(True):
        assert inductor.cpp_wrapper is True
    with ptq_step_profile.inductor_cpp_wrapper(False):
        assert inductor.cpp_wrapper is False
    assert inductor.cpp_wrapper is False


def test_weight_side_smoke_compiles_the_same_weights_and_times_them():
    """`weight_side.py --smoke`: the compiled weight side gives the eager one's array weights and coefficients, and
    every timing is a positive number (one layer shape, 2 images)."""
    (row,) = weight_side.main(["--smoke"])
    assert row["difference"] <= 1e-6  # the same soft codes, slices and part weights, to float32 rounding
    assert min(float(row[key]) for key in ("layer_ms", "eager_ms", "compiled_ms", "compile_s")) > 0
    assert row["shape"] == "16->16, 32, 1"


def test_adc_range_speed_smoke_times_both_range_shapes_and_the_compile_option_changes_no_value():
    """`adc_range_speed.py --smoke`: one shape, the three variants timed; the asymmetric kernel compiled with and
    without `fused._ASYMMETRIC_BACKWARD_OPTIONS` gives the same output and gradients, and the option is put back."""
    import adc_range_speed
    from cimq_pl.quant import fused

    before = dict(fused._ASYMMETRIC_BACKWARD_OPTIONS)
    row = adc_range_speed.main(["--smoke"])[0]
    assert row["same values"] is True
    assert min(row[f"{variant} ms"] for variant in adc_range_speed.VARIANTS) > 0
    assert fused._ASYMMETRIC_BACKWARD_OPTIONS == before == {"realize_reads_threshold": 5}
